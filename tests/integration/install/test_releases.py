"""Releases under a prefix: atomic activation, the verification record, rollback.

The releases here are directories with a MANIFEST.json and a ``venv/bin/animus`` script that
answers ``db newest`` the way the real command does (the full path through `install.sh`,
Ansible and real bundles is in test_offline_install.py). The database, migrations and audit
chain are real, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from appliance import db
from appliance.audit import log as audit_log
from appliance.cli import main
from appliance.domain.records import AuditEvent
from appliance.install import operations
from appliance.install.releases import Installation, InstallError, activate
from appliance.ops.backup import BackupError, verify_backup

VERIFICATION = {
    "status": "ok",
    "version": "1.0.0",
    "manifest_sha256": "ab" * 32,
    "signer_fingerprint": "8840FC9FF6276B5055DC37EFD5DBB918763A5F93",
    "files": 83,
    "bytes": 48203951,
}


def add_release(prefix, version: str, schema_head: int | None = None):
    release = prefix / "releases" / version
    (release / "venv" / "bin").mkdir(parents=True)
    (release / "MANIFEST.json").write_text(json.dumps({"version": version}))
    script = release / "venv" / "bin" / "animus"
    newest = schema_head if schema_head is not None else len(db.available_migrations())
    script.write_text(f'#!/bin/sh\n[ "$1 $2" = "db newest" ] && echo {newest}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return release


@pytest.fixture
def prefix(tmp_path, config, monkeypatch):
    monkeypatch.setenv("ANIMUS_DATABASE_URL", config.effective_database_url)
    monkeypatch.setenv("ANIMUS_DATA_DIR", str(config.data_dir))
    monkeypatch.setenv("ANIMUS_PREFIX", str(tmp_path / "opt"))
    (tmp_path / "opt").mkdir()
    yield tmp_path / "opt"
    if db.database.obj is not None:
        db.database.close_all()


def animus(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_activation_switches_links_atomically_and_keeps_the_previous(prefix):
    add_release(prefix, "1.0.0")
    add_release(prefix, "2.0.0")
    installation = Installation(prefix)
    assert activate(installation, "1.0.0") == {
        "changed": True,
        "current": "1.0.0",
        "previous": None,
    }
    assert activate(installation, "1.0.0")["changed"] is False
    assert activate(installation, "2.0.0") == {
        "changed": True,
        "current": "2.0.0",
        "previous": "1.0.0",
    }
    # Relative links: the prefix can be moved or mounted elsewhere.
    assert os.readlink(prefix / "current") == "releases/2.0.0"
    assert os.readlink(prefix / "previous") == "releases/1.0.0"
    assert (prefix / "VERSION").read_text() == "2.0.0\n"
    assert not list(prefix.glob(".*.new")), "a temporary link was left behind"
    code, output = animus("release", "status", "--json")
    assert code == 0 and json.loads(output)["installed"] == ["1.0.0", "2.0.0"]


def test_activation_refuses_what_is_not_installed(prefix):
    with pytest.raises(InstallError, match="not installed"):
        activate(Installation(prefix), "9.9.9")
    (prefix / "releases" / "3.0.0").mkdir(parents=True)
    (prefix / "releases" / "3.0.0" / "MANIFEST.json").write_text("{}")
    with pytest.raises(InstallError, match="no virtualenv"):
        activate(Installation(prefix), "3.0.0")
    code, output = animus("release", "activate", "--version", "../../etc")
    assert code == 1 and "not a release version" in output
    assert not (prefix / "current").exists()


def test_the_verification_is_recorded_once_as_an_audit_event(prefix, tmp_path):
    record = tmp_path / "verification.json"
    record.write_text(json.dumps(VERIFICATION))
    code, output = animus("install", "record", "--verification", str(record), "--json")
    assert code == 0, output
    first = json.loads(output)
    assert first["changed"] is True
    code, output = animus("install", "record", "--verification", str(record), "--json")
    assert json.loads(output) == {**first, "changed": False}
    event = AuditEvent.get_by_id(first["seq"])
    assert event.action == "install:bundle:verified" and event.object_id == "ab" * 32
    assert event.payload["signer_fingerprint"] == VERIFICATION["signer_fingerprint"]
    assert audit_log.verify().ok


def test_a_refused_or_malformed_verification_is_not_recorded(prefix, tmp_path):
    record = tmp_path / "verification.json"
    for content, message in (
        ("{not json", "cannot read the verification record"),
        (json.dumps({**VERIFICATION, "signer_fingerprint": ""}), "is not a verification record"),
        (json.dumps({**VERIFICATION, "status": "refused"}), "records a refused bundle"),
    ):
        record.write_text(content)
        code, output = animus("install", "record", "--verification", str(record))
        assert code == 1 and message in output
    db.bind(db.open_database(os.environ["ANIMUS_DATABASE_URL"]))
    assert AuditEvent.select().where(AuditEvent.action == "install:bundle:verified").count() == 0


def test_rollback_reverts_the_newer_schema_and_keeps_the_chain(prefix):
    newest = _two_releases(prefix)
    code, output = animus("rollback", "--no-services", "--json")
    assert code == 0, output
    result = json.loads(output.strip().splitlines()[-1])
    backup = result.pop("backup")
    assert result == {
        "from": "2.0.0",
        "to": "1.0.0",
        "schema_from": newest,
        "schema_to": newest - 1,
    }
    result["backup"] = backup
    assert os.readlink(prefix / "current") == "releases/1.0.0"
    assert os.readlink(prefix / "previous") == "releases/2.0.0"
    db.bind(db.open_database(os.environ["ANIMUS_DATABASE_URL"]))
    assert db.current_version() == newest - 1
    assert audit_log.verify().ok
    started, finished = AuditEvent.select().order_by(AuditEvent.seq.desc()).limit(2)[::-1]
    assert started.action == "install:release:rollback_started"
    assert finished.action == "install:release:rolled_back"
    assert started.payload == finished.payload == result
    assert finished.seq == started.seq + 1


def _two_releases(prefix) -> int:
    newest = len(db.available_migrations())
    add_release(prefix, "1.0.0", schema_head=newest - 1)
    add_release(prefix, "2.0.0")
    activate(Installation(prefix), "1.0.0")
    activate(Installation(prefix), "2.0.0")
    return newest


def _events(action_prefix: str = "install:release:") -> list[AuditEvent]:
    db.bind(db.open_database(os.environ["ANIMUS_DATABASE_URL"]))
    return list(
        AuditEvent.select()
        .where(AuditEvent.action.startswith(action_prefix))
        .order_by(AuditEvent.seq)
    )


def test_a_switch_that_fails_after_the_schema_was_reverted_is_in_the_chain(prefix, monkeypatch):
    newest = _two_releases(prefix)

    def broken_switch(installation, version):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(operations, "activate", broken_switch)
    code, output = animus("rollback", "--no-services")
    assert code == 1
    assert "No space left on device" in output and "2.0.0 is still current" in output
    assert os.readlink(prefix / "current") == "releases/2.0.0"
    started, failed = _events()
    assert started.action == "install:release:rollback_started"
    assert failed.action == "install:release:rollback_failed"
    assert failed.payload["schema_from"] == newest
    assert failed.payload["schema_now"] == newest - 1  # reverted before the switch failed
    assert failed.payload["current"] == "2.0.0"
    assert "No space left on device" in failed.payload["error"]
    assert audit_log.verify().ok


def test_a_schema_revert_that_fails_is_in_the_chain_and_nothing_is_switched(prefix, monkeypatch):
    newest = _two_releases(prefix)

    def refused(target, log=None):
        raise db.MigrationError(f"migration {newest} cannot be reverted: data would be lost")

    monkeypatch.setattr(db, "downgrade", refused)
    code, output = animus("rollback", "--no-services")
    assert code == 1 and "cannot be reverted" in output
    assert os.readlink(prefix / "current") == "releases/2.0.0"
    started, failed = _events()
    assert (started.action, failed.action) == (
        "install:release:rollback_started",
        "install:release:rollback_failed",
    )
    assert failed.payload["schema_now"] == newest and db.current_version() == newest
    assert audit_log.verify().ok


def test_rollback_without_a_previous_release_changes_nothing(prefix):
    add_release(prefix, "1.0.0")
    activate(Installation(prefix), "1.0.0")
    code, output = animus("rollback", "--no-services")
    assert code == 1 and "no previous release" in output
    assert os.readlink(prefix / "current") == "releases/1.0.0"


def test_rollback_refuses_a_previous_release_newer_than_the_database(prefix):
    newest = len(db.available_migrations())
    add_release(prefix, "1.0.0", schema_head=newest + 1)
    add_release(prefix, "2.0.0")
    activate(Installation(prefix), "1.0.0")
    activate(Installation(prefix), "2.0.0")
    code, output = animus("rollback", "--no-services")
    assert code == 1 and "nothing was changed" in output
    assert os.readlink(prefix / "current") == "releases/2.0.0"


def fake_services(prefix) -> Path:
    """PREFIX/bin/animusctl as a stand-in that logs each call; returns the log."""
    log = prefix / "animusctl.log"
    control = prefix / "bin" / "animusctl"
    control.parent.mkdir(exist_ok=True)
    control.write_text(f'#!/bin/sh\necho "$1" >> {log}\necho "animus: $1"\n')
    control.chmod(control.stat().st_mode | stat.S_IXUSR)
    return log


def service_calls(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_rollback_backs_up_first_and_names_the_backup(prefix):
    newest = _two_releases(prefix)
    services = fake_services(prefix)
    code, output = animus("rollback", "--json")
    assert code == 0, output
    result = json.loads(output.strip().splitlines()[-1])
    backup = Path(result["backup"])
    assert backup.parent == prefix / "backups"
    assert backup.name.startswith("2.0.0-before-rollback-to-1.0.0-")
    manifest = verify_backup(backup)
    # The backup holds the schema before the revert: what the newer release's tables held.
    assert manifest["database"]["schema_version"] == newest
    code, output = animus("restore", "--verify-only", str(backup))
    assert code == 0 and "verifies" in output
    assert service_calls(services) == ["stop", "start"]
    started, finished = _events()
    assert started.payload["backup"] == finished.payload["backup"] == str(backup)
    backed_up = _events("ops:backup:created")[-1]
    assert backed_up.payload["destination"] == str(backup)
    assert backed_up.seq < started.seq and backed_up.request_id == started.request_id


def test_a_rollback_whose_backup_fails_starts_the_services_again(prefix, monkeypatch):
    newest = _two_releases(prefix)
    services = fake_services(prefix)

    def full_disk(config, dest, progress=None, **options):
        raise BackupError("io_error", "No space left on device")

    monkeypatch.setattr(operations, "create_backup", full_disk)
    code, output = animus("rollback")
    assert code == 1
    assert "cannot back up before the rollback" in output and "No space left" in output
    assert "services were started again" in output
    assert service_calls(services) == ["stop", "start"]
    assert os.readlink(prefix / "current") == "releases/2.0.0"
    assert _events() == []
    assert db.current_version() == newest


def _irreversible_newest_migration(monkeypatch) -> None:
    module = db.available_migrations()[-1].module
    monkeypatch.delattr(module, "downgrade")
    monkeypatch.setattr(module, "IRREVERSIBLE_BECAUSE", "it merges two tables", raising=False)


@pytest.mark.parametrize(
    ("situation", "message"),
    [
        ("no previous release", "no previous release"),
        ("previous needs a newer schema", "older than release 1.0.0 needs"),
        ("irreversible migration", "it merges two tables"),
    ],
)
def test_a_refused_rollback_leaves_the_services_alone(prefix, monkeypatch, situation, message):
    newest = len(db.available_migrations())
    add_release(prefix, "1.0.0", schema_head=newest + 1 if "newer" in situation else newest - 1)
    add_release(prefix, "2.0.0")
    activate(Installation(prefix), "1.0.0" if situation != "no previous release" else "2.0.0")
    activate(Installation(prefix), "2.0.0")
    if situation == "irreversible migration":
        _irreversible_newest_migration(monkeypatch)
    services = fake_services(prefix)
    code, output = animus("rollback")
    assert code == 1 and message in output, output
    assert service_calls(services) == []
    assert os.readlink(prefix / "current") == "releases/2.0.0"
    assert not (prefix / "backups").exists()
    assert _events() == []


def test_rollback_without_a_database_refuses_and_creates_none(tmp_path, monkeypatch):
    prefix = tmp_path / "opt"
    data = tmp_path / "data"
    monkeypatch.setenv("ANIMUS_PREFIX", str(prefix))
    monkeypatch.setenv("ANIMUS_DATA_DIR", str(data))
    monkeypatch.setenv("ANIMUS_DATABASE_URL", f"sqlite:///{data / 'animus.db'}")
    newest = len(db.available_migrations())
    add_release(prefix, "1.0.0", schema_head=newest - 1)
    add_release(prefix, "2.0.0")
    activate(Installation(prefix), "1.0.0")
    activate(Installation(prefix), "2.0.0")
    services = fake_services(prefix)
    try:
        code, output = animus("rollback")
        assert code == 1 and "there is no database" in output
        assert service_calls(services) == []
        assert not data.exists(), "checking created the database"
        # No database yet (a new installation) fits any release, and checking creates none.
        code, output = animus("release", "check", "--version", "1.0.0", "--json")
        assert code == 0, output
        assert json.loads(output)["schema"] is None
        assert not data.exists()
    finally:
        if db.database.obj is not None:
            db.database.close_all()


def test_activation_refuses_a_release_older_than_the_database(prefix):
    newest = _two_releases(prefix)  # 1.0.0 knows one schema version less; 2.0.0 is current
    add_release(prefix, "0.9.0", schema_head=newest - 1)
    for version, way_back in (
        ("1.0.0", "`animus rollback` returns to 1.0.0"),
        ("0.9.0", "restore a backup taken with it"),
    ):
        code, output = animus("release", "activate", "--version", version)
        assert code == 1, output
        assert f"knows the database schema up to version {newest - 1}" in output
        assert f"the database is at {newest}" in output
        assert way_back in output and "nothing was changed" in output
        assert os.readlink(prefix / "current") == "releases/2.0.0"
        assert os.readlink(prefix / "previous") == "releases/1.0.0"
        assert (prefix / "VERSION").read_text() == "2.0.0\n"
    # A release that knows the schema is activated as before.
    add_release(prefix, "2.0.1")
    code, output = animus("release", "activate", "--version", "2.0.1", "--json")
    assert code == 0, output
    assert json.loads(output) == {"changed": True, "current": "2.0.1", "previous": "2.0.0"}


def test_release_check_says_whether_a_release_can_run_on_the_database(prefix):
    newest = _two_releases(prefix)
    code, output = animus("release", "check", "--version", "2.0.0", "--json")
    assert code == 0, output
    assert json.loads(output) == {
        "changed": False,
        "version": "2.0.0",
        "schema_newest": newest,
        "schema": newest,
    }
    code, output = animus("release", "check", "--version", "1.0.0")
    assert code == 1 and "`animus rollback` returns to 1.0.0" in output
    assert os.readlink(prefix / "current") == "releases/2.0.0"


def test_the_database_role_checks_the_release_before_it_stops_anything():
    tasks = Path(__file__).parents[3] / "ansible" / "roles" / "database" / "tasks"
    routed = [
        task["ansible.builtin.include_tasks"]
        for task in yaml.safe_load((tasks / "main.yml").read_text())
    ]
    assert routed.index("check_release.yml") < routed.index("backup.yml")
    (check,) = yaml.safe_load((tasks / "check_release.yml").read_text())
    argv = check["ansible.builtin.command"]["argv"]
    assert argv[1:3] == ["release", "check"] and "{{ animus_version }}" in argv
