"""/api/v1/projects/{pid}/datasets and dataset versions: upload, read, download."""

from __future__ import annotations

import base64
import mimetypes
import posixpath

from flask import Blueprint, current_app, request, send_file

from appliance.api import schemas as s
from appliance.api.bodies import request_body
from appliance.api.pages import QUERY, page, page_schema
from appliance.api.routing import context, operation, remember
from appliance.auth.rbac import Permission
from appliance.domain import datasets
from appliance.domain.projects import project_for
from appliance.domain.records import Dataset, DatasetFile, DatasetVersion
from appliance.errors import AnimusError
from appliance.storage.blobs import BlobStore
from appliance.storage.uploads import UploadLimits, read_multipart_stream, read_tar_stream

bp = Blueprint("datasets", __name__, url_prefix="/api/v1/projects/<project_id>")
TAG = "datasets"
TAR_TYPES = {"application/x-tar", "application/tar", "application/gzip", "application/x-gzip"}


def render_dataset(dataset: Dataset) -> dict:
    return {
        "id": dataset.id,
        "project_id": dataset.project_id,
        "name": dataset.name,
        "description": dataset.description,
        "created_at": dataset.created_at,
        "created_by": dataset.created_by,
    }


def render_version(version: DatasetVersion, files=None) -> dict:
    rendered = {
        "id": version.id,
        "project_id": version.project_id,
        "dataset_id": version.dataset_id,
        "number": version.number,
        "digest": version.digest,
        "parent_id": version.parent_id,
        "file_count": version.file_count,
        "total_size": version.total_size,
        "message": version.message,
        "created_at": version.created_at,
        "created_by": version.created_by,
    }
    if files is not None:
        rendered["files"] = [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in files]
    return rendered


@operation(
    bp,
    "POST",
    "/datasets",
    summary="Create a dataset",
    tag=TAG,
    body=s.body({"name": s.NAME}, {"description": s.DESCRIPTION}),
    response=s.DATASET,
    status=201,
    idempotent=True,
    errors=(400, 403, 404, 409),
)
def create_dataset(project_id, body):
    ctx = context()
    project = project_for(ctx, project_id, Permission.PROJECT_WRITE)
    return render_dataset(
        datasets.create_dataset(ctx, project, body["name"], body.get("description", ""))
    )


@operation(
    bp,
    "GET",
    "/datasets",
    summary="List datasets",
    tag=TAG,
    query=QUERY,
    response=page_schema(s.DATASET),
    errors=(404,),
)
def list_datasets(project_id):
    project = project_for(context(), project_id, Permission.PROJECT_READ)

    def fetch(after, limit):
        query = Dataset.select().where(Dataset.project_id == project.id)
        if after:
            query = query.where(Dataset.id > after)
        return query.order_by(Dataset.id).limit(limit)

    return page(fetch, render_dataset)


@operation(
    bp,
    "GET",
    "/datasets/<dataset_id>",
    summary="Get a dataset",
    tag=TAG,
    response=s.DATASET,
    errors=(404,),
)
def get_dataset(project_id, dataset_id):
    project = project_for(context(), project_id, Permission.PROJECT_READ)
    return render_dataset(datasets.dataset_in(project, dataset_id))


