"""Who is acting, and on behalf of which request: passed to every use case."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    """An authenticated caller (or the system itself, or nobody)."""

    kind: str  # "user" | "service_account" | "data_plane" | "system" | "anonymous"
    id: str | None = None
    name: str = ""
    system_role: str | None = None  # "admin" | "auditor" for users
    project_id: str | None = None  # the home project of a service account
    token_id: str | None = None

    @property
    def actor(self) -> str:
        """How the principal appears in audit events."""
        if self.kind == "user":
            return f"user:{self.name}"
        if self.kind == "service_account":
            return f"service_account:{self.project_id}/{self.name}"
        if self.kind == "data_plane":
            return f"data_plane:{self.name}"
        return self.kind

    @property
    def authenticated(self) -> bool:
        return self.kind in {"user", "service_account", "system", "data_plane"}

    @property
    def is_system_admin(self) -> bool:
        return self.kind == "user" and self.system_role == "admin"

    @property
    def is_auditor(self) -> bool:
        return self.kind == "user" and self.system_role == "auditor"


SYSTEM = Principal(kind="system", name="system")
ANONYMOUS = Principal(kind="anonymous")


@dataclass(frozen=True)
class Context:
    principal: Principal
    request_id: str
