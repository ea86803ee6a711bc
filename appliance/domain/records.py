"""Persistent records: one peewee model per table of ``appliance/migrations``.

The migrations own the schema (including triggers and composite keys); these models only map
rows to objects. Rules about the records live in the neighbouring domain modules.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from datetime import UTC, datetime

import peewee

from appliance.db import database
from appliance.errors import AnimusError, ValidationFailed

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def new_id(prefix: str) -> str:
    """An opaque, time-ordered id with a type prefix, e.g. ``prj_01hx…`` (26 base-32 digits)."""
    value = (int(time.time() * 1000) << 80) | secrets.randbits(80)
    digits = []
    for _ in range(26):
        digits.append(_CROCKFORD[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(digits))}"


def utc_now() -> str:
    """The current time as RFC 3339 UTC with microseconds, the one format stored everywhere."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_json(value: object) -> str:
    """UTF-8 friendly JSON with sorted keys and no insignificant whitespace."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class JSONField(peewee.TextField):
    def db_value(self, value):
        return None if value is None else canonical_json(value)

    def python_value(self, value):
        return None if value is None else json.loads(value)


class Record(peewee.Model):
    class Meta:
        database = database
        legacy_table_names = False


class SystemSetting(Record):
    key = peewee.TextField(primary_key=True)
    value = peewee.TextField()

    class Meta:
        table_name = "system_settings"


class User(Record):
    id = peewee.TextField(primary_key=True)
    username = peewee.TextField(unique=True)
    password_hash = peewee.TextField(null=True)
    system_role = peewee.TextField(null=True)
    is_active = peewee.BooleanField(default=True)
    created_at = peewee.TextField(default=utc_now)

    class Meta:
        table_name = "users"


class Project(Record):
    id = peewee.TextField(primary_key=True)
    name = peewee.TextField(unique=True)
    description = peewee.TextField(default="")
    state = peewee.TextField(default="active")
    policy = JSONField()
    created_at = peewee.TextField(default=utc_now)
    created_by = peewee.TextField()
    archived_at = peewee.TextField(null=True)

    class Meta:
        table_name = "projects"


class ServiceAccount(Record):
    id = peewee.TextField(primary_key=True)
    project_id = peewee.TextField()
    name = peewee.TextField()
    description = peewee.TextField(default="")
    created_at = peewee.TextField(default=utc_now)
    created_by = peewee.TextField()

    class Meta:
        table_name = "service_accounts"


class RoleBinding(Record):
    id = peewee.TextField(primary_key=True)
    project_id = peewee.TextField()
    user_id = peewee.TextField(null=True)
    service_account_id = peewee.TextField(null=True)
    role = peewee.TextField()
    created_at = peewee.TextField(default=utc_now)

    class Meta:
        table_name = "role_bindings"


class ApiToken(Record):
    id = peewee.TextField(primary_key=True)
    token_hash = peewee.TextField(unique=True)
    user_id = peewee.TextField(null=True)
    service_account_id = peewee.TextField(null=True)
    name = peewee.TextField(default="")
    created_at = peewee.TextField(default=utc_now)
    expires_at = peewee.TextField()
    revoked_at = peewee.TextField(null=True)
    #: The web session that issued a personal token (its forced logout revokes the token).
    session_id = peewee.TextField(null=True)

    class Meta:
        table_name = "api_tokens"


class Session(Record):
    """A signed-in browser: only the hash of its secret is stored."""

    id = peewee.TextField(primary_key=True)
    token_hash = peewee.TextField(unique=True)
    user_id = peewee.TextField()
    csrf_token = peewee.TextField()
    created_at = peewee.TextField(default=utc_now)
    last_seen_at = peewee.TextField(default=utc_now)
    expires_at = peewee.TextField()
    remote_addr = peewee.TextField(default="")
    user_agent = peewee.TextField(default="")
    ended_at = peewee.TextField(null=True)
    ended_by = peewee.TextField(null=True)
    end_reason = peewee.TextField(null=True)

    class Meta:
        table_name = "sessions"


class SignInFailure(Record):
    """A failed password sign-in under one throttle key (never the typed text itself)."""

    id = peewee.TextField(primary_key=True)
    throttle_key = peewee.TextField()
    failed_at = peewee.TextField()

    class Meta:
        table_name = "sign_in_failures"


class Dataset(Record):
    id = peewee.TextField(primary_key=True)
    project_id = peewee.TextField()
    name = peewee.TextField()
    description = peewee.TextField(default="")
    created_at = peewee.TextField(default=utc_now)
    created_by = peewee.TextField()

    class Meta:
        table_name = "datasets"


class DatasetVersion(Record):
    id = peewee.TextField(primary_key=True)
    project_id = peewee.TextField()
    dataset_id = peewee.TextField()
    number = peewee.IntegerField()
    digest = peewee.TextField()
    parent_id = peewee.TextField(null=True)
    file_count = peewee.BigIntegerField()
    total_size = peewee.BigIntegerField()
    message = peewee.TextField(default="")
    created_at = peewee.TextField(default=utc_now)
    created_by = peewee.TextField()

    class Meta:
        table_name = "dataset_versions"


class DatasetFile(Record):
    version_id = peewee.TextField()
    path = peewee.TextField()
    sha256 = peewee.TextField()
    size = peewee.BigIntegerField()

    class Meta:
        table_name = "dataset_files"
        primary_key = peewee.CompositeKey("version_id", "path")


class CodeRef(Record):
    id = peewee.TextField(primary_key=True)
    project_id = peewee.TextField()
    repo_url = peewee.TextField()
    commit_sha = peewee.TextField(null=True)
    ref = peewee.TextField(null=True)
    path = peewee.TextField(default="")
    production_ready = peewee.BooleanField()
    created_at = peewee.TextField(default=utc_now)
    created_by = peewee.TextField()

    class Meta:
        table_name = "code_refs"


class EnvironmentDefinition(Record):
    id = peewee.TextField(primary_key=True)
    project_id = peewee.TextField()
    name = peewee.TextField()
    base_image = peewee.TextField()
    packages = JSONField()
    description = peewee.TextField(default="")
    created_at = peewee.TextField(default=utc_now)
    created_by = peewee.TextField()

    class Meta:
        table_name = "environment_definitions"


class EnvironmentLock(Record):
    id = peewee.TextField(primary_key=True)
    project_id = peewee.TextField()
    environment_id = peewee.TextField()
    image_digest = peewee.TextField()
    packages = JSONField()
    digest = peewee.TextField()
    created_at = peewee.TextField(default=utc_now)
    created_by = peewee.TextField()

    class Meta:
        table_name = "environment_locks"


class PolicySnapshot(Record):
    id = peewee.TextField(primary_key=True)
    project_id = peewee.TextField()
    policy = JSONField()
    digest = peewee.TextField()
    created_at = peewee.TextField(default=utc_now)
    created_by = peewee.TextField()

    class Meta:
        table_name = "policy_snapshots"


class AuditEvent(Record):
    seq = peewee.BigIntegerField(primary_key=True)
    at = peewee.TextField()
    actor = peewee.TextField()
    action = peewee.TextField()
    project_id = peewee.TextField(null=True)
    object_type = peewee.TextField()
    object_id = peewee.TextField()
    request_id = peewee.TextField()
    payload = JSONField()
    prev_hash = peewee.TextField()
    hash = peewee.TextField()
    canonical = peewee.TextField()

    class Meta:
        table_name = "audit_events"


class IdempotencyRecord(Record):
    principal = peewee.TextField()
    key = peewee.TextField()
    method = peewee.TextField()
    path = peewee.TextField()
    fingerprint = peewee.TextField()
    status = peewee.IntegerField()
    body = peewee.TextField()
    created_at = peewee.TextField(default=utc_now)

    class Meta:
        table_name = "idempotency_records"
        primary_key = peewee.CompositeKey("principal", "key")


class DataPlane(Record):
    id = peewee.TextField(primary_key=True)
    name = peewee.TextField(unique=True)
    token_hash = peewee.TextField(unique=True)
    backend = peewee.TextField()
    created_at = peewee.TextField(default=utc_now)
    last_seen_at = peewee.TextField(null=True)
    revoked_at = peewee.TextField(null=True)

    class Meta:
        table_name = "data_planes"


class Run(Record):
    id = peewee.TextField(primary_key=True)
    project_id = peewee.TextField()
    state = peewee.TextField()
    production = peewee.BooleanField()
    code_ref_id = peewee.TextField()
    environment_lock_id = peewee.TextField()
    inputs = JSONField()
    command = JSONField()
    parameters = JSONField()
    env = JSONField()
    secrets = JSONField()
    resources = JSONField(null=True)
    limitations = JSONField()
    source_run_id = peewee.TextField(null=True)
    source_kind = peewee.TextField(null=True)
    policy_snapshot_id = peewee.TextField(null=True)
    snapshot_id = peewee.TextField(null=True)
    data_plane_id = peewee.TextField(null=True)
    lease_expires_at = peewee.TextField(null=True)
    cancel_requested = peewee.BooleanField(default=False)
    exit_code = peewee.IntegerField(null=True)
    reason = peewee.TextField(null=True)
    created_at = peewee.TextField(default=utc_now)
    created_by = peewee.TextField()
    queued_at = peewee.TextField(null=True)
    planned_at = peewee.TextField(null=True)
    started_at = peewee.TextField(null=True)
    finished_at = peewee.TextField(null=True)
    log_size = peewee.BigIntegerField(default=0)

    class Meta:
        table_name = "runs"


class ExecutionSnapshot(Record):
    id = peewee.TextField(primary_key=True)
    project_id = peewee.TextField()
    run_id = peewee.TextField(unique=True)
    snapshot = JSONField()
    digest = peewee.TextField()
    created_at = peewee.TextField(default=utc_now)

    class Meta:
        table_name = "execution_snapshots"


class RunMetric(Record):
    run_id = peewee.TextField()
    seq = peewee.IntegerField()
    name = peewee.TextField()
    value = peewee.DoubleField()
    step = peewee.BigIntegerField(null=True)
    at = peewee.TextField(null=True)

    class Meta:
        table_name = "run_metrics"
        primary_key = peewee.CompositeKey("run_id", "seq")


class Artifact(Record):
    id = peewee.TextField(primary_key=True)
    project_id = peewee.TextField()
    run_id = peewee.TextField()
    path = peewee.TextField()
    sha256 = peewee.TextField()
    size = peewee.BigIntegerField()
    created_at = peewee.TextField(default=utc_now)

    class Meta:
        table_name = "artifacts"


class RunApproval(Record):
    run_id = peewee.TextField()
    approver = peewee.TextField()
    reason = peewee.TextField()
    created_at = peewee.TextField(default=utc_now)

    class Meta:
        table_name = "run_approvals"
        primary_key = peewee.CompositeKey("run_id", "approver")


class RunLogChunk(Record):
    run_id = peewee.TextField()
    offset = peewee.BigIntegerField()
    data = peewee.TextField()

    class Meta:
        table_name = "run_log_chunks"
        primary_key = peewee.CompositeKey("run_id", "offset")


class Model(Record):
    id = peewee.TextField(primary_key=True)
    project_id = peewee.TextField()
    name = peewee.TextField()
    description = peewee.TextField(default="")
    created_at = peewee.TextField(default=utc_now)
    created_by = peewee.TextField()

    class Meta:
        table_name = "models"


class ModelVersion(Record):
    id = peewee.TextField(primary_key=True)
    project_id = peewee.TextField()
    model_id = peewee.TextField()
    number = peewee.IntegerField()
    stage = peewee.TextField()
    source_run_id = peewee.TextField()
    artifact_id = peewee.TextField()
    artifact_path = peewee.TextField()
    artifact_sha256 = peewee.TextField()
    artifact_size = peewee.BigIntegerField()
    metrics = JSONField()
    created_at = peewee.TextField(default=utc_now)
    created_by = peewee.TextField()
    decided_at = peewee.TextField(null=True)
    decided_by = peewee.TextField(null=True)
    decision_reason = peewee.TextField(null=True)
    exported_at = peewee.TextField(null=True)

    class Meta:
        table_name = "model_versions"


class ModelExport(Record):
    id = peewee.TextField(primary_key=True)
    project_id = peewee.TextField()
    model_version_id = peewee.TextField()
    sha256 = peewee.TextField()
    size = peewee.BigIntegerField()
    manifest_sha256 = peewee.TextField()
    signing_fingerprint = peewee.TextField()
    created_at = peewee.TextField(default=utc_now)
    created_by = peewee.TextField()

    class Meta:
        table_name = "model_exports"


#: The name of a dataset, environment or model: unique within its project.
OBJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def require_object_name(name: str) -> None:
    if not OBJECT_NAME.match(name):
        raise ValidationFailed(
            "name must be 1-100 characters: letters, digits, '.', '_' or '-'",
            details={"field": "name"},
        )


def create_named(model: type[Record], what: str, **fields: object) -> Record:
    """Insert a record whose ``name`` is unique in its scope; a clash is ``already_exists``.

    Runs in a savepoint so the caller's transaction survives the refused insert.
    """
    try:
        with database.atomic():
            return model.create(**fields)
    except peewee.IntegrityError:
        raise AnimusError(
            f"{what} named {fields['name']!r} already exists", code="already_exists"
        ) from None


class Pipeline(Record):
    id = peewee.TextField(primary_key=True)
    project_id = peewee.TextField()
    name = peewee.TextField()
    spec = JSONField()
    digest = peewee.TextField()
    created_at = peewee.TextField(default=utc_now)
    created_by = peewee.TextField()

    class Meta:
        table_name = "pipelines"


class PipelineRun(Record):
    id = peewee.TextField(primary_key=True)
    project_id = peewee.TextField()
    pipeline_id = peewee.TextField()
    state = peewee.TextField()
    source_pipeline_run_id = peewee.TextField(null=True)
    created_at = peewee.TextField(default=utc_now)
    created_by = peewee.TextField()
    finished_at = peewee.TextField(null=True)

    class Meta:
        table_name = "pipeline_runs"


class PipelineStep(Record):
    pipeline_run_id = peewee.TextField()
    name = peewee.TextField()
    position = peewee.IntegerField()
    state = peewee.TextField()
    run_id = peewee.TextField(null=True)
    reused = peewee.BooleanField(default=False)
    input_digest = peewee.TextField(null=True)
    reason = peewee.TextField(null=True)
    updated_at = peewee.TextField(default=utc_now)

    class Meta:
        table_name = "pipeline_steps"
        primary_key = peewee.CompositeKey("pipeline_run_id", "name")
