"""The OpenAPI document: valid 3.1, in step with the routes, and true about responses."""

from __future__ import annotations

import re

import jsonschema
from openapi_spec_validator import validate

from appliance.api.routing import OPERATIONS


def test_document_is_valid_openapi_3_1(server):
    document = server.client().get("/api/v1/openapi.json").json()
    validate(document)
    assert document["openapi"] == "3.1.0"


def test_every_route_is_documented(app, server):
    document = server.client().get("/api/v1/openapi.json").json()
    documented = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    routed = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.rule.startswith("/ui"):
            continue  # the web UI's pages are not part of the JSON API
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routed.add((method, path))
    assert routed - documented == set(), "routes missing from the OpenAPI document"
    assert documented - routed == set(), "documented operations that do not exist"


def test_responses_match_their_documented_schemas(server, alice, project):
    """Read every GET without path params (plus a project) and check the body against the doc."""
    pid = project["id"]
    alice.api.post(f"/api/v1/projects/{pid}/datasets", json={"name": "d"})
    alice.api.post(
        f"/api/v1/projects/{pid}/code-refs",
        json={"repo_url": "https://git.example/r.git", "ref": "main"},
    )
    checked = 0
    for op in OPERATIONS:
        if op.method != "GET" or op.response is None or set(op.path_params) - {"project_id"}:
            continue
        response = alice.api.get(op.rule.replace("<project_id>", pid))
        if response.status_code != op.status:
            continue  # e.g. 403 for admin-only reads; the RBAC matrix covers statuses
        jsonschema.validate(response.json(), op.response)
        checked += 1
    assert checked >= 10
