"""Pages of execution: runs (list, start, live state and logs, metrics, artifacts, follow-ups)
and pipelines with their DAG."""

from __future__ import annotations

import json
import shlex

from flask import Response, current_app, jsonify, redirect, request, send_file, url_for

from appliance.api.routing import context
from appliance.auth.rbac import Permission
from appliance.domain import lineage, models, pipelines, runs
from appliance.domain.records import (
    Artifact,
    CodeRef,
    Dataset,
    DatasetVersion,
    EnvironmentLock,
    ExecutionSnapshot,
    Model,
    Pipeline,
    PipelineRun,
    Run,
    RunMetric,
)
from appliance.errors import AnimusError, NotFound
from appliance.execution.registry_check import digest_verifier
from appliance.ui.charts import Node, dag_chart, metric_chart
from appliance.ui.web import (
    PAGE_SIZE,
    bp,
    config,
    field,
    form_error,
    lineage_chart,
    load_project,
    newest_first,
    page,
)

STATES = (
    "created",
    "queued",
    "planned",
    "running",
    "succeeded",
    "failed",
    "canceled",
    "unknown",
    "reconciling",
)
LOG_TAIL = 64 * 1024


def _verifier():
    settings = config()
    return digest_verifier(settings.registry_url, settings.environment_repository)


# --- the runs list ----------------------------------------------------------------------------


def _run_form_choices(project_id: str) -> dict:
    versions = list(
        DatasetVersion.select(DatasetVersion, Dataset.name.alias("dataset_name"))
        .join(Dataset, on=(DatasetVersion.dataset_id == Dataset.id))
        .where(DatasetVersion.project_id == project_id)
        .order_by(DatasetVersion.id.desc())
        .limit(100)
        .objects()
    )
    return {
        "code_refs": list(
            CodeRef.select()
            .where(CodeRef.project_id == project_id)
            .order_by(CodeRef.id.desc())
            .limit(100)
        ),
        "locks": list(
            EnvironmentLock.select()
            .where(EnvironmentLock.project_id == project_id)
            .order_by(EnvironmentLock.id.desc())
            .limit(100)
        ),
        "versions": versions,
    }


@bp.get("/projects/<project_id>/runs")
def runs_page(project_id, error: AnimusError | None = None, **values):
    view = load_project(project_id)
    state = request.args.get("state") or None
    kind = request.args.get("kind") or None
    if state is not None and state not in STATES:
        raise AnimusError(f"unknown state {state!r}", code="invalid_request")
    query = Run.select(
        Run.id,
        Run.state,
        Run.production,
        Run.command,
        Run.created_at,
        Run.created_by,
        Run.source_kind,
        Run.exit_code,
        Run.finished_at,
    ).where(Run.project_id == view.project.id)
    if state:
        query = query.where(Run.state == state)
    if kind == "production":
        query = query.where(Run.production == True)  # noqa: E712 (SQL, not Python)
    elif kind == "exploratory":
        query = query.where(Run.production == False)  # noqa: E712
    rows, older = newest_first(query, Run.id)
    choices = _run_form_choices(view.project.id) if view.can_write else {}
    return page(
        "runs.html",
        runs=rows,
        older=older,
        states=STATES,
        state=state,
        kind=kind,
        error=error,
        **choices,
        **values,
    )


@bp.get("/projects/<project_id>/runs/states")
def run_states(project_id):
    """``{run_id: state}`` for the runs a list shows, so it can update without reloading."""
    view = load_project(project_id)
    wanted = [i for i in request.args.get("ids", "").split(",") if i][:PAGE_SIZE]
    found = Run.select(Run.id, Run.state).where(
        (Run.project_id == view.project.id) & Run.id.in_(wanted)
    )
    return jsonify({r.id: r.state for r in found})


@bp.post("/projects/<project_id>/runs")
def start_run(project_id):
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_WRITE)
    form = {k: request.form.get(k, "") for k in ("command", "parameters", "code_ref_id")}
    try:
        try:
            command = shlex.split(field("command", limit=20_000))
        except ValueError as exc:
            raise AnimusError(
                f"the command cannot be split: {exc}", code="invalid_request"
            ) from None
        raw = request.form.get("parameters", "").strip() or "{}"
        try:
            parameters = json.loads(raw)
        except ValueError:
            raise AnimusError("parameters must be a JSON object", code="invalid_request") from None
        if not isinstance(parameters, dict):
            raise AnimusError("parameters must be a JSON object", code="invalid_request")
        inputs = [
            {"dataset_version_id": version_id, "name": f"input{index}" if index else "train"}
            for index, version_id in enumerate(request.form.getlist("dataset_version_id")[:64])
            if version_id
        ]
        spec = {
            "code_ref_id": field("code_ref_id", limit=64),
            "environment_lock_id": field("environment_lock_id", limit=64),
            "inputs": inputs,
            "command": command,
            "parameters": parameters,
            "production": request.form.get("production") == "on",
        }
        run = runs.create_run(ctx, view.project, spec, verify_digest=_verifier())
    except AnimusError as error:
        return form_error(runs_page, error, project_id=project_id, form=form)
    return redirect(url_for("ui.run", project_id=project_id, run_id=run.id))


