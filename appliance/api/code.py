"""/api/v1/projects/{pid}: code refs, environment definitions and environment locks."""

from __future__ import annotations

from flask import Blueprint

from appliance.api import schemas as s
from appliance.api.pages import QUERY, page, page_schema
from appliance.api.routing import context, operation
from appliance.auth.rbac import Permission
from appliance.domain import code, environments
from appliance.domain.projects import project_for
from appliance.domain.records import CodeRef, EnvironmentDefinition, EnvironmentLock
from appliance.errors import AnimusError

bp = Blueprint("code", __name__, url_prefix="/api/v1/projects/<project_id>")


def render_code_ref(ref: CodeRef) -> dict:
    return {
        "id": ref.id,
        "project_id": ref.project_id,
        "repo_url": ref.repo_url,
        "commit_sha": ref.commit_sha,
        "ref": ref.ref,
        "path": ref.path,
        "production_ready": ref.production_ready,
        "limitations": code.limitations(ref),
        "created_at": ref.created_at,
        "created_by": ref.created_by,
    }


def render_environment(env: EnvironmentDefinition) -> dict:
    return {
        "id": env.id,
        "project_id": env.project_id,
        "name": env.name,
        "base_image": env.base_image,
        "packages": env.packages,
        "description": env.description,
        "created_at": env.created_at,
        "created_by": env.created_by,
    }


def render_lock(lock: EnvironmentLock) -> dict:
    return {
        "id": lock.id,
        "project_id": lock.project_id,
        "environment_id": lock.environment_id,
        "image_digest": lock.image_digest,
        "packages": lock.packages,
        "digest": lock.digest,
        "created_at": lock.created_at,
        "created_by": lock.created_by,
    }


def _list(model, project_id: str, render):
    project = project_for(context(), project_id, Permission.PROJECT_READ)

    def fetch(after, limit):
        query = model.select().where(model.project_id == project.id)
        if after:
            query = query.where(model.id > after)
        return query.order_by(model.id).limit(limit)

    return page(fetch, render)


def _refuse_change(project_id: str, find, what: str):
    project = project_for(context(), project_id, Permission.PROJECT_WRITE)
    find(project)
    raise AnimusError(f"{what} are immutable; create a new one", code="immutable")


# --- code refs ----------------------------------------------------------------------------

CODE_TAG = "code"


@operation(
    bp,
    "POST",
    "/code-refs",
    summary="Register a repository at a commit (or, non-production, a branch or tag)",
    tag=CODE_TAG,
    body=s.body(
        {"repo_url": {"type": "string", "minLength": 1, "maxLength": 2048}},
        {
            "commit_sha": {"type": "string", "maxLength": 64},
            "ref": {"type": "string", "maxLength": 255},
            "path": {"type": "string", "maxLength": 1024},
        },
    ),
    response=s.CODE_REF,
    status=201,
    idempotent=True,
    errors=(400, 403, 404, 409, 422),
)
def create_code_ref(project_id, body):
    ctx = context()
    project = project_for(ctx, project_id, Permission.PROJECT_WRITE)
    ref = code.create_code_ref(
        ctx,
        project,
        body["repo_url"],
        commit_sha=body.get("commit_sha"),
        ref=body.get("ref"),
        path=body.get("path", ""),
    )
    return render_code_ref(ref)


@operation(
    bp,
    "GET",
    "/code-refs",
    summary="List code refs",
    tag=CODE_TAG,
    query=QUERY,
    response=page_schema(s.CODE_REF),
    errors=(404,),
)
def list_code_refs(project_id):
    return _list(CodeRef, project_id, render_code_ref)


@operation(
    bp,
    "GET",
    "/code-refs/<code_ref_id>",
    summary="Get a code ref",
    tag=CODE_TAG,
    response=s.CODE_REF,
    errors=(404,),
)
def get_code_ref(project_id, code_ref_id):
    project = project_for(context(), project_id, Permission.PROJECT_READ)
    return render_code_ref(code.code_ref_in(project, code_ref_id))


@operation(
    bp,
    "PATCH",
    "/code-refs/<code_ref_id>",
    summary="Refused: code refs are immutable",
    tag=CODE_TAG,
    errors=(403, 404, 409),
)
def patch_code_ref(project_id, code_ref_id):
    _refuse_change(project_id, lambda p: code.code_ref_in(p, code_ref_id), "code refs")


