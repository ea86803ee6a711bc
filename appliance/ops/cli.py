"""``animus backup DIR`` and ``animus restore DIR``.

The top-level ``animus`` group loads these commands when one of them runs. Progress goes
to stderr, the result to stdout (``--json`` for machines). Failures print one line
``error: CODE: message`` and exit with the code documented on ``BackupError``.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import psycopg2

from appliance.config import Config, ConfigError
from appliance.ops.backup import BackupError, create_backup, restore_backup, verify_backup


def _progress(message: str) -> None:
    click.echo(message, err=True)


def _run(as_json: bool, action: Callable[[Config], dict[str, Any]]) -> dict[str, Any]:
    try:
        config = Config.from_env()
    except ConfigError as exc:
        _fail(as_json, "invalid_settings", str(exc), 2)
    try:
        return action(config)
    except BackupError as exc:
        _fail(as_json, exc.code, exc.message, exc.exit_code)
    except OSError as exc:
        _fail(as_json, "io_error", f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), 1)
    except (sqlite3.Error, psycopg2.Error) as exc:
        _fail(as_json, "database_error", str(exc).strip(), 1)
    raise AssertionError("unreachable")


def _fail(as_json: bool, code: str, message: str, exit_code: int) -> None:
    click.echo(f"error: {code}: {message}", err=True)
    if as_json:
        click.echo(json.dumps({"error": code, "message": message}))
    sys.exit(exit_code)


@click.command("backup")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--hard-link",
    is_flag=True,
    help="Hard-link blobs instead of copying them when DIR is on the blob store's filesystem.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def backup_command(directory: Path, hard_link: bool, as_json: bool) -> None:
    """Back up the running installation into DIR (new or empty).

    A consistent database snapshot (SQLite online backup or pg_dump), the blob store, the
    signing public keys, the settings without secrets, and MANIFEST.json with every file's
    size and sha256 and the audit chain head. Exit 2 if DIR is not empty.
    """
    result = _run(
        as_json, lambda config: create_backup(config, directory, _progress, hard_link=hard_link)
    )
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        head = result["audit_head"]
        click.echo(
            f"backup {result['path']}: {result['files']} files, {result['bytes']} bytes, "
            f"schema {result['schema_version']}, audit head seq {head['seq']} {head['hash']}"
        )


@click.command("restore")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace a database and blob store that hold data.")
@click.option(
    "--verify-only", is_flag=True, help="Verify the backup against its manifest and stop."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def restore_command(directory: Path, force: bool, verify_only: bool, as_json: bool) -> None:
    """Restore the backup in DIR into the configured data dir and database.

    Verifies every file against MANIFEST.json first and writes nothing if one is missing,
    extra or altered (exit 3). Refuses a target holding data unless --force (exit 2). Stop
    the appliance's processes first. After the restore the audit chain is verified and must
    end at the head the manifest recorded (exit 4 otherwise).
    """
    if verify_only:
        manifest = _run(as_json, lambda _config: verify_backup(directory, _progress))
        summary = {
            "verified": True,
            "backend": manifest["backend"],
            "created_at": manifest["created_at"],
            "schema_version": manifest["database"]["schema_version"],
            "audit_head": manifest["audit_head"],
            "files": len(manifest["files"]),
        }
        click.echo(json.dumps(summary, indent=2) if as_json else f"backup {directory} verifies")
        return
    result = _run(
        as_json, lambda config: restore_backup(config, directory, force=force, progress=_progress)
    )
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"restored {result['source']}: audit chain {result['audit_verify']}")
        if result["schema_upgrade_needed"]:
            click.echo("the schema is older than this release: run `animus db upgrade`")
