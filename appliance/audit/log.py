"""Appending to the audit chain inside the caller's transaction, and reading it back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from appliance import db
from appliance.audit import chain
from appliance.audit.actions import Action
from appliance.domain.context import Context
from appliance.domain.records import AuditEvent, SystemSetting, utc_now

# PostgreSQL advisory lock key that serializes appends into one chain order.
_CHAIN_LOCK_KEY = 0x616E_696D_0002


def installation_id() -> str:
    return SystemSetting.get_by_id("installation_id").value


def genesis() -> str:
    return chain.genesis_hash(installation_id())


def record(
    ctx: Context,
    action: Action,
    *,
    object_type: str,
    object_id: str,
    project_id: str | None = None,
    payload: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event to the chain. Must run inside the transaction of the action it records.

    The chain head is read under a lock held until that transaction ends, so concurrent
    writers append one after another and an event never exists without its action.
    """
    database = db.database.obj
    if database.transaction_depth() == 0:
        raise RuntimeError("audit events are recorded inside the action's transaction")
    if db.dialect(database) == "postgresql":
        database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_CHAIN_LOCK_KEY,))
    # On SQLite the write transaction is IMMEDIATE: writers are already serialized.
    head = (
        AuditEvent.select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).first()
    )
    seq, prev_hash = (head.seq + 1, head.hash) if head else (1, genesis())
    event = {
        "seq": seq,
        "at": utc_now(),
        "actor": ctx.principal.actor,
        "action": str(action),
        "project_id": project_id,
        "object_type": object_type,
        "object_id": object_id,
        "request_id": ctx.request_id,
        "payload": payload or {},
        "prev_hash": prev_hash,
    }
    text = chain.canonical(event)
    return AuditEvent.create(**event, hash=chain.event_hash(prev_hash, text), canonical=text)


def decode_row(row: tuple) -> tuple[int, dict, str, str, str]:
    """An ``audit_events`` row selected as ``seq, at, actor, action, project_id, object_type,
    object_id, request_id, payload, prev_hash, hash, canonical`` → ``(seq, event fields,
    canonical, prev_hash, hash)``, what ``chain.verify_chain`` reads."""
    columns = dict(zip(chain.EVENT_FIELDS[:8], row[:8], strict=True))
    columns["payload"] = json.loads(row[8])
    columns["prev_hash"] = row[9]
    return row[0], columns, row[11], row[9], row[10]


def iter_rows(batch: int = 5000) -> Iterator[tuple[int, dict, str, str, str]]:
    """Every stored event as ``(seq, columns, canonical, prev_hash, hash)`` in seq order."""
    database = db.database.obj
    last = 0
    while True:
        cursor = database.execute_sql(
            "SELECT seq, at, actor, action, project_id, object_type, object_id, request_id,"
            " payload, prev_hash, hash, canonical FROM audit_events"
            f" WHERE seq > {database.param} ORDER BY seq LIMIT {int(batch)}",
            (last,),
        )
        rows = cursor.fetchall()
        if not rows:
            return
        yield from map(decode_row, rows)
        last = rows[-1][0]


def verify() -> chain.Verdict:
    """Verify the whole stored chain, columns included."""
    return chain.verify_chain(iter_rows(), genesis())
