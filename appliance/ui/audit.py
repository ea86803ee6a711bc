"""Pages for auditors: the audit log with filters and paging, chain status, signed export
download and the offline verifier with instructions."""

from __future__ import annotations

from flask import current_app, redirect, request, send_file, url_for

from appliance.api.routing import context
from appliance.audit import chain_export
from appliance.audit import log as audit_chain
from appliance.audit.export_package import Signer
from appliance.auth.rbac import Permission
from appliance.domain.records import AuditEvent
from appliance.errors import AnimusError
from appliance.ui.web import PAGE_SIZE, bp, config, page, require

AUDITOR_ONLY = "the whole audit log is for the system auditor role"
FILTERS = ("project_id", "action", "actor", "object_id")


def events_page(*conditions, scope: str | None = None):
    """A page of events in chain order from ``?after_seq=``, narrowed by ``conditions``."""
    raw = request.args.get("after_seq", "0") or "0"
    if not raw.isdigit():
        raise AnimusError("after_seq must be a non-negative whole number", code="invalid_request")
    after = int(raw)
    query = AuditEvent.select().where(AuditEvent.seq > after, *conditions)
    rows = list(query.order_by(AuditEvent.seq).limit(PAGE_SIZE + 1))
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    head = AuditEvent.select(AuditEvent.seq).order_by(AuditEvent.seq.desc()).scalar() or 0
    return page(
        "audit.html",
        events=rows,
        next_after=rows[-1].seq if more else None,
        after=after,
        head=head,
        scope=scope,
        filters={name: request.args.get(name, "") for name in FILTERS},
    )


@bp.get("/audit")
def audit_log():
    require(Permission.AUDIT_READ_ALL, AUDITOR_ONLY)
    conditions = [
        getattr(AuditEvent, name) == request.args[name][:200]
        for name in FILTERS
        if request.args.get(name)
    ]
    return events_page(*conditions)


@bp.get("/audit/chain")
def chain_status():
    require(Permission.AUDIT_READ_ALL, AUDITOR_ONLY)
    verdict = audit_chain.verify()
    return page("chain.html", verdict=verdict)


def _signer() -> Signer:
    settings = config()
    return Signer(settings.gnupg_home, settings.signing_key)


@bp.get("/audit/export")
def export_page():
    """What an export holds and how to verify it; never creates the signing key."""
    require(Permission.AUDIT_READ_ALL, AUDITOR_ONLY)
    key = chain_export.signing_key_if_made(_signer())
    head = AuditEvent.select(AuditEvent.seq).order_by(AuditEvent.seq.desc()).scalar() or 0
    return page("export.html", key=key, head=head)


@bp.post("/audit/signing-key")
def create_signing_key():
    """Create the installation's signing key (audited), the step before a first export."""
    require(Permission.AUDIT_READ_ALL, AUDITOR_ONLY)
    chain_export.create_signing_key(context(), _signer())
    return redirect(url_for("ui.export_page"))


@bp.post("/audit/export")
def download_export():
    """Record the export and send the signed tar of the chain up to that event."""
    require(Permission.AUDIT_READ_ALL, AUDITOR_ONLY)
    name, package = chain_export.export_chain(
        context(), _signer(), current_app.extensions["animus.blobs"].tmp_dir
    )
    return send_file(package, mimetype="application/x-tar", as_attachment=True, download_name=name)


@bp.get("/audit/verifier")
def download_verifier():
    require(Permission.AUDIT_READ_ALL, AUDITOR_ONLY)
    return send_file(
        chain_export.VERIFIER,
        mimetype="text/x-python",
        as_attachment=True,
        download_name="verify_audit_export.py",
        max_age=None,
    )
