"""/api/v1/projects/{pid}/runs: create, read, follow logs, metrics, artifacts, cancel, rerun."""

from __future__ import annotations

import time

from flask import Blueprint, Response, current_app, request, send_file, stream_with_context

from appliance.api import schemas as s
from appliance.api.pages import QUERY, page, page_schema
from appliance.api.routing import context, operation
from appliance.auth.rbac import Permission
from appliance.domain import runs
from appliance.domain.projects import project_for
from appliance.domain.records import Artifact, ExecutionSnapshot, Run, RunMetric
from appliance.errors import AnimusError, NotFound
from appliance.execution.registry_check import digest_verifier

bp = Blueprint("runs", __name__, url_prefix="/api/v1/projects/<project_id>/runs")
TAG = "runs"

RUN = s.obj(
    {
        "id": s.ID,
        "project_id": s.ID,
        "state": {
            "enum": [
                "created",
                "queued",
                "planned",
                "running",
                "succeeded",
                "failed",
                "canceled",
                "unknown",
                "reconciling",
            ]
        },
        "production": {"type": "boolean"},
        "code_ref_id": s.ID,
        "environment_lock_id": s.ID,
        "inputs": {"type": "array"},
        "command": {"type": "array", "items": {"type": "string"}},
        "parameters": {"type": "object"},
        "limitations": {"type": "array", "items": {"type": "string"}},
        "source_run_id": s.NULLABLE_ID,
        "source_kind": {"type": ["string", "null"]},
        "snapshot_digest": {"type": ["string", "null"]},
        "exit_code": {"type": ["integer", "null"]},
        "reason": {"type": ["string", "null"]},
        "created_at": s.TIME,
    },
    {"reproducibility": {"type": ["object", "null"]}},
)

RUN_REQUEST = s.body(
    {
        "code_ref_id": {"type": "string", "maxLength": 64},
        "environment_lock_id": {"type": "string", "maxLength": 64},
        "command": {
            "type": "array",
            "minItems": 1,
            "maxItems": 256,
            "items": {"type": "string", "maxLength": 4096},
        },
    },
    {
        "inputs": {
            "type": "array",
            "maxItems": 64,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["dataset_version_id"],
                "properties": {
                    "dataset_version_id": {"type": "string", "maxLength": 64},
                    "name": {"type": "string", "maxLength": 64},
                },
            },
        },
        "parameters": {"type": "object", "maxProperties": 256},
        "env": {
            "type": "object",
            "maxProperties": 256,
            "additionalProperties": {"type": "string", "maxLength": 4096},
        },
        "secrets": {"type": "array", "maxItems": 64, "items": {"type": "string", "maxLength": 200}},
        "resources": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "cpu": {"type": "number", "exclusiveMinimum": 0},
                "memory_mb": {"type": "integer", "minimum": 16},
                "pids": {"type": "integer", "minimum": 8},
                "timeout_seconds": {"type": "integer", "minimum": 1},
            },
        },
        "production": {"type": "boolean"},
    },
)


def render_run(run: Run, *, detail: bool = False) -> dict:
    snapshot = ExecutionSnapshot.get_or_none(ExecutionSnapshot.run_id == run.id) if detail else None
    rendered = {
        "id": run.id,
        "project_id": run.project_id,
        "state": run.state,
        "production": run.production,
        "code_ref_id": run.code_ref_id,
        "environment_lock_id": run.environment_lock_id,
        "inputs": run.inputs,
        "command": run.command,
        "parameters": run.parameters,
        "env": run.env,
        "secrets": run.secrets,
        "resources": run.resources,
        "limitations": run.limitations,
        "source_run_id": run.source_run_id,
        "source_kind": run.source_kind,
        "policy_snapshot_id": run.policy_snapshot_id,
        "snapshot_digest": snapshot.digest if snapshot else None,
        "cancel_requested": run.cancel_requested,
        "exit_code": run.exit_code,
        "reason": run.reason,
        "created_at": run.created_at,
        "created_by": run.created_by,
        "queued_at": run.queued_at,
        "planned_at": run.planned_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
    }
    if detail:
        rendered["reproducibility"] = runs.reproducibility(run)
        rendered["approvals"] = runs.approvals_of(run)
    return rendered


