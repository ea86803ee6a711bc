"""Pages of a project's inputs: projects, datasets and versions, code refs, environments."""

from __future__ import annotations

import mimetypes
import posixpath

import peewee
from flask import current_app, redirect, request, send_file, url_for

from appliance.api.bodies import request_body
from appliance.api.routing import context
from appliance.auth.rbac import Permission
from appliance.domain import code, datasets, environments, lineage, projects
from appliance.domain.records import (
    CodeRef,
    Dataset,
    DatasetFile,
    DatasetVersion,
    EnvironmentDefinition,
    EnvironmentLock,
    Model,
    PipelineRun,
    Run,
)
from appliance.errors import AnimusError, Forbidden, NotFound
from appliance.storage.blobs import BlobStore
from appliance.storage.uploads import UploadLimits, read_multipart_stream
from appliance.ui.security import upload_refused
from appliance.ui.web import (
    LINEAGE_NODES,
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

# --- projects ---------------------------------------------------------------------------------


@bp.get("/projects")
def projects_page(error: AnimusError | None = None, **values):
    ctx = context()
    after = request.args.get("after") or None
    rows = projects.visible_projects(ctx, after=after, limit=PAGE_SIZE + 1)
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    return page(
        "projects.html",
        projects=rows,
        next_after=rows[-1].id if more else None,
        error=error,
        **values,
    )


@bp.post("/projects")
def create_project():
    try:
        name = field("name", limit=100)
        project = projects.create_project(context(), name, field("description", required=False))
    except AnimusError as error:
        return form_error(projects_page, error, name=request.form.get("name", ""))
    return redirect(url_for("ui.project", project_id=project.id))


@bp.get("/projects/<project_id>")
def project(project_id):
    view = load_project(project_id)
    state_counts = dict(
        Run.select(Run.state, peewee.fn.COUNT(Run.id))
        .where(Run.project_id == view.project.id)
        .group_by(Run.state)
        .tuples()
    )
    recent = list(
        Run.select().where(Run.project_id == view.project.id).order_by(Run.id.desc()).limit(10)
    )
    counts = {
        "datasets": Dataset.select().where(Dataset.project_id == view.project.id).count(),
        "models": Model.select().where(Model.project_id == view.project.id).count(),
        "code_refs": CodeRef.select().where(CodeRef.project_id == view.project.id).count(),
        "environments": EnvironmentDefinition.select()
        .where(EnvironmentDefinition.project_id == view.project.id)
        .count(),
        "pipeline_runs": PipelineRun.select()
        .where(PipelineRun.project_id == view.project.id)
        .count(),
    }
    return page(
        "project.html",
        state_counts=state_counts,
        total_runs=sum(state_counts.values()),
        recent=recent,
        counts=counts,
    )


# --- datasets ---------------------------------------------------------------------------------


@bp.get("/projects/<project_id>/datasets")
def datasets_page(project_id, error: AnimusError | None = None, **values):
    view = load_project(project_id)
    rows, older = newest_first(
        Dataset.select().where(Dataset.project_id == view.project.id), Dataset.id
    )
    latest = {}
    if rows:
        for version in DatasetVersion.select().where(
            DatasetVersion.dataset_id.in_([d.id for d in rows])
        ):
            known = latest.get(version.dataset_id)
            if known is None or version.number > known.number:
                latest[version.dataset_id] = version
    return page("datasets.html", datasets=rows, latest=latest, older=older, error=error, **values)


@bp.post("/projects/<project_id>/datasets")
def create_dataset(project_id):
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_WRITE)
    try:
        dataset = datasets.create_dataset(
            ctx, view.project, field("name", limit=100), field("description", required=False)
        )
    except AnimusError as error:
        return form_error(datasets_page, error, project_id=project_id)
    return redirect(url_for("ui.dataset", project_id=project_id, dataset_id=dataset.id))


