"""Install operations that touch the database: the verification record and the rollback."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path

from appliance import db
from appliance.audit import log as audit_log
from appliance.audit.actions import Action
from appliance.config import Config
from appliance.domain.context import SYSTEM, Context
from appliance.domain.records import AuditEvent
from appliance.install.releases import Installation, InstallError, activate, schema_head


def _context(what: str) -> Context:
    return Context(SYSTEM, f"install_{what}_{secrets.token_hex(6)}")


def _open_database() -> None:
    db.bind(db.open_database(Config.from_env().effective_database_url))


def record_verification(installation: Installation, verification: dict) -> dict:
    """Append the bundle's verification to the audit chain, once per bundle (manifest digest).

    The schema must be migrated (``animus db upgrade``) first. On a new installation this is
    the first event of the chain: the evidence that the checksums were checked.
    """
    _open_database()
    if db.current_version() != len(db.available_migrations()):
        raise InstallError("migrate the database first (`animus db upgrade`)")
    digest = verification["manifest_sha256"]
    with db.write_transaction():
        existing = (
            AuditEvent.select(AuditEvent.seq)
            .where(
                (AuditEvent.action == str(Action.BUNDLE_VERIFIED))
                & (AuditEvent.object_id == digest)
            )
            .first()
        )
        if existing is not None:
            return {"changed": False, "seq": existing.seq, "version": verification["version"]}
        event = audit_log.record(
            _context("record"),
            Action.BUNDLE_VERIFIED,
            object_type="bundle",
            object_id=digest,
            payload={
                "version": verification["version"],
                "manifest_sha256": digest,
                "signer_fingerprint": verification["signer_fingerprint"],
                "files": verification.get("files"),
                "bytes": verification.get("bytes"),
                "upgraded_from": _upgraded_from(installation, verification["version"]),
                "prefix": str(installation.prefix),
            },
        )
    return {"changed": True, "seq": event.seq, "version": verification["version"]}


def _upgraded_from(installation: Installation, version: str) -> str | None:
    """The release this bundle replaces, whether it was recorded before or after activation."""
    current = installation.current
    return installation.previous if current == version else current


def run_services(control: Path | None, action: str) -> None:
    """Run ``PREFIX/bin/animusctl ACTION`` when the installation has one."""
    if control is None or not control.exists():
        return
    proc = subprocess.run(
        [str(control), action], capture_output=True, text=True, check=False, timeout=300
    )
    if proc.returncode != 0:
        raise InstallError(f"{control} {action} failed: {(proc.stderr or proc.stdout)[-400:]}")


def rollback(
    installation: Installation, *, services: Path | None, say: Callable[[str], None]
) -> dict:
    """Return to the previous release: stop, record the start, revert the schema, switch,
    record the end, start.

    The schema is reverted by the running (newer) release, which knows how to undo its own
    migrations, down to the newest version the previous release knows. Data the older schema
    can hold stays; the audit chain is never reverted (migration 0001 refuses). The chain
    says what happened even when a step fails: ``rollback_started`` comes before anything
    changes, then ``rolled_back`` once the link is switched, or ``rollback_failed`` with the
    schema version and the release left current (a ``rollback_started`` alone: the
    rollback was cut off).
    """
    current, previous = installation.current, installation.previous
    if current is None:
        raise InstallError(f"nothing is installed under {installation.prefix}")
    if previous is None or previous == current:
        raise InstallError("there is no previous release to roll back to")
    target = schema_head(installation, previous)
    say(f"rollback {current} → {previous}: stopping the services")
    run_services(services, "stop")
    _open_database()
    schema_from = db.current_version()
    if schema_from < target:
        raise InstallError(
            f"the database is at schema {schema_from}, older than release {previous} needs "
            f"({target}); nothing was changed"
        )
    plan = {"from": current, "to": previous, "schema_from": schema_from, "schema_to": target}
    context = _context("rollback")
    _record_release(context, Action.RELEASE_ROLLBACK_STARTED, previous, plan)
    try:
        if schema_from > target:
            say(f"reverting the schema {schema_from} → {target}")
            db.downgrade(target, log=lambda line: say(f"    {line}"))
        activate(installation, previous)
    except (db.MigrationError, InstallError, OSError) as exc:
        left = {"schema_now": db.current_version(), "current": installation.current}
        _record_release(
            context, Action.RELEASE_ROLLBACK_FAILED, previous, {**plan, **left, "error": str(exc)}
        )
        db.database.close_all()
        raise InstallError(
            f"cannot roll back: {exc}; the database is at schema {left['schema_now']} and "
            f"{left['current']} is still current (services stopped)"
        ) from None
    _record_release(context, Action.RELEASE_ROLLED_BACK, previous, plan)
    db.database.close_all()
    say(f"release {previous} is current; starting the services")
    run_services(services, "start")
    return plan


def _record_release(context: Context, action: Action, version: str, payload: dict) -> None:
    with db.write_transaction():
        audit_log.record(context, action, object_type="release", object_id=version, payload=payload)
