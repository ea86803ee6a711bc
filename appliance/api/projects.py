"""/api/v1/projects: projects, their policy, members and service accounts."""

from __future__ import annotations

from flask import Blueprint, current_app

from appliance.api import schemas as s
from appliance.api.pages import QUERY, page, page_schema
from appliance.api.routing import context, operation
from appliance.auth import identities
from appliance.auth.rbac import Permission, project_role
from appliance.domain import policies, projects
from appliance.domain.records import PolicySnapshot, Project, RoleBinding, ServiceAccount
from appliance.errors import NotFound

bp = Blueprint("projects", __name__, url_prefix="/api/v1/projects")
TAG = "projects"


def render_project(project: Project, role: str | None = None) -> dict:
    return {
        "id": project.id,
        "name": project.name,
        "description": project.description,
        "state": project.state,
        "created_at": project.created_at,
        "created_by": project.created_by,
        "archived_at": project.archived_at,
        "role": role,
    }


@operation(
    bp,
    "POST",
    "",
    summary="Create a project; the creator becomes its admin",
    tag=TAG,
    body=s.body({"name": s.NAME}, {"description": s.DESCRIPTION}),
    response=s.PROJECT,
    status=201,
    idempotent=True,
    errors=(400, 403, 409),
)
def create_project(body):
    project = projects.create_project(context(), body["name"], body.get("description", ""))
    return render_project(project, "admin")


@operation(
    bp,
    "GET",
    "",
    summary="List the projects the caller has a role in",
    tag=TAG,
    query=QUERY,
    response=page_schema(s.PROJECT),
)
def list_projects():
    ctx = context()
    return page(
        lambda after, limit: projects.visible_projects(ctx, after=after, limit=limit),
        lambda p: render_project(p, project_role(ctx.principal, p.id)),
    )


@operation(
    bp, "GET", "/<project_id>", summary="Get a project", tag=TAG, response=s.PROJECT, errors=(404,)
)
def get_project(project_id):
    ctx = context()
    project = projects.project_for(ctx, project_id, Permission.PROJECT_READ)
    return render_project(project, project_role(ctx.principal, project.id))


@operation(
    bp,
    "POST",
    "/<project_id>/archive",
    summary="Archive a project: it becomes read-only",
    tag=TAG,
    response=s.PROJECT,
    errors=(403, 404, 409),
)
def archive_project(project_id):
    ctx = context()
    project = projects.project_for(ctx, project_id, Permission.PROJECT_ADMIN)
    return render_project(projects.archive_project(ctx, project), "admin")


@operation(
    bp,
    "GET",
    "/<project_id>/policy",
    summary="The project's current policy",
    tag=TAG,
    response=s.POLICY,
    errors=(404,),
)
def get_policy(project_id):
    return projects.project_for(context(), project_id, Permission.PROJECT_READ).policy


@operation(
    bp,
    "PUT",
    "/<project_id>/policy",
    summary="Replace the project's policy",
    tag=TAG,
    body=policies.POLICY_SCHEMA,
    response=s.POLICY,
    errors=(400, 403, 404, 409),
)
def put_policy(project_id, body):
    ctx = context()
    project = projects.project_for(ctx, project_id, Permission.PROJECT_ADMIN)
    return projects.set_policy(ctx, project, body).policy


def render_snapshot(snapshot: PolicySnapshot) -> dict:
    return {
        "id": snapshot.id,
        "project_id": snapshot.project_id,
        "policy": snapshot.policy,
        "digest": snapshot.digest,
        "created_at": snapshot.created_at,
        "created_by": snapshot.created_by,
    }


@operation(
    bp,
    "POST",
    "/<project_id>/policy-snapshots",
    summary="Freeze the current policy into an immutable PolicySnapshot",
    tag=TAG,
    response=s.POLICY_SNAPSHOT,
    status=201,
    idempotent=True,
    errors=(403, 404, 409),
)
def create_policy_snapshot(project_id):
    ctx = context()
    project = projects.project_for(ctx, project_id, Permission.PROJECT_WRITE)
    return render_snapshot(policies.snapshot_policy(ctx, project))


def _snapshot(project_id: str, snapshot_id: str, permission: Permission) -> PolicySnapshot:
    project = projects.project_for(context(), project_id, permission)
    found = PolicySnapshot.get_or_none(
        (PolicySnapshot.id == snapshot_id) & (PolicySnapshot.project_id == project.id)
    )
    if found is None:
        raise NotFound(f"no policy snapshot {snapshot_id!r} in this project")
    return found


