"""Malformed requests get specific 4xx errors in the DESIGN §11 shape, never a traceback."""

from __future__ import annotations

import pytest

from appliance.domain.records import AuditEvent, Project


def test_error_body_and_request_id_echo(server, alice):
    response = alice.api.get("/api/v1/projects/prj_missing", headers={"X-Request-ID": "abc-123"})
    assert response.status_code == 404
    assert response.headers["X-Request-ID"] == "abc-123"
    assert response.json() == {
        "error": "not_found",
        "message": "no project 'prj_missing'",
        "details": {},
        "request_id": "abc-123",
    }
    generated = alice.api.get("/api/v1/nowhere")
    assert generated.status_code == 404 and generated.json()["error"] == "not_found"
    assert generated.json()["request_id"] == generated.headers["X-Request-ID"].strip()
    assert generated.headers["X-Request-ID"].startswith("req_")


def test_request_id_reaches_the_audit_event(server, alice, bound_db):
    alice.api.post("/api/v1/projects", json={"name": "traced"}, headers={"X-Request-ID": "trace-7"})
    event = AuditEvent.get(AuditEvent.action == "project:record:created")
    assert event.request_id == "trace-7"


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        (
            {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
            400,
            "malformed_json",
        ),
        ({"json": {"name": 42}}, 400, "invalid_request"),
        ({"json": {"name": "ok", "colour": "blue"}}, 400, "invalid_request"),
        ({"json": ["name"]}, 400, "invalid_request"),
        ({"json": {}}, 400, "invalid_request"),
        (
            {"data": b"name=x", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
            415,
            "unsupported_media_type",
        ),
        ({"json": {"name": "x" * 2_000_000}}, 413, "request_too_large"),
        ({"json": {"name": "bad/name"}}, 422, "validation_failed"),
    ],
)
def test_malformed_project_requests(server, alice, bound_db, kwargs, status, code):
    response = alice.api.post("/api/v1/projects", **kwargs)
    assert (response.status_code, response.json()["error"]) == (status, code), response.text
    assert "Traceback" not in response.text
    assert Project.select().count() == 0


def test_schema_errors_list_every_problem(server, alice):
    response = alice.api.post("/api/v1/projects", json={"name": 1, "description": 2, "x": 3})
    fields = {e["field"] for e in response.json()["details"]["errors"]}
    assert {"name", "description", "(body)"} <= fields


def test_bad_digests_and_references(server, alice, project):
    pid = project["id"]
    env = alice.api.post(
        f"/api/v1/projects/{pid}/environments",
        json={"name": "e", "base_image": "runner", "packages": ["numpy==2.1.0"]},
    )
    assert env.status_code == 201
    cases = [
        (
            {"environment_id": env.json()["id"], "image_digest": "sha256:XYZ", "packages": []},
            422,
            "invalid_digest",
        ),
        (
            {
                "environment_id": env.json()["id"],
                "image_digest": "sha256:" + "a" * 64,
                "packages": [{"name": "numpy", "version": "2.1.0", "sha256": "md5:1"}],
            },
            422,
            "invalid_digest",
        ),
        (
            {"environment_id": "env_nope", "image_digest": "sha256:" + "a" * 64, "packages": []},
            422,
            "validation_failed",
        ),
    ]
    for body, status, code in cases:
        response = alice.api.post(f"/api/v1/projects/{pid}/environment-locks", json=body)
        assert (response.status_code, response.json()["error"]) == (status, code), response.text
    other = alice.api.post("/api/v1/projects", json={"name": "elsewhere"}).json()
    foreign_env = alice.api.post(
        f"/api/v1/projects/{other['id']}/environments",
        json={"name": "e", "base_image": "runner", "packages": []},
    ).json()
    cross = alice.api.post(
        f"/api/v1/projects/{pid}/environment-locks",
        json={
            "environment_id": foreign_env["id"],
            "image_digest": "sha256:" + "a" * 64,
            "packages": [],
        },
    )
    assert (cross.status_code, cross.json()["error"]) == (422, "cross_project_reference")
    bad_sha = alice.api.post(
        f"/api/v1/projects/{pid}/code-refs",
        json={"repo_url": "https://git.example/r.git", "commit_sha": "abc"},
    )
    assert (
        bad_sha.status_code == 422
        and bad_sha.json()["details"]["errors"][0]["field"] == "commit_sha"
    )


def test_code_ref_branch_is_accepted_but_not_production(server, alice, project):
    pid = project["id"]
    branch = alice.api.post(
        f"/api/v1/projects/{pid}/code-refs",
        json={"repo_url": "https://git.example/r.git", "ref": "main"},
    ).json()
    assert branch["production_ready"] is False and branch["limitations"]
    pinned = alice.api.post(
        f"/api/v1/projects/{pid}/code-refs",
        json={"repo_url": "https://git.example/r.git", "commit_sha": "A" * 40},
    ).json()
    assert pinned["production_ready"] is True and pinned["commit_sha"] == "a" * 40
    assert pinned["limitations"] == []


def test_unauthenticated_and_bad_tokens(server):
    anonymous = server.client()
    assert anonymous.get("/api/v1/projects").json()["error"] == "unauthenticated"
    forged = server.client("anm_" + "x" * 43).get("/api/v1/projects")
    assert forged.status_code == 401
    assert server.client("Basic abc").get("/api/v1/projects").status_code == 401


def test_health_and_readiness(server):
    client = server.client()
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"]["ok"] is True