@operation(
    bp,
    "DELETE",
    "/code-refs/<code_ref_id>",
    summary="Refused: code refs are immutable",
    tag=CODE_TAG,
    errors=(403, 404, 409),
)
def delete_code_ref(project_id, code_ref_id):
    _refuse_change(project_id, lambda p: code.code_ref_in(p, code_ref_id), "code refs")


# --- environments -------------------------------------------------------------------------

ENV_TAG = "environments"


@operation(
    bp,
    "POST",
    "/environments",
    summary="Define an environment: a base image and the packages to add",
    tag=ENV_TAG,
    body=s.body(
        {
            "name": s.NAME,
            "base_image": {"type": "string", "minLength": 1, "maxLength": 512},
            "packages": {
                "type": "array",
                "maxItems": 1000,
                "items": {"type": "string", "minLength": 1, "maxLength": 300},
            },
        },
        {"description": s.DESCRIPTION},
    ),
    response=s.ENVIRONMENT,
    status=201,
    idempotent=True,
    errors=(400, 403, 404, 409, 422),
)
def create_environment(project_id, body):
    ctx = context()
    project = project_for(ctx, project_id, Permission.PROJECT_WRITE)
    env = environments.create_environment(
        ctx,
        project,
        body["name"],
        body["base_image"],
        body["packages"],
        body.get("description", ""),
    )
    return render_environment(env)


@operation(
    bp,
    "GET",
    "/environments",
    summary="List environments",
    tag=ENV_TAG,
    query=QUERY,
    response=page_schema(s.ENVIRONMENT),
    errors=(404,),
)
def list_environments(project_id):
    return _list(EnvironmentDefinition, project_id, render_environment)


@operation(
    bp,
    "GET",
    "/environments/<environment_id>",
    summary="Get an environment",
    tag=ENV_TAG,
    response=s.ENVIRONMENT,
    errors=(404,),
)
def get_environment(project_id, environment_id):
    project = project_for(context(), project_id, Permission.PROJECT_READ)
    return render_environment(environments.environment_in(project, environment_id))


@operation(
    bp,
    "POST",
    "/environment-locks",
    summary="Record an EnvironmentLock: an image digest and exact packages with hashes",
    tag=ENV_TAG,
    body=s.body(
        {
            "environment_id": {"type": "string", "maxLength": 64},
            "image_digest": {"type": "string", "maxLength": 100},
            "packages": {"type": "array", "maxItems": 5000, "items": s.LOCKED_PACKAGE},
        }
    ),
    response=s.ENVIRONMENT_LOCK,
    status=201,
    idempotent=True,
    errors=(400, 403, 404, 409, 422),
)
def create_lock(project_id, body):
    ctx = context()
    project = project_for(ctx, project_id, Permission.PROJECT_WRITE)
    lock = environments.create_lock(
        ctx, project, body["environment_id"], body["image_digest"], body["packages"]
    )
    return render_lock(lock)


@operation(
    bp,
    "GET",
    "/environment-locks",
    summary="List environment locks",
    tag=ENV_TAG,
    query=QUERY,
    response=page_schema(s.ENVIRONMENT_LOCK),
    errors=(404,),
)
def list_locks(project_id):
    return _list(EnvironmentLock, project_id, render_lock)


@operation(
    bp,
    "GET",
    "/environment-locks/<lock_id>",
    summary="Get an environment lock",
    tag=ENV_TAG,
    response=s.ENVIRONMENT_LOCK,
    errors=(404,),
)
def get_lock(project_id, lock_id):
    project = project_for(context(), project_id, Permission.PROJECT_READ)
    return render_lock(environments.lock_in(project, lock_id))


@operation(
    bp,
    "PATCH",
    "/environment-locks/<lock_id>",
    summary="Refused: environment locks are immutable",
    tag=ENV_TAG,
    errors=(403, 404, 409),
)
def patch_lock(project_id, lock_id):
    _refuse_change(project_id, lambda p: environments.lock_in(p, lock_id), "environment locks")


@operation(
    bp,
    "DELETE",
    "/environment-locks/<lock_id>",
    summary="Refused: environment locks are immutable",
    tag=ENV_TAG,
    errors=(403, 404, 409),
)
def delete_lock(project_id, lock_id):
    _refuse_change(project_id, lambda p: environments.lock_in(p, lock_id), "environment locks")
