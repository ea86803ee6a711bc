"""JSON schemas of the API's objects: used for the OpenAPI document and to check responses."""

from __future__ import annotations

ID = {"type": "string", "pattern": "^[a-z]+_[0-9a-z]+$"}
TIME = {"type": "string", "format": "date-time"}
SHA256_HEX = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
DIGEST = {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}
NULLABLE_ID = {"type": ["string", "null"]}


def obj(required: dict, optional: dict | None = None) -> dict:
    return {
        "type": "object",
        "required": sorted(required),
        "properties": {**required, **(optional or {})},
    }


ERROR = obj(
    {
        "error": {"type": "string"},
        "message": {"type": "string"},
        "details": {"type": "object"},
        "request_id": {"type": "string"},
    }
)

PROJECT = obj(
    {
        "id": ID,
        "name": {"type": "string"},
        "description": {"type": "string"},
        "state": {"enum": ["active", "archived"]},
        "created_at": TIME,
        "created_by": {"type": "string"},
        "archived_at": {"type": ["string", "null"]},
    },
    {"role": {"type": ["string", "null"]}},
)

POLICY = {"type": "object"}

POLICY_SNAPSHOT = obj(
    {
        "id": ID,
        "project_id": ID,
        "policy": POLICY,
        "digest": DIGEST,
        "created_at": TIME,
        "created_by": {"type": "string"},
    }
)

MEMBER = obj({"username": {"type": "string"}, "role": {"enum": ["viewer", "editor", "admin"]}})

USER = obj(
    {
        "id": ID,
        "username": {"type": "string"},
        "system_role": {"type": ["string", "null"]},
        "is_active": {"type": "boolean"},
        "created_at": TIME,
    }
)

TOKEN = obj(
    {
        "id": ID,
        "name": {"type": "string"},
        "owner": {"type": "string"},
        "created_at": TIME,
        "expires_at": TIME,
        "revoked_at": {"type": ["string", "null"]},
    },
    {"token": {"type": "string", "description": "the secret; returned once, at creation"}},
)

SERVICE_ACCOUNT = obj(
    {
        "id": ID,
        "project_id": ID,
        "name": {"type": "string"},
        "role": {"enum": ["viewer", "editor", "admin"]},
        "created_at": TIME,
    }
)

DATASET = obj(
    {
        "id": ID,
        "project_id": ID,
        "name": {"type": "string"},
        "description": {"type": "string"},
        "created_at": TIME,
        "created_by": {"type": "string"},
    }
)

FILE = obj({"path": {"type": "string"}, "sha256": SHA256_HEX, "size": {"type": "integer"}})

DATASET_VERSION = obj(
    {
        "id": ID,
        "project_id": ID,
        "dataset_id": ID,
        "number": {"type": "integer"},
        "digest": DIGEST,
        "parent_id": NULLABLE_ID,
        "file_count": {"type": "integer"},
        "total_size": {"type": "integer"},
        "message": {"type": "string"},
        "created_at": TIME,
        "created_by": {"type": "string"},
    },
    {"files": {"type": "array", "items": FILE}},
)

CODE_REF = obj(
    {
        "id": ID,
        "project_id": ID,
        "repo_url": {"type": "string"},
        "commit_sha": {"type": ["string", "null"]},
        "ref": {"type": ["string", "null"]},
        "path": {"type": "string"},
        "production_ready": {"type": "boolean"},
        "limitations": {"type": "array", "items": {"type": "string"}},
        "created_at": TIME,
        "created_by": {"type": "string"},
    }
)

ENVIRONMENT = obj(
    {
        "id": ID,
        "project_id": ID,
        "name": {"type": "string"},
        "base_image": {"type": "string"},
        "packages": {"type": "array", "items": {"type": "string"}},
        "description": {"type": "string"},
        "created_at": TIME,
        "created_by": {"type": "string"},
    }
)

LOCKED_PACKAGE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "version", "sha256"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 200},
        "version": {"type": "string", "minLength": 1, "maxLength": 100},
        "sha256": {"type": "string", "maxLength": 100},
    },
}

ENVIRONMENT_LOCK = obj(
    {
        "id": ID,
        "project_id": ID,
        "environment_id": ID,
        "image_digest": DIGEST,
        "packages": {"type": "array", "items": LOCKED_PACKAGE},
        "digest": DIGEST,
        "created_at": TIME,
        "created_by": {"type": "string"},
    }
)

AUDIT_EVENT = obj(
    {
        "seq": {"type": "integer"},
        "at": TIME,
        "actor": {"type": "string"},
        "action": {"type": "string"},
        "project_id": NULLABLE_ID,
        "object_type": {"type": "string"},
        "object_id": {"type": "string"},
        "request_id": {"type": "string"},
        "payload": {"type": "object"},
        "prev_hash": SHA256_HEX,
        "hash": SHA256_HEX,
    }
)

AUDIT_PAGE = obj(
    {
        "items": {"type": "array", "items": AUDIT_EVENT},
        "next_after_seq": {"type": ["integer", "null"]},
    }
)

CHAIN_STATUS = obj(
    {
        "ok": {"type": "boolean"},
        "count": {"type": "integer"},
        "head_hash": SHA256_HEX,
        "broken_seq": {"type": ["integer", "null"]},
        "reason": {"type": "string"},
    }
)


def body(required: dict, optional: dict | None = None) -> dict:
    """A request body schema: unknown fields are refused."""
    schema = obj(required, optional)
    schema["additionalProperties"] = False
    return schema


NAME = {"type": "string", "minLength": 1, "maxLength": 100}
DESCRIPTION = {"type": "string", "maxLength": 10_000}
ROLE = {"enum": ["viewer", "editor", "admin"]}