@operation(
    bp,
    "GET",
    "/<project_id>/policy-snapshots/<snapshot_id>",
    summary="Get a PolicySnapshot",
    tag=TAG,
    response=s.POLICY_SNAPSHOT,
    errors=(404,),
)
def get_policy_snapshot(project_id, snapshot_id):
    return render_snapshot(_snapshot(project_id, snapshot_id, Permission.PROJECT_READ))


# --- members ---------------------------------------------------------------------------------


@operation(
    bp,
    "GET",
    "/<project_id>/members",
    summary="List the project's members and roles",
    tag=TAG,
    response={"type": "array", "items": s.MEMBER},
    errors=(404,),
)
def list_members(project_id):
    project = projects.project_for(context(), project_id, Permission.PROJECT_READ)
    return [{"username": u.username, "role": b.role} for b, u in projects.members(project)]


@operation(
    bp,
    "PUT",
    "/<project_id>/members/<username>",
    summary="Grant a user a role in the project",
    tag=TAG,
    body=s.body({"role": s.ROLE}),
    response=s.MEMBER,
    errors=(400, 403, 404, 409, 422),
)
def put_member(project_id, username, body):
    ctx = context()
    project = projects.project_for(ctx, project_id, Permission.PROJECT_ADMIN)
    binding = projects.set_member(ctx, project, username, body["role"])
    return {"username": binding.user.username, "role": binding.role}


@operation(
    bp,
    "DELETE",
    "/<project_id>/members/<username>",
    summary="Remove a user from the project",
    tag=TAG,
    status=204,
    errors=(403, 404, 409),
)
def delete_member(project_id, username):
    ctx = context()
    project = projects.project_for(ctx, project_id, Permission.PROJECT_ADMIN)
    projects.remove_member(ctx, project, username)
    return current_app.response_class(status=204)


# --- service accounts ---------------------------------------------------------------------


def render_service_account(account: ServiceAccount) -> dict:
    binding = RoleBinding.get(RoleBinding.service_account_id == account.id)
    return {
        "id": account.id,
        "project_id": account.project_id,
        "name": account.name,
        "role": binding.role,
        "created_at": account.created_at,
    }


@operation(
    bp,
    "POST",
    "/<project_id>/service-accounts",
    summary="Create a service account with a role in this project",
    tag=TAG,
    body=s.body({"name": s.NAME, "role": s.ROLE}),
    response=s.SERVICE_ACCOUNT,
    status=201,
    idempotent=True,
    errors=(400, 403, 404, 409),
)
def create_service_account(project_id, body):
    ctx = context()
    project = projects.project_for(ctx, project_id, Permission.PROJECT_ADMIN)
    account = identities.create_service_account(ctx, project, body["name"], body["role"])
    return render_service_account(account)


@operation(
    bp,
    "GET",
    "/<project_id>/service-accounts",
    summary="List service accounts",
    tag=TAG,
    query=QUERY,
    response=page_schema(s.SERVICE_ACCOUNT),
    errors=(403, 404),
)
def list_service_accounts(project_id):
    project = projects.project_for(context(), project_id, Permission.PROJECT_ADMIN)

    def fetch(after, limit):
        query = ServiceAccount.select().where(ServiceAccount.project_id == project.id)
        if after:
            query = query.where(ServiceAccount.id > after)
        return query.order_by(ServiceAccount.id).limit(limit)

    return page(fetch, render_service_account)


@operation(
    bp,
    "POST",
    "/<project_id>/service-accounts/<account_id>/tokens",
    summary="Issue an API token for a service account (the secret is returned once)",
    tag=TAG,
    body=s.body({}, {"name": s.NAME, "ttl_seconds": {"type": "integer", "minimum": 60}}),
    response=s.TOKEN,
    status=201,
    errors=(400, 403, 404, 409),
)
def create_service_account_token(project_id, account_id, body):
    from appliance.api.identity import issue_token_response

    ctx = context()
    project = projects.project_for(ctx, project_id, Permission.PROJECT_ADMIN)
    account = ServiceAccount.get_or_none(
        (ServiceAccount.id == account_id) & (ServiceAccount.project_id == project.id)
    )
    if account is None:
        raise NotFound(f"no service account {account_id!r} in this project")
    return issue_token_response(ctx, body, service_account=account)
