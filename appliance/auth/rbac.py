"""The one policy function that decides every request (DESIGN §8), default deny.

Project roles: viewer < editor < admin, bound per project to a user or service account.
System roles: ``admin`` manages users; ``auditor`` reads every audit event and nothing else.
Neither system role grants access to a project's records.
"""

from __future__ import annotations

from enum import StrEnum

from appliance.domain.context import Principal
from appliance.domain.records import RoleBinding

ROLES = ("viewer", "editor", "admin")
_RANK = {role: rank for rank, role in enumerate(ROLES, start=1)}


class Permission(StrEnum):
    PROJECT_READ = "project:read"
    PROJECT_WRITE = "project:write"
    PROJECT_ADMIN = "project:admin"
    PROJECT_AUDIT_READ = "project:audit:read"
    PROJECT_CREATE = "system:project:create"
    USERS_MANAGE = "system:users:manage"
    AUDIT_READ_ALL = "system:audit:read"


_REQUIRED_ROLE = {
    Permission.PROJECT_READ: "viewer",
    Permission.PROJECT_WRITE: "editor",
    Permission.PROJECT_ADMIN: "admin",
    Permission.PROJECT_AUDIT_READ: "admin",
}


class Decision(StrEnum):
    ALLOW = "allow"
    #: The caller may not even know the object exists: answer 404.
    HIDE = "hide"
    #: The caller can see the object but may not do this: answer 403.
    DENY = "deny"


def project_role(principal: Principal, project_id: str) -> str | None:
    if principal.kind == "user":
        binding = RoleBinding.get_or_none(
            (RoleBinding.project_id == project_id) & (RoleBinding.user_id == principal.id)
        )
    elif principal.kind == "service_account":
        if principal.project_id != project_id:
            return None
        binding = RoleBinding.get_or_none(
            (RoleBinding.project_id == project_id)
            & (RoleBinding.service_account_id == principal.id)
        )
    else:
        return None
    return binding.role if binding else None


def decide(principal: Principal, permission: Permission, project_id: str | None = None) -> Decision:
    """Whether ``principal`` holds ``permission`` (on ``project_id`` for project permissions)."""
    if not principal.authenticated:
        return Decision.DENY
    if permission is Permission.PROJECT_CREATE:
        ok = principal.kind == "user" and principal.system_role != "auditor"
        return Decision.ALLOW if ok else Decision.DENY
    if permission is Permission.USERS_MANAGE:
        return Decision.ALLOW if principal.is_system_admin else Decision.DENY
    if permission is Permission.AUDIT_READ_ALL:
        return Decision.ALLOW if principal.is_auditor else Decision.DENY
    if permission is Permission.PROJECT_AUDIT_READ and principal.is_auditor:
        return Decision.ALLOW
    if project_id is None:
        raise ValueError(f"{permission} needs a project")
    role = project_role(principal, project_id)
    if role is None:
        return Decision.HIDE
    return Decision.ALLOW if _RANK[role] >= _RANK[_REQUIRED_ROLE[permission]] else Decision.DENY
