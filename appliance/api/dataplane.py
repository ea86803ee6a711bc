"""/api/v1/dataplane: the versioned contract between the control plane and Data Plane agents.

Only a registered Data Plane's credential is accepted. Every call is idempotent: a lease
asked again returns the same runs, a state reported twice is recorded once, log chunks are
placed by offset, metrics by sequence number, artifacts by path and digest.
"""

from __future__ import annotations

import time

from flask import Blueprint, current_app, request, send_file

from appliance import db
from appliance.api import schemas as s
from appliance.api.bodies import request_body
from appliance.api.routing import context, operation
from appliance.audit import log as audit
from appliance.audit.actions import Action
from appliance.domain import runs
from appliance.domain.records import (
    Artifact,
    DataPlane,
    DatasetFile,
    ExecutionSnapshot,
    Run,
    RunMetric,
)
from appliance.errors import AnimusError, Forbidden, NotFound
from appliance.storage.blobs import BlobStore
from appliance.storage.uploads import normalize_member_path

CONTRACT_VERSION = "1"
bp = Blueprint("dataplane", __name__, url_prefix="/api/v1/dataplane")
TAG = "dataplane"


def plane() -> DataPlane:
    principal = context().principal
    if principal.kind != "data_plane":
        raise Forbidden("this endpoint is for registered Data Plane agents")
    return DataPlane.get_by_id(principal.id)


def _lease_seconds() -> int:
    return current_app.config["ANIMUS"].lease_seconds


def render_lease(run: Run) -> dict:
    snapshot = ExecutionSnapshot.get_by_id(run.snapshot_id)
    return {
        "run_id": run.id,
        "state": run.state,
        "snapshot": snapshot.snapshot,
        "snapshot_digest": snapshot.digest,
        "cancel_requested": run.cancel_requested,
        "lease_expires_at": run.lease_expires_at,
    }


@operation(
    bp,
    "POST",
    "/leases",
    summary="Lease planned runs up to the agent's free capacity",
    tag=TAG,
    body=s.body(
        {"capacity": {"type": "integer", "minimum": 0, "maximum": 256}},
        {"wait_seconds": {"type": "number", "minimum": 0, "maximum": 30}},
    ),
    response=s.obj({"runs": {"type": "array"}, "contract": {"type": "string"}}),
    errors=(403,),
)
def lease(body):
    holder = plane()
    # Long poll: an idle agent learns of a planned run within ~20 ms instead of its next poll.
    deadline = time.monotonic() + body.get("wait_seconds", 0)
    while body["capacity"] and time.monotonic() < deadline and not runs.lease_available(holder):
        db.database.close()
        time.sleep(0.02)
        db.database.connect(reuse_if_open=True)
    leased = runs.lease_runs(context(), holder, body["capacity"], _lease_seconds())
    return {
        "contract": CONTRACT_VERSION,
        "lease_seconds": _lease_seconds(),
        "runs": [render_lease(Run.get_by_id(r.id)) for r in leased],
    }


@operation(
    bp,
    "POST",
    "/reconcile",
    summary="After an agent restart: the runs it still knows; the rest are settled",
    tag=TAG,
    body=s.body(
        {"known_run_ids": {"type": "array", "maxItems": 10000, "items": {"type": "string"}}}
    ),
    response=s.obj({"settled": {"type": "array"}}),
    errors=(403,),
)
def reconcile(body):
    settled = runs.settle_forgotten_runs(context(), plane(), set(body["known_run_ids"]))
    return {"settled": [{"run_id": r.id, "state": Run.get_by_id(r.id).state} for r in settled]}


@operation(
    bp,
    "POST",
    "/runs/<run_id>/heartbeat",
    summary="Extend the lease; learn of cancels and how much was already received",
    tag=TAG,
    response=s.obj(
        {
            "state": {"type": "string"},
            "cancel_requested": {"type": "boolean"},
            "log_size": {"type": "integer"},
            "metric_count": {"type": "integer"},
        }
    ),
    errors=(403, 409),
)
def heartbeat(run_id):
    run = runs.heartbeat(context(), plane(), run_id, _lease_seconds())
    run = Run.get_by_id(run.id)
    return {
        "state": run.state,
        "cancel_requested": run.cancel_requested,
        "log_size": run.log_size,
        "metric_count": RunMetric.select().where(RunMetric.run_id == run.id).count(),
    }


@operation(
    bp,
    "GET",
    "/runs/<run_id>/secrets/<name>",
    summary="A secret value for a running run that was granted it (audited)",
    tag=TAG,
    produces="text/plain",
    errors=(403, 404, 409),
)
def secret_value(run_id, name):
    ctx = context()
    run = runs.held_run(plane(), run_id)
    if name not in run.secrets or run.state not in ("planned", "running", "reconciling"):
        raise NotFound(f"no secret {name!r} for this run")
    provider = current_app.extensions["animus.secrets"]
    value = provider.read(run.project_id, name)
    with db.write_transaction():
        audit.record(
            ctx,
            Action.SECRET_DELIVERED,
            project_id=run.project_id,
            object_type="secret",
            object_id=name,
            payload={"run_id": run.id},
        )
    response = current_app.response_class(value, mimetype="text/plain")
    response.headers["Cache-Control"] = "no-store"
    return response


