"""/api/v1/projects/{pid}: pipelines (validated, immutable DAG specs) and their runs."""

from __future__ import annotations

from flask import Blueprint, current_app

from appliance.api import schemas as s
from appliance.api.pages import QUERY, page, page_schema
from appliance.api.routing import context, operation
from appliance.auth.rbac import Permission
from appliance.domain import pipelines
from appliance.domain.projects import project_for
from appliance.domain.records import Pipeline, PipelineRun
from appliance.execution.registry_check import digest_verifier

bp = Blueprint("pipelines", __name__, url_prefix="/api/v1/projects/<project_id>")
TAG = "pipelines"

PIPELINE = s.obj(
    {
        "id": s.ID,
        "project_id": s.ID,
        "name": {"type": "string"},
        "spec": {"type": "object"},
        "digest": s.DIGEST,
        "created_at": s.TIME,
        "created_by": {"type": "string"},
    }
)

STEP = s.obj(
    {
        "name": {"type": "string"},
        "state": {"enum": list(pipelines.STEP_STATES)},
        "run_id": s.NULLABLE_ID,
        "reused": {"type": "boolean"},
        "depends_on": {"type": "array", "items": {"type": "string"}},
        "reason": {"type": ["string", "null"]},
        "input_digest": {"type": ["string", "null"]},
        "updated_at": s.TIME,
    }
)

PIPELINE_RUN = s.obj(
    {
        "id": s.ID,
        "project_id": s.ID,
        "pipeline_id": s.ID,
        "state": {"enum": ["running", "succeeded", "failed"]},
        "source_pipeline_run_id": s.NULLABLE_ID,
        "steps": {"type": "array", "items": STEP},
        "created_at": s.TIME,
        "created_by": {"type": "string"},
        "finished_at": {"type": ["string", "null"]},
    }
)

PIPELINE_REQUEST = s.body(
    {
        "name": {"type": "string", "maxLength": 100},
        # The spec's own rules are checked by the domain, which lists every problem at once.
        "spec": {"type": "object"},
    }
)


def render_pipeline(pipeline: Pipeline) -> dict:
    return {
        "id": pipeline.id,
        "project_id": pipeline.project_id,
        "name": pipeline.name,
        "spec": pipeline.spec,
        "digest": pipeline.digest,
        "created_at": pipeline.created_at,
        "created_by": pipeline.created_by,
    }


def render_pipeline_run(pipeline_run: PipelineRun) -> dict:
    pipeline_run = PipelineRun.get_by_id(pipeline_run.id)
    spec = {
        step["name"]: step for step in Pipeline.get_by_id(pipeline_run.pipeline_id).spec["steps"]
    }
    return {
        "id": pipeline_run.id,
        "project_id": pipeline_run.project_id,
        "pipeline_id": pipeline_run.pipeline_id,
        "state": pipeline_run.state,
        "source_pipeline_run_id": pipeline_run.source_pipeline_run_id,
        "steps": [
            {
                "name": step.name,
                "state": step.state,
                "run_id": step.run_id,
                "reused": step.reused,
                "depends_on": pipelines.dependencies(spec[step.name]),
                "reason": step.reason,
                "input_digest": step.input_digest,
                "updated_at": step.updated_at,
            }
            for step in pipelines.steps_of(pipeline_run)
        ],
        "created_at": pipeline_run.created_at,
        "created_by": pipeline_run.created_by,
        "finished_at": pipeline_run.finished_at,
    }


def _verifier():
    config = current_app.config["ANIMUS"]
    return digest_verifier(config.registry_url, config.environment_repository)


@operation(
    bp,
    "POST",
    "/pipelines",
    summary="Create a pipeline from a JSON DAG spec (validated as a whole; immutable)",
    tag=TAG,
    body=PIPELINE_REQUEST,
    response=PIPELINE,
    status=201,
    idempotent=True,
    errors=(400, 403, 404, 409, 422),
)
def create_pipeline(project_id, body):
    ctx = context()
    project = project_for(ctx, project_id, Permission.PROJECT_WRITE)
    return render_pipeline(pipelines.create_pipeline(ctx, project, body["name"], body["spec"]))


@operation(
    bp,
    "GET",
    "/pipelines",
    summary="List pipelines",
    tag=TAG,
    query=QUERY,
    response=page_schema(PIPELINE),
    errors=(404,),
)
def list_pipelines(project_id):
    project = project_for(context(), project_id, Permission.PROJECT_READ)

    def fetch(after, limit):
        query = Pipeline.select().where(Pipeline.project_id == project.id)
        if after:
            query = query.where(Pipeline.id > after)
        return query.order_by(Pipeline.id).limit(limit)

    return page(fetch, render_pipeline)


@operation(
    bp,
    "GET",
    "/pipelines/<pipeline_id>",
    summary="Get a pipeline and its spec",
    tag=TAG,
    response=PIPELINE,
    errors=(404,),
)
def get_pipeline(project_id, pipeline_id):
    project = project_for(context(), project_id, Permission.PROJECT_READ)
    return render_pipeline(pipelines.pipeline_in(project, pipeline_id))


@operation(
    bp,
    "POST",
    "/pipelines/<pipeline_id>/runs",
    summary="Start a pipeline run: every step whose dependencies succeeded gets a Run",
    tag=TAG,
    response=PIPELINE_RUN,
    status=201,
    idempotent=True,
    errors=(403, 404, 409, 422),
)
def start_pipeline_run(project_id, pipeline_id):
    ctx = context()
    project = project_for(ctx, project_id, Permission.PROJECT_WRITE)
    pipeline = pipelines.pipeline_in(project, pipeline_id)
    return render_pipeline_run(
        pipelines.start_pipeline_run(ctx, project, pipeline, verify_digest=_verifier())
    )


@operation(
    bp,
    "GET",
    "/pipeline-runs",
    summary="List pipeline runs",
    tag=TAG,
    query=QUERY,
    response=page_schema(PIPELINE_RUN),
    errors=(404,),
)
def list_pipeline_runs(project_id):
    project = project_for(context(), project_id, Permission.PROJECT_READ)

    def fetch(after, limit):
        query = PipelineRun.select().where(PipelineRun.project_id == project.id)
        if after:
            query = query.where(PipelineRun.id > after)
        return query.order_by(PipelineRun.id).limit(limit)

    return page(fetch, render_pipeline_run)


@operation(
    bp,
    "GET",
    "/pipeline-runs/<pipeline_run_id>",
    summary="A pipeline run with the state and Run of each step",
    tag=TAG,
    response=PIPELINE_RUN,
    errors=(404,),
)
def get_pipeline_run(project_id, pipeline_run_id):
    project = project_for(context(), project_id, Permission.PROJECT_READ)
    return render_pipeline_run(pipelines.pipeline_run_in(project, pipeline_run_id))


@operation(
    bp,
    "POST",
    "/pipeline-runs/<pipeline_run_id>/rerun-from-failed",
    summary="Run a failed pipeline run again, reusing its unchanged succeeded steps",
    tag=TAG,
    response=PIPELINE_RUN,
    status=201,
    errors=(403, 404, 409, 422),
)
def rerun_from_failed(project_id, pipeline_run_id):
    ctx = context()
    project = project_for(ctx, project_id, Permission.PROJECT_WRITE)
    source = pipelines.pipeline_run_in(project, pipeline_run_id)
    return render_pipeline_run(
        pipelines.rerun_from_failed(ctx, project, source, verify_digest=_verifier())
    )
