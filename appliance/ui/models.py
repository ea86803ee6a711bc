"""Pages of the model registry: models, versions, approval, rejection and signed export."""

from __future__ import annotations

from flask import current_app, redirect, send_file, url_for

from appliance.api.routing import context
from appliance.audit.export_package import Signer
from appliance.auth.rbac import Permission
from appliance.domain import lineage, models
from appliance.domain.records import Model, ModelExport, ModelVersion
from appliance.errors import AnimusError
from appliance.ui.web import (
    LINEAGE_NODES,
    bp,
    config,
    field,
    form_error,
    lineage_chart,
    load_project,
    newest_first,
    page,
)


def _signer() -> Signer:
    settings = config()
    return Signer(settings.gnupg_home, settings.signing_key)


@bp.get("/projects/<project_id>/models")
def models_page(project_id, error: AnimusError | None = None, **values):
    view = load_project(project_id)
    rows, older = newest_first(Model.select().where(Model.project_id == view.project.id), Model.id)
    latest: dict[str, ModelVersion] = {}
    if rows:
        for version in ModelVersion.select().where(ModelVersion.model_id.in_([m.id for m in rows])):
            known = latest.get(version.model_id)
            if known is None or version.number > known.number:
                latest[version.model_id] = version
    return page("models.html", models=rows, latest=latest, older=older, error=error, **values)


@bp.post("/projects/<project_id>/models")
def create_model(project_id):
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_WRITE)
    try:
        model = models.create_model(
            ctx,
            view.project,
            field("name", limit=100).strip(),
            field("description", required=False, limit=2000),
        )
    except AnimusError as error:
        return form_error(models_page, error, project_id=project_id)
    return redirect(url_for("ui.model", project_id=project_id, model_id=model.id))


@bp.get("/projects/<project_id>/models/<model_id>")
def model(project_id, model_id):
    view = load_project(project_id)
    found = models.model_in(view.project, model_id)
    versions = list(
        ModelVersion.select()
        .where(ModelVersion.model_id == found.id)
        .order_by(ModelVersion.number.desc())
        .limit(200)
    )
    return page("model.html", model=found, versions=versions)


@bp.get("/projects/<project_id>/model-versions/<version_id>")
def model_version(project_id, version_id, error: AnimusError | None = None):
    view = load_project(project_id)
    version = models.version_in(view.project, version_id)
    exports = list(
        ModelExport.select()
        .where(ModelExport.model_version_id == version.id)
        .order_by(ModelExport.created_at.desc())
        .limit(50)
    )
    graph = lineage.lineage_graph(view.project, version.id, max_nodes=LINEAGE_NODES)
    return page(
        "model_version.html",
        version=version,
        model=Model.get_by_id(version.model_id),
        exports=exports,
        chart=lineage_chart(view.project.id, graph),
        needs_approval=view.project.policy.get("export_requires_approval", True),
        error=error,
    )


@bp.post("/projects/<project_id>/model-versions/<version_id>/<any(approve, reject):decision>")
def decide_model_version(project_id, version_id, decision):
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_ADMIN)
    version = models.version_in(view.project, version_id)
    try:
        models.decide(ctx, version, decision, field("reason", limit=2000))
    except AnimusError as error:
        return form_error(model_version, error, project_id=project_id, version_id=version_id)
    return redirect(url_for("ui.model_version", project_id=project_id, version_id=version_id))


@bp.post("/projects/<project_id>/model-versions/<version_id>/export")
def export_model_version(project_id, version_id):
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_WRITE)
    version = models.version_in(view.project, version_id)
    try:
        models.export_version(
            ctx, view.project, version, _signer(), current_app.extensions["animus.blobs"]
        )
    except AnimusError as error:
        return form_error(model_version, error, project_id=project_id, version_id=version_id)
    return redirect(url_for("ui.model_version", project_id=project_id, version_id=version_id))


@bp.get("/projects/<project_id>/model-versions/<version_id>/export")
def download_model_export(project_id, version_id):
    view = load_project(project_id)
    version = models.version_in(view.project, version_id)
    export = models.latest_export(version)
    owner = Model.get_by_id(version.model_id)
    response = send_file(
        current_app.extensions["animus.blobs"].open(export.sha256),
        mimetype="application/x-tar",
        as_attachment=True,
        download_name=f"{owner.name}-v{version.number}-{export.id}.tar",
        etag=export.sha256,
        max_age=None,
    )
    response.content_length = export.size
    return response
