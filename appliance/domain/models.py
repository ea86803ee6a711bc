"""Models and ModelVersions registered from a Run's artifact, their approval, and export.

Stages: ``registered → approved | rejected``, and ``approved → exported`` (or
``registered → exported`` when the project's policy does not require approval). An exported
version may be exported again, e.g. after the signing key changed; each export is its own
immutable package.
"""

from __future__ import annotations

from collections.abc import Callable

import peewee

from appliance import db
from appliance.audit import export_package
from appliance.audit import log as audit
from appliance.audit.actions import Action
from appliance.domain.context import Context
from appliance.domain.records import (
    Artifact,
    Model,
    ModelExport,
    ModelVersion,
    Project,
    Run,
    RunMetric,
    create_named,
    new_id,
    require_object_name,
    utc_now,
)
from appliance.errors import AnimusError, NotFound, ValidationFailed
from appliance.storage.blobs import BlobStore

DECISIONS = {
    "approve": ("approved", Action.MODEL_VERSION_APPROVED),
    "reject": ("rejected", Action.MODEL_VERSION_REJECTED),
}
EXPORTABLE = frozenset({"approved", "exported"})


def model_in(project: Project, model_id: str) -> Model:
    model = Model.get_or_none((Model.id == model_id) & (Model.project_id == project.id))
    if model is None:
        raise NotFound(f"no model {model_id!r} in this project")
    return model


def version_in(project: Project, version_id: str) -> ModelVersion:
    version = ModelVersion.get_or_none(
        (ModelVersion.id == version_id) & (ModelVersion.project_id == project.id)
    )
    if version is None:
        raise NotFound(f"no model version {version_id!r} in this project")
    return version


def create_model(ctx: Context, project: Project, name: str, description: str = "") -> Model:
    require_object_name(name)
    with db.write_transaction():
        model = create_named(
            Model,
            "a model",
            id=new_id("mdl"),
            project_id=project.id,
            name=name,
            description=description,
            created_by=ctx.principal.actor,
        )
        audit.record(
            ctx,
            Action.MODEL_CREATED,
            project_id=project.id,
            object_type="model",
            object_id=model.id,
            payload={"name": name, "description": description},
        )
    return model


def final_metrics(run: Run) -> dict[str, float]:
    """The last reported value of each of the run's metrics (by report sequence)."""
    last: dict[str, float] = {}
    for metric in RunMetric.select().where(RunMetric.run_id == run.id).order_by(RunMetric.seq):
        last[metric.name] = metric.value
    return last


def register_version(
    ctx: Context, project: Project, model: Model, run_id: str, artifact_path: str
) -> ModelVersion:
    """A new version of ``model`` from the artifact ``artifact_path`` of a succeeded run."""
    run = Run.get_or_none(Run.id == run_id)
    if run is None:
        raise ValidationFailed(f"no run {run_id!r}", details={"field": "run_id"})
    if run.project_id != project.id:
        raise AnimusError(
            "the run belongs to another project",
            code="cross_project_reference",
            details={"field": "run_id"},
        )
    if run.state != "succeeded":
        raise AnimusError(
            f"only a succeeded run can be registered; this run is {run.state}",
            code="invalid_state",
            details={"field": "run_id"},
        )
    artifact = Artifact.get_or_none((Artifact.run_id == run.id) & (Artifact.path == artifact_path))
    if artifact is None:
        raise ValidationFailed(
            f"the run has no artifact {artifact_path!r}", details={"field": "artifact_path"}
        )
    metrics = final_metrics(run)
    with db.write_transaction():
        if db.dialect() == "postgresql":
            # Concurrent registrations of one model take numbers one after another.
            Model.select(Model.id).where(Model.id == model.id).for_update().execute()
        number = (
            ModelVersion.select(peewee.fn.MAX(ModelVersion.number))
            .where(ModelVersion.model_id == model.id)
            .scalar()
            or 0
        ) + 1
        version = ModelVersion.create(
            id=new_id("mv"),
            project_id=project.id,
            model_id=model.id,
            number=number,
            stage="registered",
            source_run_id=run.id,
            artifact_id=artifact.id,
            artifact_path=artifact.path,
            artifact_sha256=artifact.sha256,
            artifact_size=artifact.size,
            metrics=metrics,
            created_by=ctx.principal.actor,
        )
        audit.record(
            ctx,
            Action.MODEL_VERSION_REGISTERED,
            project_id=project.id,
            object_type="model_version",
            object_id=version.id,
            payload={
                "model_id": model.id,
                "number": number,
                "source_run_id": run.id,
                "artifact_id": artifact.id,
                "artifact_path": artifact.path,
                "artifact_sha256": artifact.sha256,
                "metrics": metrics,
            },
        )
    return version


