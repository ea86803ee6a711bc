"""Install operations that touch the database: the verification record, the activation
check and the rollback."""

from __future__ import annotations

import secrets
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn
from urllib.parse import unquote, urlparse

import peewee

from appliance import db
from appliance.audit import log as audit_log
from appliance.audit.actions import Action
from appliance.config import Config
from appliance.domain.context import SYSTEM, Context
from appliance.domain.records import AuditEvent
from appliance.install.releases import Installation, InstallError, activate, schema_head
from appliance.ops.backup import BackupError, create_backup


def _context(what: str) -> Context:
    return Context(SYSTEM, f"install_{what}_{secrets.token_hex(6)}")


def _open_database(config: Config | None = None) -> None:
    config = config or Config.from_env()
    db.bind(db.open_database(config.effective_database_url))


def database_schema(config: Config) -> int | None:
    """The schema version of the database in place, or None when there is no database yet.

    Only reads: a SQLite file that does not exist is not created (opening it would), and a
    database without ``schema_migrations`` is not given one (``db.current_version`` would).
    The models stay bound to the database afterwards.
    """
    url = config.effective_database_url
    parsed = urlparse(url)
    if parsed.scheme == "sqlite" and not Path(unquote(parsed.path)).is_file():
        return None
    _open_database(config)
    try:
        if not db.database.table_exists("schema_migrations"):
            return 0
        row = db.database.execute_sql("SELECT MAX(version) FROM schema_migrations").fetchone()
    except peewee.DatabaseError as exc:
        raise InstallError(f"cannot read the database's schema version: {exc}") from None
    return int(row[0] or 0)


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


def check_release(installation: Installation, version: str, config: Config | None = None) -> dict:
    """Refuse release VERSION if the database's schema is newer than any it knows.

    Such a release cannot run on the database: its code fails on the newer schema and it
    cannot revert migrations it has never seen. The way back to it is ``animus rollback``,
    run by the newer release, or a restore of a backup taken with it. Changes nothing; no
    database yet (a new installation) fits any release.
    """
    newest = _schema_head(installation, version)
    schema = database_schema(config or Config.from_env())
    if schema is not None and schema > newest:
        if version == installation.previous:
            way_back = f"`animus rollback` returns to {version} and reverts the schema"
        else:
            way_back = (
                f"to go back to {version}, restore a backup taken with it (`animus restore`, "
                "docs/ops/backup.md)"
            )
        raise InstallError(
            f"release {version} knows the database schema up to version {newest}, the "
            f"database is at {schema}: it cannot run on it. {way_back}; nothing was changed"
        )
    return {"changed": False, "version": version, "schema_newest": newest, "schema": schema}


def _schema_head(installation: Installation, version: str) -> int:
    """The newest schema version of release VERSION: this process's own when it runs from
    that release (the installer's case), else asked of the release."""
    if Path(sys.prefix).resolve() == (installation.release_dir(version) / "venv").resolve():
        return len(db.available_migrations())
    return schema_head(installation, version)


def activate_release(installation: Installation, version: str) -> dict:
    """Make release VERSION current after checking it can run on the database (see
    ``check_release``); the release it replaces becomes ``previous``."""
    installation.release_dir(version)
    if installation.current != version and installation.animus(version).exists():
        check_release(installation, version)
    return activate(installation, version)


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
    """Return to the previous release: check, stop, back up, record the start, revert the
    schema, switch, record the end, start.

    Everything that can refuse is checked before the services are stopped, so a refusal
    leaves the installation as it was. The backup (``PREFIX/backups/``) keeps what the
    reverted migrations drop; if it fails, the services are started again and nothing else
    happens. The schema is reverted by the running (newer) release, which knows how to undo
    its own migrations, down to the newest version the previous release knows. Data the
    older schema can hold stays; the audit chain is never reverted (migration 0001
    refuses). The chain says what happened even when a step fails: ``rollback_started``
    (naming the backup) comes before the schema changes, then ``rolled_back`` once the link
    is switched, or ``rollback_failed`` with the schema version and the release left
    current (a ``rollback_started`` alone: the rollback was cut off).
    """
    current, previous = installation.current, installation.previous
    if current is None:
        raise InstallError(f"nothing is installed under {installation.prefix}")
    if previous is None or previous == current:
        raise InstallError("there is no previous release to roll back to")
    target = schema_head(installation, previous)
    config = Config.from_env()
    schema_from = database_schema(config)
    if schema_from is None:
        raise InstallError(
            f"there is no database at {config.effective_database_url}; nothing was changed"
        )
    _require_revertible(schema_from, target, previous)
    plan = {"from": current, "to": previous, "schema_from": schema_from, "schema_to": target}
    context = _context("rollback")
    say(f"rollback {current} → {previous}: stopping the services")
    run_services(services, "stop")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    backup = installation.prefix / "backups" / f"{current}-before-rollback-to-{previous}-{stamp}"
    say(f"backing up to {backup}")
    try:
        # Blobs never change: hard links make the backup cheap where the store's filesystem
        # allows them.
        create_backup(config, backup, lambda line: say(f"    {line}"), hard_link=True, ctx=context)
    except (BackupError, OSError, sqlite3.Error, peewee.DatabaseError) as exc:
        db.database.close_all()
        _start_after_refusal(services, f"cannot back up before the rollback: {exc}", say)
    plan["backup"] = str(backup)
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
            f"{left['current']} is still current (services stopped; the backup from before "
            f"is {backup})"
        ) from None
    _record_release(context, Action.RELEASE_ROLLED_BACK, previous, plan)
    db.database.close_all()
    say(f"release {previous} is current; starting the services")
    run_services(services, "start")
    return plan


def _require_revertible(schema_from: int, target: int, previous: str) -> None:
    """Refuse a schema revert this release cannot do, before anything is stopped."""
    if schema_from < target:
        raise InstallError(
            f"the database is at schema {schema_from}, older than release {previous} needs "
            f"({target}); nothing was changed"
        )
    problem = db.downgrade_problem(schema_from, target)
    if problem:
        raise InstallError(f"{problem}; nothing was changed")


def _start_after_refusal(
    services: Path | None, reason: str, say: Callable[[str], None]
) -> NoReturn:
    say("starting the services again")
    try:
        run_services(services, "start")
    except InstallError as exc:
        raise InstallError(
            f"{reason}; nothing else was changed, but starting the services again failed: {exc}"
        ) from None
    raise InstallError(f"{reason}; nothing was changed and the services were started again")


def _record_release(context: Context, action: Action, version: str, payload: dict) -> None:
    with db.write_transaction():
        audit_log.record(context, action, object_type="release", object_id=version, payload=payload)
