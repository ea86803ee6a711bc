"""The OpenAPI 3.1 document, generated from the declared operations."""

from __future__ import annotations

from flask import Blueprint, jsonify

import appliance
from appliance.api import schemas as s
from appliance.api.routing import OPERATIONS, Operation
from appliance.errors import STATUS_BY_CODE

bp = Blueprint("openapi", __name__)

_DESCRIPTIONS = {
    400: "The request is malformed (see `error` and `details`)",
    401: "No valid API token",
    403: "The caller's role does not allow this",
    404: "No such object, or one the caller may not see",
    409: "Conflicts with stored state (exists, immutable, archived, last admin)",
    413: "The body is too large",
    415: "Unsupported Content-Type",
    422: "The request is well-formed but not acceptable",
}


def _operation(op: Operation) -> dict:
    doc: dict = {
        "operationId": op.endpoint.replace(".", "_"),
        "summary": op.summary,
        "tags": [op.tag],
        "parameters": [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in op.path_params
        ]
        + [
            {"name": name, "in": "query", "required": False, "schema": schema}
            for name, schema in op.query.items()
        ],
        "responses": {},
    }
    if op.idempotent:
        doc["parameters"].append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "A repeat with the same key returns the first result.",
                "schema": {"type": "string", "maxLength": 200},
            }
        )
    if op.body is not None:
        doc["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": op.body}},
        }
    if op.upload and op.request_media:
        doc["requestBody"] = {
            "required": True,
            "content": {
                op.request_media: {
                    "schema": {"type": "string", "contentMediaType": op.request_media}
                }
            },
        }
    elif op.upload:
        doc["requestBody"] = {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "files": {
                                "type": "array",
                                "items": {
                                    "type": "string",
                                    "contentMediaType": "application/octet-stream",
                                },
                            }
                        },
                    }
                },
                "application/x-tar": {
                    "schema": {"type": "string", "contentMediaType": "application/x-tar"}
                },
            },
        }
    success: dict = {"description": "Success"}
    if op.status != 204:
        schema = op.response or {"type": "string", "contentMediaType": op.produces}
        success["content"] = {op.produces: {"schema": schema}}
    doc["responses"][str(op.status)] = success
    error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    statuses = set(op.errors) | ({401} if not op.public else set())
    for status in sorted(statuses):
        doc["responses"][str(status)] = {
            "description": _DESCRIPTIONS.get(status, "Error"),
            "content": error_content,
        }
    if op.public:
        doc["security"] = []
    return doc


def build_document() -> dict:
    paths: dict[str, dict] = {}
    for op in OPERATIONS:
        paths.setdefault(op.openapi_path, {})[op.method.lower()] = _operation(op)
    probe = {"200": {"description": "Healthy"}, "503": {"description": "Not ready"}}
    paths["/healthz"] = {
        "get": {
            "operationId": "healthz",
            "summary": "Liveness",
            "security": [],
            "responses": {"200": {"description": "The process answers"}},
        }
    }
    paths["/readyz"] = {
        "get": {
            "operationId": "readyz",
            "security": [],
            "summary": "Readiness: database at the newest schema, blob store writable",
            "responses": probe,
        }
    }
    paths["/api/v1/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "security": [],
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Animus Datalab API",
            "version": appliance.__version__,
            "description": (
                "Every call carries `Authorization: Bearer <token>`. Errors are "
                "`{error, message, details, request_id}`; error codes: "
                + ", ".join(f"`{c}` ({st})" for c, st in sorted(STATUS_BY_CODE.items()))
                + "."
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": s.ERROR},
        },
    }


@bp.get("/api/v1/openapi.json")
def openapi_document():
    return jsonify(build_document())