def decide(ctx: Context, version: ModelVersion, decision: str, reason: str) -> ModelVersion:
    """Approve or reject a registered version; the caller has checked the admin role."""
    reason = reason.strip()
    if not reason:
        raise ValidationFailed("a reason is required", details={"field": "reason"})
    stage, action = DECISIONS[decision]
    with db.write_transaction():
        version = ModelVersion.get_by_id(version.id)
        if version.stage != "registered":
            raise AnimusError(
                f"the version is {version.stage}; only a registered version can be decided",
                code="invalid_state",
            )
        fields = {
            "stage": stage,
            "decided_at": utc_now(),
            "decided_by": ctx.principal.actor,
            "decision_reason": reason,
        }
        ModelVersion.update(**fields).where(ModelVersion.id == version.id).execute()
        for name, value in fields.items():
            setattr(version, name, value)
        audit.record(
            ctx,
            action,
            project_id=version.project_id,
            object_type="model_version",
            object_id=version.id,
            payload={"from": "registered", "to": stage, "reason": reason},
        )
    return version


def check_exportable(project: Project, version: ModelVersion) -> None:
    """Refuse an export the stage or the project's policy does not allow."""
    if version.stage == "rejected":
        raise AnimusError("a rejected version cannot be exported", code="invalid_state")
    if version.stage == "registered" and project.policy.get("export_requires_approval", True):
        raise AnimusError(
            "the project policy requires approval by a project admin before export",
            code="approval_required",
        )


def record_export(
    ctx: Context,
    project: Project,
    version: ModelVersion,
    package: dict,
    promote: Callable[[], object],
) -> ModelExport:
    """Record a built package (``id, sha256, size, manifest_sha256, signing_fingerprint``)."""
    with db.write_transaction():
        version = ModelVersion.get_by_id(version.id)
        check_exportable(project, version)  # again: a decision may have landed meanwhile
        export = ModelExport.create(
            id=package["id"],
            project_id=version.project_id,
            model_version_id=version.id,
            sha256=package["sha256"],
            size=package["size"],
            manifest_sha256=package["manifest_sha256"],
            signing_fingerprint=package["signing_fingerprint"],
            created_by=ctx.principal.actor,
        )
        previous = version.stage
        exported_at = utc_now()
        ModelVersion.update(stage="exported", exported_at=exported_at).where(
            ModelVersion.id == version.id
        ).execute()
        audit.record(
            ctx,
            Action.MODEL_VERSION_EXPORTED,
            project_id=version.project_id,
            object_type="model_version",
            object_id=version.id,
            payload={
                "from": previous,
                "to": "exported",
                "export_id": export.id,
                "sha256": export.sha256,
                "size": export.size,
                "manifest_sha256": export.manifest_sha256,
                "signing_fingerprint": export.signing_fingerprint,
            },
        )
        promote()
    return export


def export_version(
    ctx: Context,
    project: Project,
    version: ModelVersion,
    signer: export_package.Signer,
    blobs: BlobStore,
) -> ModelExport:
    """Build, sign and store the version's package; record it with its audit event."""
    check_exportable(project, version)
    key = export_package.current_signing_key(ctx, signer)
    package, stream = export_package.build_package(version, key, signer, blobs)
    with stream, blobs.stage() as staged:
        stored = staged.add_stream(stream.read, max_bytes=package["size"] + 1)
        if stored.sha256 != package["sha256"]:
            raise AnimusError("the package changed while it was stored", code="conflict")
        return record_export(ctx, project, version, package, promote=staged.promote)


def latest_export(version: ModelVersion) -> ModelExport:
    export = (
        ModelExport.select()
        .where(ModelExport.model_version_id == version.id)
        .order_by(ModelExport.created_at.desc(), ModelExport.id.desc())
        .first()
    )
    if export is None:
        raise NotFound("the version has not been exported yet")
    return export
