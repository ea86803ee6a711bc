"""Cursor pagination for list endpoints: ``?limit=&cursor=`` → ``{items, next_cursor}``."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Sequence
from typing import Any

from flask import request

from appliance.errors import AnimusError

_CURSOR = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
_ID = re.compile(r"^[a-z]+_[0-9a-z]+$")
DEFAULT_LIMIT = 50
MAX_LIMIT = 500

QUERY = {
    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
    "cursor": {"type": "string", "description": "next_cursor of the previous page"},
}


def page_schema(item: dict) -> dict:
    return {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": item},
            "next_cursor": {"type": ["string", "null"]},
        },
    }


def limit_arg(name: str = "limit", default: int = DEFAULT_LIMIT) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise AnimusError(
            f"{name} must be an integer from 1 to {MAX_LIMIT}",
            code="invalid_request",
            details={"field": name},
        )
    return int(raw)


def cursor_arg() -> str | None:
    raw = request.args.get("cursor")
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
        raise AnimusError("the cursor is not one this API issued", code="invalid_cursor") from None


def page(
    fetch: Callable[[str | None, int], Sequence[Any]],
    render: Callable[[Any], dict],
    key: Callable[[Any], str] = lambda r: r.id,
) -> dict:
    """Fetch one page (asking for one extra row to know whether another page follows)."""
    limit = limit_arg()
    rows = list(fetch(cursor_arg(), limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = (
        base64.urlsafe_b64encode(key(rows[-1]).encode()).decode().rstrip("=")
        if more and rows
        else None
    )
    return {"items": [render(r) for r in rows], "next_cursor": next_cursor}