@operation(
    bp,
    "POST",
    "/runs/<run_id>/state",
    summary="Report the run's state (repeats are no-ops)",
    tag=TAG,
    body=s.body(
        {"state": {"enum": ["running", "succeeded", "failed", "canceled"]}},
        {
            "exit_code": {"type": ["integer", "null"]},
            "reason": {"type": ["string", "null"], "maxLength": 200},
        },
    ),
    response=s.obj({"state": {"type": "string"}}),
    errors=(403, 409),
)
def report_state(run_id, body):
    run = runs.report_state(
        context(),
        plane(),
        run_id,
        body["state"],
        body.get("exit_code"),
        body.get("reason"),
        _lease_seconds(),
    )
    return {"state": run.state}


@operation(
    bp,
    "POST",
    "/runs/<run_id>/logs",
    summary="Append log text at an offset",
    tag=TAG,
    body=s.body(
        {
            "offset": {"type": "integer", "minimum": 0},
            "data": {"type": "string", "maxLength": 512 * 1024},
        }
    ),
    response=s.obj({"size": {"type": "integer"}}),
    errors=(403, 409),
)
def append_logs(run_id, body):
    run = runs.held_run(plane(), run_id)
    return {"size": runs.append_log(run, body["offset"], body["data"])}


@operation(
    bp,
    "POST",
    "/runs/<run_id>/metrics",
    summary="Store metric records by sequence number",
    tag=TAG,
    body=s.body(
        {
            "records": {
                "type": "array",
                "maxItems": 10000,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["seq", "name", "value"],
                    "properties": {
                        "seq": {"type": "integer", "minimum": 0},
                        "name": {"type": "string", "minLength": 1, "maxLength": 200},
                        "value": {"type": "number"},
                        "step": {"type": ["integer", "null"]},
                        "at": {"type": ["string", "null"], "maxLength": 40},
                    },
                },
            }
        }
    ),
    response=s.obj({"count": {"type": "integer"}}),
    errors=(403, 409),
)
def add_metrics(run_id, body):
    run = runs.held_run(plane(), run_id)
    return {"count": runs.add_metrics(run, body["records"])}


@operation(
    bp,
    "PUT",
    "/runs/<run_id>/artifacts/<path:path>",
    summary="Upload one output file; header X-Content-SHA256 names its digest",
    tag=TAG,
    upload=True,
    request_media="application/octet-stream",
    response=s.obj({"id": s.ID, "sha256": s.SHA256_HEX}),
    errors=(400, 403, 409, 413, 422),
)
def put_artifact(run_id, path):
    ctx = context()
    run = runs.held_run(plane(), run_id)
    path = normalize_member_path(path)
    expected = request.headers.get("X-Content-SHA256", "")
    blobs: BlobStore = current_app.extensions["animus.blobs"]
    limit = current_app.config["ANIMUS"].max_upload_bytes
    with blobs.stage() as staged:
        stored = staged.add_stream(request_body().read, max_bytes=limit)
        if stored.sha256 != expected:
            raise AnimusError(
                f"artifact {path!r} arrived with sha256 {stored.sha256}, expected {expected!r}",
                code="invalid_digest",
            )
        artifact = runs.record_artifact(
            ctx, run, path, stored.sha256, stored.size, promote=staged.promote
        )
    return {"id": artifact.id, "sha256": artifact.sha256}


@operation(
    bp,
    "GET",
    "/runs/<run_id>/inputs/<version_id>/files/<path:path>",
    summary="Download an input file of a leased run",
    tag=TAG,
    produces="application/octet-stream",
    errors=(403, 404, 409),
)
def input_file(run_id, version_id, path):
    run = runs.held_run(plane(), run_id)
    if version_id not in {i["dataset_version_id"] for i in run.inputs}:
        raise NotFound("the dataset version is not an input of this run")
    entry = DatasetFile.get_or_none(
        (DatasetFile.version_id == version_id) & (DatasetFile.path == path)
    )
    if entry is None:
        raise NotFound(f"no file {path!r} in that dataset version")
    blobs: BlobStore = current_app.extensions["animus.blobs"]
    response = send_file(
        blobs.open(entry.sha256),
        mimetype="application/octet-stream",
        etag=entry.sha256,
        max_age=None,
    )
    response.content_length = entry.size
    response.headers["X-Content-SHA256"] = entry.sha256
    return response


@operation(
    bp,
    "GET",
    "/runs/<run_id>/artifact-inputs/<artifact_id>",
    summary="Download an upstream artifact a leased run consumes (pipelines)",
    tag=TAG,
    produces="application/octet-stream",
    errors=(403, 404, 409),
)
def artifact_input(run_id, artifact_id):
    run = runs.held_run(plane(), run_id)
    snapshot = ExecutionSnapshot.get_by_id(run.snapshot_id).snapshot
    if artifact_id not in {i.get("artifact_id") for i in snapshot["inputs"]}:
        raise NotFound("the artifact is not an input of this run")
    artifact = Artifact.get_by_id(artifact_id)
    blobs: BlobStore = current_app.extensions["animus.blobs"]
    response = send_file(
        blobs.open(artifact.sha256),
        mimetype="application/octet-stream",
        etag=artifact.sha256,
        max_age=None,
    )
    response.content_length = artifact.size
    response.headers["X-Content-SHA256"] = artifact.sha256
    return response