@operation(
    bp,
    "POST",
    "/datasets/<dataset_id>/versions",
    summary="Upload a new immutable dataset version (multipart files or one tar stream)",
    tag=TAG,
    upload=True,
    response=s.DATASET_VERSION,
    status=201,
    idempotent=True,
    query={
        "parent_id": {"type": "string", "description": "lineage: the version this derives from"},
        "message": {"type": "string", "description": "what changed"},
    },
    errors=(400, 403, 404, 409, 413, 415, 422),
)
def create_version(project_id, dataset_id):
    ctx = context()
    config = current_app.config["ANIMUS"]
    project = project_for(ctx, project_id, Permission.PROJECT_WRITE)
    dataset = datasets.dataset_in(project, dataset_id)
    parent = datasets.resolve_parent(project, request.args.get("parent_id"))
    message = request.args.get("message", "")
    if len(message) > 10_000:
        raise AnimusError("message is longer than 10000 characters", code="invalid_request")
    if request.content_length is not None and request.content_length > config.max_upload_bytes:
        raise AnimusError(
            f"the upload is larger than {config.max_upload_bytes} bytes", code="upload_too_large"
        )
    limits = UploadLimits(
        max_total_bytes=config.max_upload_bytes, max_files=config.max_upload_files
    )
    blobs: BlobStore = current_app.extensions["animus.blobs"]
    with blobs.stage() as staged:
        if request.mimetype == "multipart/form-data":
            files = read_multipart_stream(
                request_body(), request.headers["Content-Type"], staged, limits
            )
        elif request.mimetype in TAR_TYPES:
            files = read_tar_stream(request_body(), staged, limits)
        else:
            raise AnimusError(
                "upload files as multipart/form-data or one application/x-tar stream",
                code="unsupported_media_type",
            )
        result: dict = {}

        def respond(version: DatasetVersion) -> None:
            result.update(render_version(version, sorted(files, key=lambda f: f.path)))
            remember(result)

        datasets.create_version(
            ctx,
            project,
            dataset,
            files,
            staged,
            blobs,
            parent=parent,
            message=message,
            within=respond,
        )
    return result


@operation(
    bp,
    "GET",
    "/datasets/<dataset_id>/versions",
    summary="List a dataset's versions",
    tag=TAG,
    query=QUERY,
    response=page_schema(s.DATASET_VERSION),
    errors=(404,),
)
def list_versions(project_id, dataset_id):
    project = project_for(context(), project_id, Permission.PROJECT_READ)
    dataset = datasets.dataset_in(project, dataset_id)

    def fetch(after, limit):
        query = DatasetVersion.select().where(DatasetVersion.dataset_id == dataset.id)
        if after:
            query = query.where(DatasetVersion.id > after)
        return query.order_by(DatasetVersion.id).limit(limit)

    return page(fetch, render_version)


@operation(
    bp,
    "GET",
    "/dataset-versions/<version_id>",
    summary="Get a dataset version with its manifest",
    tag=TAG,
    response=s.DATASET_VERSION,
    errors=(404,),
)
def get_version(project_id, version_id):
    project = project_for(context(), project_id, Permission.PROJECT_READ)
    version = datasets.version_in(project, version_id)
    return render_version(version, datasets.version_files(version))


def _refuse_change(project_id: str, version_id: str):
    project = project_for(context(), project_id, Permission.PROJECT_WRITE)
    datasets.version_in(project, version_id)
    raise AnimusError("dataset versions are immutable; upload a new version", code="immutable")


@operation(
    bp,
    "PATCH",
    "/dataset-versions/<version_id>",
    summary="Refused: dataset versions are immutable",
    tag=TAG,
    errors=(403, 404, 409),
)
def patch_version(project_id, version_id):
    _refuse_change(project_id, version_id)


@operation(
    bp,
    "DELETE",
    "/dataset-versions/<version_id>",
    summary="Refused: dataset versions are immutable",
    tag=TAG,
    errors=(403, 404, 409),
)
def delete_version(project_id, version_id):
    _refuse_change(project_id, version_id)


@operation(
    bp,
    "GET",
    "/dataset-versions/<version_id>/files/<path:path>",
    summary="Download one file of a dataset version",
    tag=TAG,
    produces="application/octet-stream",
    errors=(404,),
)
def download_file(project_id, version_id, path):
    project = project_for(context(), project_id, Permission.PROJECT_READ)
    version = datasets.version_in(project, version_id)
    entry: DatasetFile = datasets.version_file(version, path)
    blobs: BlobStore = current_app.extensions["animus.blobs"]
    response = send_file(
        blobs.open(entry.sha256),
        mimetype=mimetypes.guess_type(path)[0] or "application/octet-stream",
        as_attachment=True,
        download_name=posixpath.basename(path),
        etag=entry.sha256,
        conditional=True,
        max_age=None,
    )
    response.content_length = entry.size
    response.headers["Repr-Digest"] = (
        "sha-256=:" + base64.b64encode(bytes.fromhex(entry.sha256)).decode() + ":"
    )
    response.headers["Cache-Control"] = "private, max-age=31536000, immutable"
    return response