# --- one run ----------------------------------------------------------------------------------


def _metric_series(run: Run) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    for metric in (
        RunMetric.select(RunMetric.name, RunMetric.value, RunMetric.step, RunMetric.seq)
        .where(RunMetric.run_id == run.id)
        .order_by(RunMetric.seq)
        .limit(20_000)
    ):
        points = series.setdefault(metric.name, [])
        points.append((metric.step if metric.step is not None else len(points), metric.value))
    return series


@bp.get("/projects/<project_id>/runs/<run_id>")
def run(project_id, run_id, error: AnimusError | None = None):
    view = load_project(project_id)
    found = runs.run_in(view.project, run_id)
    snapshot = ExecutionSnapshot.get_or_none(ExecutionSnapshot.run_id == found.id)
    offset = max(0, found.log_size - LOG_TAIL)
    series = _metric_series(found)
    charts = {name: metric_chart(name, points) for name, points in sorted(series.items())}
    artifacts = list(
        Artifact.select().where(Artifact.run_id == found.id).order_by(Artifact.path).limit(500)
    )
    versions = {
        v.id: v
        for v in DatasetVersion.select().where(
            DatasetVersion.id.in_([i["dataset_version_id"] for i in found.inputs] or [""])
        )
    }
    dataset_names = {
        d.id: d.name
        for d in Dataset.select().where(
            Dataset.id.in_([v.dataset_id for v in versions.values()] or [""])
        )
    }
    model_choices = (
        list(
            Model.select()
            .where(Model.project_id == view.project.id)
            .order_by(Model.name)
            .limit(200)
        )
        if view.can_write and found.state == "succeeded" and artifacts
        else []
    )
    return page(
        "run.html",
        run=found,
        snapshot=snapshot,
        code_ref=CodeRef.get_or_none(CodeRef.id == found.code_ref_id),
        lock=EnvironmentLock.get_or_none(EnvironmentLock.id == found.environment_lock_id),
        versions=versions,
        dataset_names=dataset_names,
        log=runs.read_log(found, offset),
        log_offset=found.log_size,
        log_truncated=offset > 0,
        charts=charts,
        final_metrics={name: points[-1][1] for name, points in series.items()},
        artifacts=artifacts,
        reproducibility=runs.reproducibility(found),
        approvals=runs.approvals_of(found),
        models=model_choices,
        error=error,
    )


@bp.get("/projects/<project_id>/runs/<run_id>/log")
def run_log(project_id, run_id):
    """Log text from ``?offset=``; headers carry the next offset and the run's state."""
    view = load_project(project_id)
    found = runs.run_in(view.project, run_id)
    raw = request.args.get("offset", "0")
    if not raw.isdigit():
        raise AnimusError("offset must be a non-negative integer", code="invalid_request")
    offset = int(raw)
    text = runs.read_log(found, offset)[: 1 << 20]
    response = Response(text, mimetype="text/plain")
    response.headers["X-Log-Offset"] = str(offset + len(text))
    response.headers["X-Run-State"] = found.state
    return response


@bp.get("/projects/<project_id>/runs/<run_id>/artifacts/<path:path>")
def download_artifact(project_id, run_id, path):
    view = load_project(project_id)
    found = runs.run_in(view.project, run_id)
    artifact = Artifact.get_or_none((Artifact.run_id == found.id) & (Artifact.path == path))
    if artifact is None:
        raise NotFound(f"no artifact {path!r} in this run")
    response = send_file(
        current_app.extensions["animus.blobs"].open(artifact.sha256),
        mimetype="application/octet-stream",
        as_attachment=True,
        download_name=path.rsplit("/", 1)[-1],
        etag=artifact.sha256,
        max_age=None,
    )
    response.content_length = artifact.size
    return response


@bp.post("/projects/<project_id>/runs/<run_id>/<any(rerun, replay, retry):kind>")
def follow_up(project_id, run_id, kind):
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_WRITE)
    source = runs.run_in(view.project, run_id)
    try:
        created = runs.follow_up(ctx, view.project, source, kind, _verifier())
    except AnimusError as error:
        return form_error(run, error, project_id=project_id, run_id=run_id)
    return redirect(url_for("ui.run", project_id=project_id, run_id=created.id))


@bp.post("/projects/<project_id>/runs/<run_id>/cancel")
def cancel_run(project_id, run_id):
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_WRITE)
    found = runs.run_in(view.project, run_id)
    try:
        runs.cancel_run(ctx, found)
    except AnimusError as error:
        return form_error(run, error, project_id=project_id, run_id=run_id)
    return redirect(url_for("ui.run", project_id=project_id, run_id=run_id))


@bp.post("/projects/<project_id>/runs/<run_id>/approve")
def approve_run(project_id, run_id):
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_ADMIN)
    found = runs.run_in(view.project, run_id)
    try:
        runs.approve_run(ctx, found, field("reason", limit=2000))
    except AnimusError as error:
        return form_error(run, error, project_id=project_id, run_id=run_id)
    return redirect(url_for("ui.run", project_id=project_id, run_id=run_id))


