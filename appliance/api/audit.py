"""/api/v1 audit: reading the chain (project admins: their project; auditors: everything)."""

from __future__ import annotations

from flask import Blueprint, request

from appliance.api import schemas as s
from appliance.api.pages import limit_arg
from appliance.api.routing import context, operation
from appliance.audit import log as audit_log
from appliance.auth.rbac import Decision, Permission, decide
from appliance.domain.projects import project_for
from appliance.domain.records import AuditEvent
from appliance.errors import AnimusError, Forbidden

bp = Blueprint("audit", __name__, url_prefix="/api/v1")
TAG = "audit"

AUDIT_QUERY = {
    "after_seq": {"type": "integer", "minimum": 0, "default": 0},
    "limit": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
}


def render_event(event: AuditEvent) -> dict:
    return {
        "seq": event.seq,
        "at": event.at,
        "actor": event.actor,
        "action": event.action,
        "project_id": event.project_id,
        "object_type": event.object_type,
        "object_id": event.object_id,
        "request_id": event.request_id,
        "payload": event.payload,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    }


def _events_page(*conditions) -> dict:
    raw = request.args.get("after_seq", "0")
    if not raw.isdigit():
        raise AnimusError(
            "after_seq must be a non-negative integer",
            code="invalid_request",
            details={"field": "after_seq"},
        )
    limit = limit_arg()
    query = AuditEvent.select().where(AuditEvent.seq > int(raw), *conditions)
    rows = list(query.order_by(AuditEvent.seq).limit(limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "items": [render_event(e) for e in rows],
        "next_after_seq": rows[-1].seq if more else None,
    }


@operation(
    bp,
    "GET",
    "/projects/<project_id>/audit-events",
    summary="A project's audit events in chain order (project admins and auditors)",
    tag=TAG,
    query=AUDIT_QUERY,
    response=s.AUDIT_PAGE,
    errors=(403, 404),
)
def project_events(project_id):
    project = project_for(context(), project_id, Permission.PROJECT_AUDIT_READ)
    return _events_page(AuditEvent.project_id == project.id)


def _auditor():
    if decide(context().principal, Permission.AUDIT_READ_ALL) is not Decision.ALLOW:
        raise Forbidden("reading the whole audit log needs the system auditor role")


@operation(
    bp,
    "GET",
    "/audit-events",
    summary="Every audit event in chain order (auditors)",
    tag=TAG,
    query={
        **AUDIT_QUERY,
        "project_id": {"type": "string"},
        "action": {"type": "string"},
        "actor": {"type": "string"},
    },
    response=s.AUDIT_PAGE,
    errors=(403,),
)
def all_events():
    _auditor()
    conditions = [
        getattr(AuditEvent, name) == request.args[name]
        for name in ("project_id", "action", "actor")
        if request.args.get(name)
    ]
    return _events_page(*conditions)


@operation(
    bp,
    "GET",
    "/audit/chain",
    summary="Verify the whole chain now (auditors)",
    tag=TAG,
    response=s.CHAIN_STATUS,
    errors=(403,),
)
def chain_status():
    _auditor()
    verdict = audit_log.verify()
    return {
        "ok": verdict.ok,
        "count": verdict.count,
        "head_hash": verdict.head_hash,
        "broken_seq": verdict.broken_seq,
        "reason": verdict.reason,
    }
