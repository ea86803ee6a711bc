"""Datasets and their immutable, content-addressed versions."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import peewee

from appliance import db
from appliance.audit import log as audit
from appliance.audit.actions import Action
from appliance.domain.context import Context
from appliance.domain.records import (
    Dataset,
    DatasetFile,
    DatasetVersion,
    Project,
    canonical_json,
    create_named,
    new_id,
    require_object_name,
)
from appliance.errors import AnimusError, NotFound, ValidationFailed
from appliance.storage.blobs import BlobStore, StagedBlobs
from appliance.storage.uploads import UploadedFile

_INSERT_BATCH = 500


def manifest_digest(files: Sequence[UploadedFile]) -> str:
    """``sha256:`` over the canonical JSON of the manifest sorted by path."""
    manifest = [
        {"path": f.path, "sha256": f.sha256, "size": f.size}
        for f in sorted(files, key=lambda f: f.path)
    ]
    return "sha256:" + hashlib.sha256(canonical_json(manifest).encode()).hexdigest()


def create_dataset(ctx: Context, project: Project, name: str, description: str = "") -> Dataset:
    require_object_name(name)
    with db.write_transaction():
        dataset = create_named(
            Dataset,
            "a dataset",
            id=new_id("ds"),
            project_id=project.id,
            name=name,
            description=description,
            created_by=ctx.principal.actor,
        )
        audit.record(
            ctx,
            Action.DATASET_CREATED,
            project_id=project.id,
            object_type="dataset",
            object_id=dataset.id,
            payload={"name": name},
        )
    return dataset


def dataset_in(project: Project, dataset_id: str) -> Dataset:
    dataset = Dataset.get_or_none((Dataset.id == dataset_id) & (Dataset.project_id == project.id))
    if dataset is None:
        raise NotFound(f"no dataset {dataset_id!r} in this project")
    return dataset


def version_in(project: Project, version_id: str) -> DatasetVersion:
    version = DatasetVersion.get_or_none(
        (DatasetVersion.id == version_id) & (DatasetVersion.project_id == project.id)
    )
    if version is None:
        raise NotFound(f"no dataset version {version_id!r} in this project")
    return version


def resolve_parent(project: Project, parent_id: str | None) -> DatasetVersion | None:
    """The lineage parent; a version of another project is refused as a cross-project reference."""
    if not parent_id:
        return None
    parent = DatasetVersion.get_or_none(DatasetVersion.id == parent_id)
    if parent is not None and parent.project_id != project.id:
        raise AnimusError(
            "the parent version belongs to another project",
            code="cross_project_reference",
            details={"field": "parent_id"},
        )
    if parent is None:
        raise ValidationFailed(f"no dataset version {parent_id!r}", details={"field": "parent_id"})
    return parent


def create_version(
    ctx: Context,
    project: Project,
    dataset: Dataset,
    files: Sequence[UploadedFile],
    staged: StagedBlobs,
    blobs: BlobStore,
    *,
    parent: DatasetVersion | None = None,
    message: str = "",
    within: Callable[[DatasetVersion], None] | None = None,
) -> DatasetVersion:
    """Record a new version over already staged blobs: all of it appears, or none of it.

    ``within`` runs inside the same transaction (the API remembers its idempotent response
    there). Blobs are moved into the store just before the commit; if the commit fails, the
    blobs this upload added and nothing else references are removed again.
    """
    if not files:
        raise AnimusError("a dataset version needs at least one file", code="empty_upload")
    digest = manifest_digest(files)
    total = sum(f.size for f in files)
    created: list[str] = []
    try:
        with db.write_transaction():
            last = (
                DatasetVersion.select(peewee.fn.MAX(DatasetVersion.number))
                .where(DatasetVersion.dataset_id == dataset.id)
                .scalar()
            )
            version = DatasetVersion.create(
                id=new_id("dsv"),
                project_id=project.id,
                dataset_id=dataset.id,
                number=(last or 0) + 1,
                digest=digest,
                parent_id=parent.id if parent else None,
                file_count=len(files),
                total_size=total,
                message=message,
                created_by=ctx.principal.actor,
            )
            rows = [
                {"version_id": version.id, "path": f.path, "sha256": f.sha256, "size": f.size}
                for f in files
            ]
            for start in range(0, len(rows), _INSERT_BATCH):
                DatasetFile.insert_many(rows[start : start + _INSERT_BATCH]).execute()
            audit.record(
                ctx,
                Action.DATASET_VERSION_CREATED,
                project_id=project.id,
                object_type="dataset_version",
                object_id=version.id,
                payload={
                    "dataset_id": dataset.id,
                    "number": version.number,
                    "digest": digest,
                    "file_count": len(files),
                    "total_size": total,
                    "parent_id": version.parent_id,
                },
            )
            if within is not None:
                within(version)
            created = staged.promote()
    except BaseException:
        blobs.remove_if_unreferenced(created, blob_is_referenced)
        raise
    return version


def blob_is_referenced(sha256: str) -> bool:
    return DatasetFile.select().where(DatasetFile.sha256 == sha256).exists()


def version_files(version: DatasetVersion) -> list[DatasetFile]:
    return list(
        DatasetFile.select().where(DatasetFile.version_id == version.id).order_by(DatasetFile.path)
    )


def version_file(version: DatasetVersion, path: str) -> DatasetFile:
    found = DatasetFile.get_or_none(
        (DatasetFile.version_id == version.id) & (DatasetFile.path == path)
    )
    if found is None:
        raise NotFound(f"no file {path!r} in this dataset version")
    return found
