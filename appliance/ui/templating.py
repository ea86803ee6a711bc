"""Template filters and the values every page sees (who is signed in, their CSRF token)."""

from __future__ import annotations

import json

from flask import g

from appliance.auth.rbac import Permission
from appliance.domain.context import ANONYMOUS
from appliance.ui.security import csrf_token, upload_token
from appliance.ui.web import allowed, bp, link_with

TERMINAL = ("succeeded", "failed", "canceled")


def human_size(size: int | None) -> str:
    if size is None:
        return "—"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def short_digest(digest: str | None, length: int = 12) -> str:
    if not digest:
        return "—"
    algorithm, _, hexdigest = digest.rpartition(":")
    return f"{algorithm + ':' if algorithm else ''}{hexdigest[:length]}…"


def moment(value: str | None) -> str:
    """RFC 3339 to ``YYYY-MM-DD HH:MM:SS UTC`` (the full value stays in a title)."""
    if not value:
        return "—"
    return value[:19].replace("T", " ") + " UTC"


def pretty_json(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


bp.add_app_template_filter(human_size, "size")
bp.add_app_template_filter(short_digest, "short")
bp.add_app_template_filter(moment, "moment")
bp.add_app_template_filter(pretty_json, "pretty")


@bp.context_processor
def shared():
    principal = g.get("principal", ANONYMOUS)
    signed_in = principal.kind == "user"
    return {
        "principal": principal,
        "signed_in": signed_in,
        "csrf_token": csrf_token,
        "upload_token": upload_token,
        "is_system_admin": signed_in and allowed(Permission.USERS_MANAGE),
        "is_auditor": signed_in and allowed(Permission.AUDIT_READ_ALL),
        "may_create_projects": signed_in and allowed(Permission.PROJECT_CREATE),
        "pv": g.get("project_view"),
        "link_with": link_with,
        "terminal_states": TERMINAL,
    }
