"""/api/v1 models: models, versions from a run's artifact, approval, signed export; lineage;
and the installation's signing key."""

from __future__ import annotations

from flask import Blueprint, current_app, send_file

from appliance.api import schemas as s
from appliance.api.pages import QUERY, page, page_schema
from appliance.api.routing import context, operation
from appliance.audit.export_package import Signer, current_signing_key
from appliance.auth.rbac import Permission
from appliance.domain import lineage, models
from appliance.domain.projects import project_for
from appliance.domain.records import Model, ModelExport, ModelVersion

bp = Blueprint("models", __name__, url_prefix="/api/v1")
TAG = "models"
PROJECT = "/projects/<project_id>"

MODEL = s.obj(
    {
        "id": s.ID,
        "project_id": s.ID,
        "name": {"type": "string"},
        "description": {"type": "string"},
        "created_at": s.TIME,
        "created_by": {"type": "string"},
    }
)

EXPORT = s.obj(
    {
        "id": s.ID,
        "model_version_id": s.ID,
        "sha256": s.SHA256_HEX,
        "size": {"type": "integer"},
        "manifest_sha256": s.SHA256_HEX,
        "signing_fingerprint": {"type": "string"},
        "created_at": s.TIME,
        "created_by": {"type": "string"},
    }
)

MODEL_VERSION = s.obj(
    {
        "id": s.ID,
        "project_id": s.ID,
        "model_id": s.ID,
        "number": {"type": "integer"},
        "stage": {"enum": ["registered", "approved", "rejected", "exported"]},
        "source_run_id": s.ID,
        "artifact_id": s.ID,
        "artifact_path": {"type": "string"},
        "artifact_sha256": s.SHA256_HEX,
        "artifact_size": {"type": "integer"},
        "metrics": {"type": "object", "additionalProperties": {"type": "number"}},
        "created_at": s.TIME,
        "created_by": {"type": "string"},
        "decided_at": {"type": ["string", "null"]},
        "decided_by": {"type": ["string", "null"]},
        "decision_reason": {"type": ["string", "null"]},
        "exported_at": {"type": ["string", "null"]},
    },
    {"latest_export": {"oneOf": [{"type": "null"}, EXPORT]}},
)

LINEAGE = s.obj(
    {
        "root": s.ID,
        "nodes": {
            "type": "array",
            "items": s.obj(
                {
                    "id": s.ID,
                    "type": {"enum": list(lineage.NODE_TYPES)},
                    "label": {"type": "string"},
                }
            ),
        },
        "edges": {
            "type": "array",
            "items": s.obj(
                {"from": s.ID, "to": s.ID, "kind": {"type": "string"}},
            ),
        },
        "truncated": {"type": "boolean"},
    }
)

SIGNING_KEY = s.obj(
    {
        "fingerprint": {"type": "string", "pattern": "^[0-9A-F]{40,64}$"},
        "algorithm": {"type": "string"},
        "public_key": {"type": "string", "description": "ASCII-armored OpenPGP public key"},
    }
)

MODEL_REQUEST = s.body(
    {"name": {"type": "string", "minLength": 1, "maxLength": 100}},
    {"description": {"type": "string", "maxLength": 2000}},
)
VERSION_REQUEST = s.body(
    {
        "run_id": {"type": "string", "maxLength": 64},
        "artifact_path": {"type": "string", "minLength": 1, "maxLength": 1024},
    }
)
DECISION_REQUEST = s.body({"reason": {"type": "string", "minLength": 1, "maxLength": 2000}})


def render_model(model: Model) -> dict:
    return {
        "id": model.id,
        "project_id": model.project_id,
        "name": model.name,
        "description": model.description,
        "created_at": model.created_at,
        "created_by": model.created_by,
    }


def render_export(export: ModelExport) -> dict:
    return {
        "id": export.id,
        "model_version_id": export.model_version_id,
        "sha256": export.sha256,
        "size": export.size,
        "manifest_sha256": export.manifest_sha256,
        "signing_fingerprint": export.signing_fingerprint,
        "created_at": export.created_at,
        "created_by": export.created_by,
    }


