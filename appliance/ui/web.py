"""The UI blueprint and what every page shares: the acting principal, the project a page is
about with the caller's role in it, paging, and turning refused form input into a page.

Pages call the same domain services as the JSON API with the same Context; the domain checks
authorization (``project_for``) and writes the audit events. Nothing here reads around it.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import peewee
from flask import Blueprint, current_app, g, render_template, request, url_for

from appliance.api.routing import context
from appliance.auth.rbac import ROLES, Decision, Permission, decide, project_role
from appliance.domain.projects import project_for
from appliance.domain.records import Project
from appliance.errors import AnimusError, Forbidden, Hidden, NotFound

bp = Blueprint(
    "ui",
    __name__,
    url_prefix="/ui",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)

PAGE_SIZE = 50
#: Most nodes of a lineage chart drawn inside another page (its own page draws more).
LINEAGE_NODES = 15
_CURSOR = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
_ID = re.compile(r"^[a-z]+_[0-9a-z]+$")


@dataclass(frozen=True)
class ProjectView:
    """A project as a page shows it: the record and what the caller may do there."""

    project: Project
    role: str | None

    @property
    def can_write(self) -> bool:
        return self.project.state == "active" and ROLES.index(self.role or "viewer") >= 1

    @property
    def can_admin(self) -> bool:
        return self.project.state == "active" and self.role == "admin"

    @property
    def can_audit(self) -> bool:
        return self.role == "admin"


def load_project(project_id: str, permission: Permission = Permission.PROJECT_READ) -> ProjectView:
    """The project through the domain's access check (404 when hidden, 403 when too low)."""
    ctx = context()
    project = project_for(ctx, project_id, permission)
    view = ProjectView(project, project_role(ctx.principal, project.id))
    g.project_view = view
    return view


def allowed(permission: Permission) -> bool:
    return decide(context().principal, permission) is Decision.ALLOW


def require(permission: Permission, message: str) -> None:
    if not allowed(permission):
        raise Forbidden(message)


def page(template: str, status: int = 200, **values: Any):
    return render_template(f"ui/{template}", **values), status


def form_error(
    render: Callable[..., Any],
    error: AnimusError,
    *,
    inline_not_found: bool = False,
    **values: Any,
):
    """Show a refused form again with the reason; refusals of access stay errors.

    ``inline_not_found``: a NotFound about something the form named (a model picked from a
    list) is shown on the form. A Forbidden, and a Hidden (an object the caller may not
    see), always propagate, so the denial is audited and nothing leaks.
    """
    if isinstance(error, Forbidden | Hidden):
        raise error
    if isinstance(error, NotFound) and not inline_not_found:
        raise error
    body, _ = render(error=error, **values)
    return body, error.status


def field(name: str, *, required: bool = True, limit: int = 10_000) -> str:
    value = request.form.get(name, "")
    if len(value) > limit:
        raise AnimusError(f"{name} is longer than {limit} characters", code="invalid_request")
    if required and not value.strip():
        raise AnimusError(f"{name.replace('_', ' ')} is required", code="invalid_request")
    return value


def encode_cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def decode_cursor(name: str = "before") -> str | None:
    raw = request.args.get(name)
    if not raw:
        return None
    try:
        if not _CURSOR.match(raw):
            raise ValueError(raw)
        decoded = base64.urlsafe_b64decode(raw.encode() + b"=" * (-len(raw) % 4)).decode()
        if not _ID.match(decoded):
            raise ValueError(decoded)
        return decoded
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise AnimusError(
            "the page link is not one this site made", code="invalid_cursor"
        ) from None


def newest_first(
    query: peewee.ModelSelect, id_field: peewee.Field, limit: int = PAGE_SIZE
) -> tuple[Sequence[Any], str | None]:
    """One page of ``query`` by descending id (ids are time-ordered: newest first).

    Returns the rows and the cursor of the next (older) page, or None on the last page.
    """
    before = decode_cursor()
    if before:
        query = query.where(id_field < before)
    rows = list(query.order_by(id_field.desc()).limit(limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, encode_cursor(getattr(rows[-1], id_field.name)) if more and rows else None


def link_with(**changes: Any) -> str:
    """The current page's URL with some query arguments changed (None drops one)."""
    # Query arguments come from the client: those url_for reads itself (``_external``,
    # ``_method``, ``_anchor``…) or that would collide with the path's own are dropped.
    path_args = request.view_args or {}
    args = {
        k: v
        for k, v in request.args.items()
        if k not in changes and not k.startswith("_") and k not in path_args
    }
    args.update({k: v for k, v in changes.items() if v is not None})
    return url_for(request.endpoint, **path_args, **args)


def config():
    return current_app.config["ANIMUS"]


_PAGES = {
    "dataset_version": ("ui.dataset_version", "version_id"),
    "run": ("ui.run", "run_id"),
    "model_version": ("ui.model_version", "version_id"),
    "model": ("ui.model", "model_id"),
}


def object_href(project_id: str, kind: str, object_id: str) -> str | None:
    """The page of a record in the project, for the kinds that have one."""
    target = _PAGES.get(kind)
    if target is None:
        return None
    endpoint, argument = target
    return url_for(endpoint, project_id=project_id, **{argument: object_id})


def lineage_chart(project_id: str, graph: dict):
    """The lineage graph of ``domain.lineage`` as an SVG DAG with links to each record."""
    from appliance.ui.charts import Node, dag_chart

    nodes = [
        Node(
            id=n["id"],
            label=n["label"],
            kind=n["type"] + (" root" if n["id"] == graph["root"] else ""),
            href=object_href(project_id, n["type"], n["id"]),
            note=n["type"].replace("_", " "),
        )
        for n in graph["nodes"]
    ]
    edges = [(e["from"], e["to"]) for e in graph["edges"]]
    return dag_chart(nodes, edges, "lineage graph")
