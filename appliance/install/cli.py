"""``animus release …``, ``animus rollback`` and ``animus install record``: the commands the
installer and the Ansible roles call on an installed appliance (see docs/install.md).

Each prints one line for people, or with ``--json`` one JSON object with ``changed`` for
Ansible's ``changed_when``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from appliance.cli import reports_errors
from appliance.install import operations
from appliance.install.releases import Installation, read_verification


def default_prefix() -> Path | None:
    """ANIMUS_PREFIX, else the prefix this command runs from (PREFIX/releases/V/venv)."""
    if os.environ.get("ANIMUS_PREFIX"):
        return Path(os.environ["ANIMUS_PREFIX"])
    venv = Path(sys.prefix)
    if venv.name == "venv" and venv.parent.parent.name == "releases":
        return venv.parent.parent.parent
    return None


def _installation(prefix: Path | None) -> Installation:
    prefix = prefix or default_prefix()
    if prefix is None:
        raise click.UsageError("give --prefix (or ANIMUS_PREFIX): the installation directory")
    if not prefix.is_dir():
        raise click.ClickException(f"no installation at {prefix}")
    return Installation(prefix.absolute())


def load_settings(installation: Installation) -> None:
    """Read PREFIX/etc/animus.env (``ANIMUS_X=value`` lines); the environment wins."""
    path = installation.prefix / "etc" / "animus.env"
    if not path.is_file():
        return
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.startswith("ANIMUS_"):
            raise click.ClickException(f"{path}:{number}: expected ANIMUS_NAME=value")
        os.environ.setdefault(name.strip(), value.strip().strip('"'))


def _emit(result: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(result, sort_keys=True) if as_json else text)


_prefix_option = click.option(
    "--prefix",
    type=click.Path(file_okay=False, path_type=Path),
    help="The installation directory (default: ANIMUS_PREFIX, else the one this runs from).",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


@click.group("release")
def release_group() -> None:
    """Installed releases: status, check, activate, rollback."""


@release_group.command("status")
@_prefix_option
@_json_option
def status_command(prefix: Path | None, as_json: bool) -> None:
    """Show the current, the previous and every installed release."""
    state = _installation(prefix).status()
    _emit(
        state,
        as_json,
        f"current {state['current'] or '-'}, previous {state['previous'] or '-'}, "
        f"installed: {', '.join(state['installed']) or 'none'}",
    )


@release_group.command("activate")
@_prefix_option
@click.option("--version", "version", required=True, help="The release to make current.")
@_json_option
@reports_errors
def activate_command(prefix: Path | None, version: str, as_json: bool) -> None:
    """Make an installed release current, atomically; the old one becomes previous.

    Migrate the database with the new release first (`animus db upgrade`). Refuses, changing
    nothing, a release older than the database's schema (see `animus release check`).
    """
    installation = _installation(prefix)
    load_settings(installation)
    result = operations.activate_release(installation, version)
    _emit(
        result,
        as_json,
        f"release {version} is current" + ("" if result["changed"] else " (unchanged)"),
    )


@release_group.command("check")
@_prefix_option
@click.option("--version", "version", required=True, help="The release to check.")
@_json_option
@reports_errors
def check_command(prefix: Path | None, version: str, as_json: bool) -> None:
    """Check that an installed release can run on the database; changes nothing.

    Exits 1 if the database's schema is newer than the release knows: it could neither run
    on it nor revert it. The installer runs this before it stops anything.
    """
    installation = _installation(prefix)
    load_settings(installation)
    result = operations.check_release(installation, version)
    schema = "no database yet" if result["schema"] is None else f"schema {result['schema']}"
    _emit(
        result,
        as_json,
        f"release {version} knows schema versions up to {result['schema_newest']}; "
        f"the database: {schema}",
    )


@click.command("rollback")
@_prefix_option
@click.option(
    "--no-services", is_flag=True, help="Do not stop and start the services (PREFIX/bin/animusctl)."
)
@_json_option
@reports_errors
def rollback_command(prefix: Path | None, no_services: bool, as_json: bool) -> None:
    """Return to the previous release without losing data.

    Checks first that it can (a previous release, a schema it can revert) and changes
    nothing if not. Then stops the services, backs up into PREFIX/backups/ (refusing, with
    the services started again, if that fails), reverts the database schema to the one the
    previous release knows (data it can represent is kept; the backup keeps the rest),
    records the rollback in the audit chain, switches `current` back atomically and starts
    the services again.
    """
    installation = _installation(prefix)
    load_settings(installation)
    control = None if no_services else installation.prefix / "bin" / "animusctl"
    result = operations.rollback(
        installation, services=control, say=lambda line: click.echo(line, err=True)
    )
    _emit(
        result,
        as_json,
        f"rolled back from {result['from']} to {result['to']} (schema {result['schema_from']} "
        f"→ {result['schema_to']}); the backup from before is {result['backup']}",
    )


release_group.add_command(rollback_command)


@click.group("install")
def install_group() -> None:
    """Records of the installation itself."""


@install_group.command("record")
@_prefix_option
@click.option(
    "--verification",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The verifier's JSON result (`verify.py --json`).",
)
@_json_option
@reports_errors
def record_command(prefix: Path | None, verification: Path, as_json: bool) -> None:
    """Record a bundle's verification (version, manifest digest, signer) as an audit event.

    On a new installation it is the first event of the chain. Recording the same bundle
    again changes nothing.
    """
    installation = _installation(prefix)
    load_settings(installation)
    result = operations.record_verification(installation, read_verification(verification))
    _emit(
        result,
        as_json,
        f"bundle {result['version']} verification recorded as audit event {result['seq']}"
        + ("" if result["changed"] else " (already recorded)"),
    )