def _verifier():
    config = current_app.config["ANIMUS"]
    return digest_verifier(config.registry_url, config.environment_repository)


@operation(
    bp,
    "POST",
    "",
    summary="Create a Run (queued for planning)",
    tag=TAG,
    body=RUN_REQUEST,
    response=RUN,
    status=201,
    idempotent=True,
    errors=(400, 403, 404, 409, 422),
)
def create_run(project_id, body):
    ctx = context()
    project = project_for(ctx, project_id, Permission.PROJECT_WRITE)
    return render_run(runs.create_run(ctx, project, body, verify_digest=_verifier()))


@operation(
    bp,
    "GET",
    "",
    summary="List runs, newest last (filter: ?state=)",
    tag=TAG,
    query={**QUERY, "state": {"type": "string"}},
    response=page_schema(RUN),
    errors=(404,),
)
def list_runs(project_id):
    project = project_for(context(), project_id, Permission.PROJECT_READ)
    state = request.args.get("state")

    def fetch(after, limit):
        query = Run.select().where(Run.project_id == project.id)
        if state:
            query = query.where(Run.state == state)
        if after:
            query = query.where(Run.id > after)
        return query.order_by(Run.id).limit(limit)

    return page(fetch, render_run)


def _run(project_id: str, run_id: str, permission=Permission.PROJECT_READ) -> Run:
    project = project_for(context(), project_id, permission)
    return runs.run_in(project, run_id)


@operation(
    bp,
    "GET",
    "/<run_id>",
    summary="Get a run, with its reproducibility verdict",
    tag=TAG,
    response=RUN,
    errors=(404,),
)
def get_run(project_id, run_id):
    return render_run(_run(project_id, run_id), detail=True)


@operation(
    bp,
    "GET",
    "/<run_id>/snapshot",
    summary="The run's frozen execution snapshot",
    tag=TAG,
    response={"type": "object"},
    errors=(404,),
)
def get_snapshot(project_id, run_id):
    run = _run(project_id, run_id)
    snapshot = ExecutionSnapshot.get_or_none(ExecutionSnapshot.run_id == run.id)
    if snapshot is None:
        raise NotFound("the run has not been planned yet")
    return {
        "id": snapshot.id,
        "digest": snapshot.digest,
        "snapshot": snapshot.snapshot,
        "created_at": snapshot.created_at,
    }


@operation(
    bp,
    "GET",
    "/<run_id>/logs",
    summary="The run's log from ?offset=; ?follow=1 streams until the run ends",
    tag=TAG,
    query={"offset": {"type": "integer", "minimum": 0}, "follow": {"type": "boolean"}},
    produces="text/plain",
    errors=(404,),
)
def get_logs(project_id, run_id):
    run = _run(project_id, run_id)
    raw = request.args.get("offset", "0")
    if not raw.isdigit():
        raise AnimusError("offset must be a non-negative integer", code="invalid_request")
    offset = int(raw)
    if request.args.get("follow") not in ("1", "true"):
        text = runs.read_log(run, offset)
        response = Response(text, mimetype="text/plain")
        response.headers["X-Log-Offset"] = str(offset + len(text))
        return response

    def follow():
        from appliance import db

        position, deadline = offset, time.monotonic() + 3600
        while time.monotonic() < deadline:
            db.database.connect(reuse_if_open=True)
            try:
                current = Run.get_by_id(run.id)
                text = runs.read_log(current, position)
            finally:
                db.database.close()
            if text:
                position += len(text)
                yield text
            if current.state in runs.TERMINAL:
                return
            time.sleep(0.5)

    return Response(stream_with_context(follow()), mimetype="text/plain")