@bp.post("/projects/<project_id>/runs/<run_id>/register")
def register_model_version(project_id, run_id):
    """Register one of the run's artifacts as a new version of a model."""
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_WRITE)
    found = runs.run_in(view.project, run_id)
    try:
        model = models.model_in(view.project, field("model_id", limit=64))
        version = models.register_version(
            ctx, view.project, model, found.id, field("artifact_path", limit=1024)
        )
    except AnimusError as error:
        return form_error(run, error, project_id=project_id, run_id=run_id, inline_not_found=True)
    return redirect(url_for("ui.model_version", project_id=project_id, version_id=version.id))


@bp.get("/projects/<project_id>/runs/<run_id>/lineage")
def run_lineage(project_id, run_id):
    view = load_project(project_id)
    found = runs.run_in(view.project, run_id)
    graph = lineage.lineage_graph(view.project, found.id, max_nodes=80)
    return page(
        "lineage.html",
        subject=f"run {found.id}",
        graph=graph,
        chart=lineage_chart(view.project.id, graph),
    )


# --- pipelines --------------------------------------------------------------------------------


@bp.get("/projects/<project_id>/pipelines")
def pipelines_page(project_id, error: AnimusError | None = None, **values):
    view = load_project(project_id)
    defined = list(
        Pipeline.select()
        .where(Pipeline.project_id == view.project.id)
        .order_by(Pipeline.name)
        .limit(200)
    )
    pipeline_runs, older = newest_first(
        PipelineRun.select().where(PipelineRun.project_id == view.project.id), PipelineRun.id
    )
    names = {p.id: p.name for p in defined}
    return page(
        "pipelines.html",
        pipelines=defined,
        pipeline_runs=pipeline_runs,
        names=names,
        older=older,
        error=error,
        **values,
    )


@bp.post("/projects/<project_id>/pipelines")
def create_pipeline(project_id):
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_WRITE)
    spec_text = request.form.get("spec", "")
    try:
        try:
            spec = json.loads(field("spec", limit=500_000))
        except ValueError as exc:
            raise AnimusError(
                f"the spec is not valid JSON: {exc}", code="invalid_request"
            ) from None
        pipelines.create_pipeline(ctx, view.project, field("name", limit=100).strip(), spec)
    except AnimusError as error:
        return form_error(pipelines_page, error, project_id=project_id, spec_text=spec_text)
    return redirect(url_for("ui.pipelines_page", project_id=project_id))


@bp.post("/projects/<project_id>/pipelines/<pipeline_id>/runs")
def start_pipeline_run(project_id, pipeline_id):
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_WRITE)
    pipeline = pipelines.pipeline_in(view.project, pipeline_id)
    try:
        started = pipelines.start_pipeline_run(
            ctx, view.project, pipeline, verify_digest=_verifier()
        )
    except AnimusError as error:
        return form_error(pipelines_page, error, project_id=project_id)
    return redirect(url_for("ui.pipeline_run", project_id=project_id, pipeline_run_id=started.id))


def pipeline_dag(project_id: str, pipeline: Pipeline, steps: dict) -> object:
    nodes, edges = [], []
    for step in pipeline.spec.get("steps", []):
        recorded = steps.get(step["name"])
        state = recorded.state if recorded else "pending"
        href = (
            url_for("ui.run", project_id=project_id, run_id=recorded.run_id)
            if recorded is not None and recorded.run_id
            else None
        )
        note = state + (" (reused)" if recorded is not None and recorded.reused else "")
        nodes.append(Node(id=step["name"], label=step["name"], kind=state, href=href, note=note))
        edges.extend((dependency, step["name"]) for dependency in pipelines.dependencies(step))
    return dag_chart(nodes, edges, f"pipeline {pipeline.name}: {len(nodes)} steps")


@bp.get("/projects/<project_id>/pipeline-runs/<pipeline_run_id>")
def pipeline_run(project_id, pipeline_run_id, error: AnimusError | None = None):
    view = load_project(project_id)
    found = pipelines.pipeline_run_in(view.project, pipeline_run_id)
    pipeline = Pipeline.get_by_id(found.pipeline_id)
    steps = {s.name: s for s in pipelines.steps_of(found)}
    return page(
        "pipeline_run.html",
        pipeline_run=found,
        pipeline=pipeline,
        steps=list(steps.values()),
        chart=pipeline_dag(view.project.id, pipeline, steps),
        error=error,
    )


@bp.post("/projects/<project_id>/pipeline-runs/<pipeline_run_id>/rerun-from-failed")
def rerun_pipeline(project_id, pipeline_run_id):
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_WRITE)
    source = pipelines.pipeline_run_in(view.project, pipeline_run_id)
    try:
        started = pipelines.rerun_from_failed(ctx, view.project, source, verify_digest=_verifier())
    except AnimusError as error:
        return form_error(
            pipeline_run, error, project_id=project_id, pipeline_run_id=pipeline_run_id
        )
    return redirect(url_for("ui.pipeline_run", project_id=project_id, pipeline_run_id=started.id))