#: What a refused upload's redirect shows, by error code (the code travels in the URL, so
#: the page shows only text of its own).
UPLOAD_REFUSALS = {
    "forbidden": "the upload form's security token is missing or out of date; reload this "
    "page and upload again",
    "empty_upload": "the upload contains no files",
    "upload_too_large": "the upload is larger than this installation allows",
    "too_many_files": "the upload has more files than this installation allows",
    "duplicate_path": "two files in the upload have the same path",
    "invalid_path": "a file name in the upload is not allowed",
    "unsafe_archive_member": "an archive in the upload has an unsafe member",
    "malformed_archive": "an archive in the upload cannot be read",
    "malformed_multipart": "the upload is not a valid multipart form",
    "unsupported_media_type": "upload files with the form",
    "unauthenticated": "your session has ended; sign in again",
}


@bp.get("/projects/<project_id>/datasets/<dataset_id>")
def dataset(project_id, dataset_id, error: AnimusError | None = None):
    view = load_project(project_id)
    refused = request.args.get("upload_refused")
    if error is None and refused:
        code = refused if refused in UPLOAD_REFUSALS else "invalid_request"
        error = AnimusError(
            UPLOAD_REFUSALS.get(code, "the upload was refused; try again"), code=code
        )
    found = datasets.dataset_in(view.project, dataset_id)
    versions = list(
        DatasetVersion.select()
        .where(DatasetVersion.dataset_id == found.id)
        .order_by(DatasetVersion.number.desc())
        .limit(200)
    )
    return page("dataset.html", dataset=found, versions=versions, error=error)


@bp.post("/projects/<project_id>/datasets/<dataset_id>/versions")
def upload_version(project_id, dataset_id):
    """A new version from the files of a multipart form; its parent is the latest version."""
    ctx = context()
    settings = config()
    view = load_project(project_id, Permission.PROJECT_WRITE)
    found = datasets.dataset_in(view.project, dataset_id)
    parent = (
        DatasetVersion.select()
        .where(DatasetVersion.dataset_id == found.id)
        .order_by(DatasetVersion.number.desc())
        .first()
    )
    if request.mimetype != "multipart/form-data":
        raise AnimusError("upload files with the form", code="unsupported_media_type")
    limits = UploadLimits(
        max_total_bytes=settings.max_upload_bytes, max_files=settings.max_upload_files
    )
    blobs: BlobStore = current_app.extensions["animus.blobs"]
    try:
        with blobs.stage() as staged:
            files = read_multipart_stream(
                request_body(), request.headers["Content-Type"], staged, limits
            )
            version = datasets.create_version(
                ctx, view.project, found, files, staged, blobs, parent=parent
            )
    except (Forbidden, NotFound):
        raise
    except AnimusError as error:
        return upload_refused(error)
    return redirect(url_for("ui.dataset_version", project_id=project_id, version_id=version.id))


@bp.get("/projects/<project_id>/dataset-versions/<version_id>")
def dataset_version(project_id, version_id):
    view = load_project(project_id)
    version = datasets.version_in(view.project, version_id)
    owner = Dataset.get_by_id(version.dataset_id)
    after = request.args.get("after_path")
    query = DatasetFile.select().where(DatasetFile.version_id == version.id)
    if after:
        query = query.where(DatasetFile.path > after)
    files = list(query.order_by(DatasetFile.path).limit(PAGE_SIZE * 4 + 1))
    more = len(files) > PAGE_SIZE * 4
    files = files[: PAGE_SIZE * 4]
    parents = []
    cursor = version
    while cursor.parent_id and len(parents) < 20:
        cursor = DatasetVersion.get_or_none(DatasetVersion.id == cursor.parent_id)
        if cursor is None:
            break
        parents.append(cursor)
    used_by = list(
        Run.select(Run.id, Run.state, Run.created_at)
        .where(
            (Run.project_id == view.project.id)
            & Run.inputs.contains(f'"{version.id}"')  # the id as a JSON string in the inputs
        )
        .order_by(Run.id.desc())
        .limit(20)
    )
    graph = lineage.lineage_graph(view.project, version.id, max_nodes=LINEAGE_NODES)
    return page(
        "dataset_version.html",
        version=version,
        dataset=owner,
        files=files,
        next_path=files[-1].path if more else None,
        parents=parents,
        used_by=used_by,
        graph=graph,
        chart=lineage_chart(view.project.id, graph),
    )