def render_version(version: ModelVersion) -> dict:
    latest = (
        ModelExport.select()
        .where(ModelExport.model_version_id == version.id)
        .order_by(ModelExport.created_at.desc(), ModelExport.id.desc())
        .first()
    )
    return {
        "id": version.id,
        "project_id": version.project_id,
        "model_id": version.model_id,
        "number": version.number,
        "stage": version.stage,
        "source_run_id": version.source_run_id,
        "artifact_id": version.artifact_id,
        "artifact_path": version.artifact_path,
        "artifact_sha256": version.artifact_sha256,
        "artifact_size": version.artifact_size,
        "metrics": version.metrics,
        "created_at": version.created_at,
        "created_by": version.created_by,
        "decided_at": version.decided_at,
        "decided_by": version.decided_by,
        "decision_reason": version.decision_reason,
        "exported_at": version.exported_at,
        "latest_export": render_export(latest) if latest else None,
    }


def _signer() -> Signer:
    config = current_app.config["ANIMUS"]
    return Signer(config.gnupg_home, config.signing_key)


# --- models -----------------------------------------------------------------------------------


@operation(
    bp,
    "POST",
    f"{PROJECT}/models",
    summary="Create a model",
    tag=TAG,
    body=MODEL_REQUEST,
    response=MODEL,
    status=201,
    idempotent=True,
    errors=(400, 403, 404, 409, 422),
)
def create_model(project_id, body):
    ctx = context()
    project = project_for(ctx, project_id, Permission.PROJECT_WRITE)
    return render_model(
        models.create_model(ctx, project, body["name"], body.get("description", ""))
    )


@operation(
    bp,
    "GET",
    f"{PROJECT}/models",
    summary="List models",
    tag=TAG,
    query=QUERY,
    response=page_schema(MODEL),
    errors=(404,),
)
def list_models(project_id):
    project = project_for(context(), project_id, Permission.PROJECT_READ)

    def fetch(after, limit):
        query = Model.select().where(Model.project_id == project.id)
        if after:
            query = query.where(Model.id > after)
        return query.order_by(Model.id).limit(limit)

    return page(fetch, render_model)


@operation(
    bp,
    "GET",
    f"{PROJECT}/models/<model_id>",
    summary="Get a model",
    tag=TAG,
    response=MODEL,
    errors=(404,),
)
def get_model(project_id, model_id):
    project = project_for(context(), project_id, Permission.PROJECT_READ)
    return render_model(models.model_in(project, model_id))


@operation(
    bp,
    "POST",
    f"{PROJECT}/models/<model_id>/versions",
    summary="Register a version from a succeeded run's artifact (records its final metrics)",
    tag=TAG,
    body=VERSION_REQUEST,
    response=MODEL_VERSION,
    status=201,
    idempotent=True,
    errors=(400, 403, 404, 409, 422),
)
def create_version(project_id, model_id, body):
    ctx = context()
    project = project_for(ctx, project_id, Permission.PROJECT_WRITE)
    model = models.model_in(project, model_id)
    return render_version(
        models.register_version(ctx, project, model, body["run_id"], body["artifact_path"])
    )


@operation(
    bp,
    "GET",
    f"{PROJECT}/models/<model_id>/versions",
    summary="List a model's versions",
    tag=TAG,
    query=QUERY,
    response=page_schema(MODEL_VERSION),
    errors=(404,),
)
def list_versions(project_id, model_id):
    project = project_for(context(), project_id, Permission.PROJECT_READ)
    model = models.model_in(project, model_id)

    def fetch(after, limit):
        query = ModelVersion.select().where(ModelVersion.model_id == model.id)
        if after:
            query = query.where(ModelVersion.id > after)
        return query.order_by(ModelVersion.id).limit(limit)

    return page(fetch, render_version)


