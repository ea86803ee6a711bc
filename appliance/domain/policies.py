"""Project policies and the immutable PolicySnapshots copied from them."""

from __future__ import annotations

import copy
import hashlib

import jsonschema

from appliance import db
from appliance.audit import log as audit
from appliance.audit.actions import Action
from appliance.domain.context import Context
from appliance.domain.records import PolicySnapshot, Project, canonical_json, new_id
from appliance.errors import ValidationFailed

DEFAULT_POLICY: dict = {
    "egress": {"allow": []},
    "resources": {"cpu": 2, "memory_mb": 4096, "pids": 512, "timeout_seconds": 3600},
    "required_approvals": 0,
    "secret_grants": [],
    "export_requires_approval": True,
}

POLICY_SCHEMA: dict = {
    "type": "object",
    "additionalProperties": False,
    "required": ["egress", "resources", "required_approvals", "secret_grants"],
    "properties": {
        "egress": {
            "type": "object",
            "additionalProperties": False,
            "required": ["allow"],
            "properties": {
                "allow": {
                    "type": "array",
                    "maxItems": 100,
                    "items": {"type": "string", "pattern": r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$"},
                }
            },
        },
        "resources": {
            "type": "object",
            "additionalProperties": False,
            "required": ["cpu", "memory_mb", "pids", "timeout_seconds"],
            "properties": {
                "cpu": {"type": "number", "exclusiveMinimum": 0, "maximum": 256},
                "memory_mb": {"type": "integer", "minimum": 16, "maximum": 4_194_304},
                "pids": {"type": "integer", "minimum": 8, "maximum": 1_000_000},
                "timeout_seconds": {"type": "integer", "minimum": 1, "maximum": 30 * 86400},
            },
        },
        "required_approvals": {"type": "integer", "minimum": 0, "maximum": 10},
        "secret_grants": {
            "type": "array",
            "maxItems": 100,
            "items": {"type": "string", "pattern": r"^[A-Za-z0-9_./-]{1,200}$"},
        },
        # Optional so policies stored before it existed stay valid; absent means true.
        "export_requires_approval": {"type": "boolean"},
    },
}


def validate_policy(policy: object) -> dict:
    errors = sorted(
        jsonschema.Draft202012Validator(POLICY_SCHEMA).iter_errors(policy), key=lambda e: e.path
    )
    if errors:
        raise ValidationFailed(
            "the policy is not valid",
            details={
                "errors": [
                    {
                        "field": "/".join(map(str, e.absolute_path)) or "(policy)",
                        "problem": e.message,
                    }
                    for e in errors
                ]
            },
        )
    return copy.deepcopy(policy)  # type: ignore[return-value]


def policy_digest(policy: dict) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(policy).encode()).hexdigest()


def snapshot_policy(ctx: Context, project: Project) -> PolicySnapshot:
    """Copy the project's policy as it is now into an immutable PolicySnapshot."""
    with db.write_transaction():
        snapshot = PolicySnapshot.create(
            id=new_id("pol"),
            project_id=project.id,
            policy=project.policy,
            digest=policy_digest(project.policy),
            created_by=ctx.principal.actor,
        )
        audit.record(
            ctx,
            Action.POLICY_SNAPSHOT_CREATED,
            project_id=project.id,
            object_type="policy_snapshot",
            object_id=snapshot.id,
            payload={"digest": snapshot.digest},
        )
    return snapshot