@bp.get("/projects/<project_id>/dataset-versions/<version_id>/files/<path:path>")
def download_dataset_file(project_id, version_id, path):
    view = load_project(project_id)
    version = datasets.version_in(view.project, version_id)
    entry = datasets.version_file(version, path)
    blobs: BlobStore = current_app.extensions["animus.blobs"]
    response = send_file(
        blobs.open(entry.sha256),
        mimetype=mimetypes.guess_type(path)[0] or "application/octet-stream",
        as_attachment=True,
        download_name=posixpath.basename(path),
        etag=entry.sha256,
        max_age=None,
    )
    response.content_length = entry.size
    return response


# --- code refs and environments ---------------------------------------------------------------


@bp.get("/projects/<project_id>/code")
def code_page(project_id, error: AnimusError | None = None, **values):
    view = load_project(project_id)
    rows, older = newest_first(
        CodeRef.select().where(CodeRef.project_id == view.project.id), CodeRef.id
    )
    return page("code.html", code_refs=rows, older=older, error=error, **values)


@bp.post("/projects/<project_id>/code")
def create_code_ref(project_id):
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_WRITE)
    values = {k: request.form.get(k, "") for k in ("repo_url", "revision", "path")}
    try:
        revision = field("revision", limit=255).strip()
        is_sha = len(revision) == 40 and all(c in "0123456789abcdefABCDEF" for c in revision)
        code.create_code_ref(
            ctx,
            view.project,
            field("repo_url", limit=2048).strip(),
            commit_sha=revision if is_sha else None,
            ref=None if is_sha else revision,
            path=field("path", required=False, limit=1024).strip(),
        )
    except AnimusError as error:
        return form_error(code_page, error, project_id=project_id, form=values)
    return redirect(url_for("ui.code_page", project_id=project_id))


@bp.get("/projects/<project_id>/environments")
def environments_page(project_id, error: AnimusError | None = None, **values):
    view = load_project(project_id)
    envs = list(
        EnvironmentDefinition.select()
        .where(EnvironmentDefinition.project_id == view.project.id)
        .order_by(EnvironmentDefinition.name)
        .limit(200)
    )
    locks, older = newest_first(
        EnvironmentLock.select().where(EnvironmentLock.project_id == view.project.id),
        EnvironmentLock.id,
    )
    names = {e.id: e.name for e in envs}
    return page(
        "environments.html",
        environments=envs,
        locks=locks,
        names=names,
        older=older,
        error=error,
        **values,
    )


@bp.post("/projects/<project_id>/environments")
def create_environment(project_id):
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_WRITE)
    try:
        packages = [
            line.strip() for line in field("packages", required=False).splitlines() if line.strip()
        ]
        environments.create_environment(
            ctx,
            view.project,
            field("name", limit=100).strip(),
            field("base_image", limit=512).strip(),
            packages,
            field("description", required=False),
        )
    except AnimusError as error:
        return form_error(environments_page, error, project_id=project_id)
    return redirect(url_for("ui.environments_page", project_id=project_id))


@bp.post("/projects/<project_id>/environment-locks")
def create_lock(project_id):
    """A lock from an image digest and ``name==version sha256:…`` lines."""
    ctx = context()
    view = load_project(project_id, Permission.PROJECT_WRITE)
    try:
        packages = []
        for number, line in enumerate(field("packages", required=False).splitlines(), start=1):
            if not line.strip():
                continue
            requirement, _, digest = line.strip().partition(" ")
            name, _, version = requirement.partition("==")
            if not version or not digest.strip():
                raise AnimusError(
                    f"package line {number} must read name==version sha256:<64 hex>",
                    code="validation_failed",
                )
            packages.append({"name": name, "version": version, "sha256": digest.strip()})
        environments.create_lock(
            ctx,
            view.project,
            field("environment_id", limit=64),
            field("image_digest", limit=100).strip(),
            packages,
        )
    except AnimusError as error:
        return form_error(environments_page, error, project_id=project_id)
    return redirect(url_for("ui.environments_page", project_id=project_id))