# --- versions ---------------------------------------------------------------------------------


@operation(
    bp,
    "GET",
    f"{PROJECT}/model-versions/<model_version_id>",
    summary="Get a model version",
    tag=TAG,
    response=MODEL_VERSION,
    errors=(404,),
)
def get_version(project_id, model_version_id):
    project = project_for(context(), project_id, Permission.PROJECT_READ)
    return render_version(models.version_in(project, model_version_id))


def _decide(project_id: str, model_version_id: str, decision: str, reason: str) -> dict:
    ctx = context()
    project = project_for(ctx, project_id, Permission.PROJECT_ADMIN)
    version = models.version_in(project, model_version_id)
    return render_version(models.decide(ctx, version, decision, reason))


@operation(
    bp,
    "POST",
    f"{PROJECT}/model-versions/<model_version_id>/approve",
    summary="Approve a registered version (project admins; the reason is audited)",
    tag=TAG,
    body=DECISION_REQUEST,
    response=MODEL_VERSION,
    errors=(400, 403, 404, 409, 422),
)
def approve_version(project_id, model_version_id, body):
    return _decide(project_id, model_version_id, "approve", body["reason"])


@operation(
    bp,
    "POST",
    f"{PROJECT}/model-versions/<model_version_id>/reject",
    summary="Reject a registered version (project admins; the reason is audited)",
    tag=TAG,
    body=DECISION_REQUEST,
    response=MODEL_VERSION,
    errors=(400, 403, 404, 409, 422),
)
def reject_version(project_id, model_version_id, body):
    return _decide(project_id, model_version_id, "reject", body["reason"])


@operation(
    bp,
    "POST",
    f"{PROJECT}/model-versions/<model_version_id>/export",
    summary="Write the version's signed export package into the blob store",
    tag=TAG,
    response=EXPORT,
    status=201,
    errors=(403, 404, 409, 503),
)
def export_version(project_id, model_version_id):
    ctx = context()
    project = project_for(ctx, project_id, Permission.PROJECT_WRITE)
    version = models.version_in(project, model_version_id)
    blobs = current_app.extensions["animus.blobs"]
    return render_export(models.export_version(ctx, project, version, _signer(), blobs))


@operation(
    bp,
    "GET",
    f"{PROJECT}/model-versions/<model_version_id>/export",
    summary="Download the version's latest export package (tar)",
    tag=TAG,
    produces="application/x-tar",
    errors=(404,),
)
def download_export(project_id, model_version_id):
    project = project_for(context(), project_id, Permission.PROJECT_READ)
    version = models.version_in(project, model_version_id)
    export = models.latest_export(version)
    model = Model.get_by_id(version.model_id)
    response = send_file(
        current_app.extensions["animus.blobs"].open(export.sha256),
        mimetype="application/x-tar",
        as_attachment=True,
        download_name=f"{model.name}-v{version.number}-{export.id}.tar",
        etag=export.sha256,
        max_age=None,
    )
    response.content_length = export.size
    response.headers["X-Export-Id"] = export.id
    return response


# --- lineage and the signing key --------------------------------------------------------------


@operation(
    bp,
    "GET",
    f"{PROJECT}/lineage/<object_id>",
    summary="The lineage graph around a dataset version, run, artifact, model or version",
    tag=TAG,
    response=LINEAGE,
    errors=(404,),
)
def get_lineage(project_id, object_id):
    project = project_for(context(), project_id, Permission.PROJECT_READ)
    return lineage.lineage_graph(project, object_id)


@operation(
    bp,
    "GET",
    "/signing-key",
    summary="The public key that signs export packages, and its fingerprint",
    tag=TAG,
    response=SIGNING_KEY,
    errors=(503,),
)
def signing_key():
    key = current_signing_key(context(), _signer())
    return {
        "fingerprint": key.fingerprint,
        "algorithm": key.algorithm,
        "public_key": key.public_key,
    }