@operation(
    bp,
    "GET",
    "/<run_id>/metrics",
    summary="The run's metrics, grouped by name",
    tag=TAG,
    response={"type": "object"},
    errors=(404,),
)
def get_metrics(project_id, run_id):
    run = _run(project_id, run_id)
    series: dict[str, list] = {}
    for metric in RunMetric.select().where(RunMetric.run_id == run.id).order_by(RunMetric.seq):
        series.setdefault(metric.name, []).append(
            {"value": metric.value, "step": metric.step, "at": metric.at}
        )
    return {"run_id": run.id, "metrics": series}


def render_artifact(artifact: Artifact) -> dict:
    return {
        "id": artifact.id,
        "run_id": artifact.run_id,
        "path": artifact.path,
        "sha256": artifact.sha256,
        "size": artifact.size,
        "created_at": artifact.created_at,
    }


@operation(
    bp,
    "GET",
    "/<run_id>/artifacts",
    summary="The run's output artifacts with digests",
    tag=TAG,
    response={"type": "array"},
    errors=(404,),
)
def list_artifacts(project_id, run_id):
    run = _run(project_id, run_id)
    return [
        render_artifact(a)
        for a in Artifact.select().where(Artifact.run_id == run.id).order_by(Artifact.path)
    ]


@operation(
    bp,
    "GET",
    "/<run_id>/artifacts/<path:path>",
    summary="Download an artifact",
    tag=TAG,
    produces="application/octet-stream",
    errors=(404,),
)
def download_artifact(project_id, run_id, path):
    run = _run(project_id, run_id)
    artifact = Artifact.get_or_none((Artifact.run_id == run.id) & (Artifact.path == path))
    if artifact is None:
        raise NotFound(f"no artifact {path!r} in this run")
    blobs = current_app.extensions["animus.blobs"]
    response = send_file(
        blobs.open(artifact.sha256),
        mimetype="application/octet-stream",
        as_attachment=True,
        download_name=path.rsplit("/", 1)[-1],
        etag=artifact.sha256,
        max_age=None,
    )
    response.content_length = artifact.size
    return response


@operation(
    bp,
    "POST",
    "/<run_id>/approve",
    summary="Approve a production run awaiting approvals (project admins; not its creator)",
    tag=TAG,
    body=s.body({"reason": {"type": "string", "minLength": 1, "maxLength": 2000}}),
    response=RUN,
    errors=(400, 403, 404, 409, 422),
)
def approve_run(project_id, run_id, body):
    run = _run(project_id, run_id, Permission.PROJECT_ADMIN)
    return render_run(runs.approve_run(context(), run, body["reason"]), detail=True)


@operation(
    bp,
    "POST",
    "/<run_id>/cancel",
    summary="Cancel a run",
    tag=TAG,
    response=RUN,
    errors=(403, 404, 409),
)
def cancel_run(project_id, run_id):
    run = _run(project_id, run_id, Permission.PROJECT_WRITE)
    return render_run(runs.cancel_run(context(), run))


def _follow_up(project_id: str, run_id: str, kind: str) -> dict:
    ctx = context()
    project = project_for(ctx, project_id, Permission.PROJECT_WRITE)
    source = runs.run_in(project, run_id)
    return render_run(runs.follow_up(ctx, project, source, kind, _verifier()))


@operation(
    bp,
    "POST",
    "/<run_id>/rerun",
    summary="Run the same request again (re-planned)",
    tag=TAG,
    response=RUN,
    status=201,
    errors=(403, 404, 409, 422),
)
def rerun(project_id, run_id):
    return _follow_up(project_id, run_id, "rerun")


@operation(
    bp,
    "POST",
    "/<run_id>/retry",
    summary="Run a failed run again",
    tag=TAG,
    response=RUN,
    status=201,
    errors=(403, 404, 409, 422),
)
def retry(project_id, run_id):
    return _follow_up(project_id, run_id, "retry")


@operation(
    bp,
    "POST",
    "/<run_id>/replay",
    summary="Run the source's frozen execution snapshot again and compare artifacts",
    tag=TAG,
    response=RUN,
    status=201,
    errors=(403, 404, 409, 422),
)
def replay(project_id, run_id):
    return _follow_up(project_id, run_id, "replay")
