"""Projects, the isolation boundary: creation, archiving, members, policy, and access checks."""

from __future__ import annotations

import re

from appliance import db
from appliance.audit import log as audit
from appliance.audit.actions import Action
from appliance.auth.rbac import ROLES, Decision, Permission, decide
from appliance.domain.context import Context
from appliance.domain.policies import DEFAULT_POLICY, policy_digest, validate_policy
from appliance.domain.records import Project, RoleBinding, User, create_named, new_id, utc_now
from appliance.errors import AnimusError, Forbidden, Hidden, NotFound, ValidationFailed

PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")


def project_for(ctx: Context, project_id: str, permission: Permission) -> Project:
    """Load a project the caller holds ``permission`` on.

    A project the caller may not read answers NotFound, exactly like one that does not exist;
    a write to an archived project answers ``project_archived``.
    """
    project = Project.get_or_none(Project.id == project_id)
    if project is None:
        raise NotFound(f"no project {project_id!r}")
    decision = decide(ctx.principal, permission, project_id)
    if decision is Decision.HIDE:
        raise Hidden(f"no project {project_id!r}")
    if decision is Decision.DENY:
        raise Forbidden(f"{permission} on this project needs a higher role")
    if (
        permission in (Permission.PROJECT_WRITE, Permission.PROJECT_ADMIN)
        and project.state != "active"
    ):
        raise AnimusError("the project is archived and read-only", code="project_archived")
    return project


def create_project(ctx: Context, name: str, description: str = "") -> Project:
    if decide(ctx.principal, Permission.PROJECT_CREATE) is not Decision.ALLOW:
        raise Forbidden("this account may not create projects")
    if not PROJECT_NAME.match(name):
        raise ValidationFailed(
            "name must be 1-100 characters: letters, digits, space, '.', '_' or '-'",
            details={"field": "name"},
        )
    with db.write_transaction():
        project = create_named(
            Project,
            "a project",
            id=new_id("prj"),
            name=name,
            description=description,
            policy=DEFAULT_POLICY,
            created_by=ctx.principal.actor,
        )
        RoleBinding.create(
            id=new_id("rb"), project_id=project.id, user_id=ctx.principal.id, role="admin"
        )
        audit.record(
            ctx,
            Action.PROJECT_CREATED,
            project_id=project.id,
            object_type="project",
            object_id=project.id,
            payload={"name": name, "description": description},
        )
    return project


def visible_projects(ctx: Context, *, after: str | None, limit: int) -> list[Project]:
    """Projects the caller has a role in, in id order, after the cursor ``after``."""
    principal = ctx.principal
    query = Project.select()
    if principal.kind == "user":
        query = query.join(RoleBinding, on=(RoleBinding.project_id == Project.id)).where(
            RoleBinding.user_id == principal.id
        )
    elif principal.kind == "service_account":
        query = query.where(Project.id == principal.project_id)
    else:
        return []
    if after:
        query = query.where(Project.id > after)
    return list(query.order_by(Project.id).limit(limit))


def archive_project(ctx: Context, project: Project) -> Project:
    with db.write_transaction():
        project.state = "archived"
        project.archived_at = utc_now()
        Project.update(state=project.state, archived_at=project.archived_at).where(
            Project.id == project.id
        ).execute()
        audit.record(
            ctx,
            Action.PROJECT_ARCHIVED,
            project_id=project.id,
            object_type="project",
            object_id=project.id,
        )
    return project


def set_policy(ctx: Context, project: Project, policy: object) -> Project:
    policy = validate_policy(policy)
    with db.write_transaction():
        project.policy = policy
        Project.update(policy=policy).where(Project.id == project.id).execute()
        audit.record(
            ctx,
            Action.PROJECT_POLICY_UPDATED,
            project_id=project.id,
            object_type="project",
            object_id=project.id,
            payload={"policy": policy, "digest": policy_digest(policy)},
        )
    return project


def members(project: Project) -> list[tuple[RoleBinding, User]]:
    query = (
        RoleBinding.select(RoleBinding, User)
        .join(User, on=(RoleBinding.user_id == User.id), attr="user")
        .where(RoleBinding.project_id == project.id)
        .order_by(User.username)
    )
    return [(binding, binding.user) for binding in query]


def set_member(ctx: Context, project: Project, username: str, role: str) -> RoleBinding:
    if role not in ROLES:
        raise ValidationFailed(f"role must be one of {', '.join(ROLES)}", details={"field": "role"})
    user = User.get_or_none(User.username == username)
    if user is None or not user.is_active:
        raise NotFound(f"no user {username!r}")
    if user.system_role == "auditor":
        raise ValidationFailed("an auditor reads audit events only and cannot join a project")
    with db.write_transaction():
        binding = RoleBinding.get_or_none(
            (RoleBinding.project_id == project.id) & (RoleBinding.user_id == user.id)
        )
        previous = binding.role if binding else None
        if binding is None:
            binding = RoleBinding.create(
                id=new_id("rb"), project_id=project.id, user_id=user.id, role=role
            )
        elif binding.role != role:
            _refuse_losing_last_admin(project, binding)
            binding.role = role
            binding.save()
        audit.record(
            ctx,
            Action.PROJECT_MEMBER_SET,
            project_id=project.id,
            object_type="role_binding",
            object_id=binding.id,
            payload={"username": username, "role": role, "previous_role": previous},
        )
    binding.user = user
    return binding


def remove_member(ctx: Context, project: Project, username: str) -> None:
    user = User.get_or_none(User.username == username)
    binding = user and RoleBinding.get_or_none(
        (RoleBinding.project_id == project.id) & (RoleBinding.user_id == user.id)
    )
    if not binding:
        raise NotFound(f"{username!r} is not a member of this project")
    with db.write_transaction():
        _refuse_losing_last_admin(project, binding)
        binding.delete_instance()
        audit.record(
            ctx,
            Action.PROJECT_MEMBER_REMOVED,
            project_id=project.id,
            object_type="role_binding",
            object_id=binding.id,
            payload={"username": username, "previous_role": binding.role},
        )


def _refuse_losing_last_admin(project: Project, binding: RoleBinding) -> None:
    if binding.role != "admin":
        return
    admins = (
        RoleBinding.select()
        .where(
            (RoleBinding.project_id == project.id)
            & (RoleBinding.role == "admin")
            & RoleBinding.user_id.is_null(False)
        )
        .count()
    )
    if admins <= 1:
        raise AnimusError("a project keeps at least one admin", code="last_admin")
