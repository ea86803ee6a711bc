"""`animus backup` / `animus restore` on both database backends: what a backup holds, that a
restore verifies before it writes, refuses what it must, and leaves nothing half done."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from appliance import db
from appliance.audit import log as audit_log
from appliance.domain.records import AuditEvent, DatasetFile, DatasetVersion
from appliance.ops.backup import (
    BackupError,
    create_backup,
    pg_tool,
    restore_backup,
    verify_backup,
)
from tests.integration.ops.conftest import (
    Bound,
    animus,
    blob_files,
    table_count,
    upload_version,
)


def manifest_of(backup: Path) -> dict:
    return json.loads((backup / "MANIFEST.json").read_text())


def rewrite_manifest_entry(backup: Path, relative: str) -> None:
    """Make the manifest agree with the file as it now is (a careful forger)."""
    manifest = manifest_of(backup)
    data = (backup / relative).read_bytes()
    for entry in manifest["files"]:
        if entry["path"] == relative:
            entry["size"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (backup / "MANIFEST.json").write_text(json.dumps(manifest))


def test_backup_holds_a_consistent_snapshot_and_restores_into_an_empty_installation(
    config, filled, target_config, tmp_path, backend
):
    backup = tmp_path / "backup"
    lines: list[str] = []
    result = create_backup(config, backup, progress=lines.append)
    manifest = manifest_of(backup)
    assert manifest["backend"] == backend == result["backend"]
    listed = {e["path"]: e for e in manifest["files"]}
    database_file = "database/animus.db" if backend == "sqlite" else "database/animus.pgdump"
    assert database_file in listed and "config.json" in listed
    for digest, content in filled.items():
        entry = listed[f"blobs/sha256/{digest[:2]}/{digest}"]
        assert (entry["size"], entry["sha256"]) == (len(content), digest)
    for path, entry in listed.items():
        assert hashlib.sha256((backup / path).read_bytes()).hexdigest() == entry["sha256"], path
    settings = json.loads((backup / "config.json").read_text())
    assert settings["data_dir"] == str(config.data_dir)
    assert any("copying" in line for line in lines), lines
    # The backup itself is audited, after the snapshot: the source chain is one event longer.
    head = AuditEvent.select().order_by(AuditEvent.seq.desc()).first()
    assert (head.action, head.seq) == ("ops:backup:created", manifest["audit_head"]["seq"] + 1)
    assert head.payload["manifest_sha256"] == result["manifest_sha256"]
    assert (
        head.payload["manifest_sha256"]
        == hashlib.sha256((backup / "MANIFEST.json").read_bytes()).hexdigest()
    )

    restored = restore_backup(target_config, backup, progress=lines.append)

    assert restored["audit_verify"].startswith("OK ")
    with Bound(target_config):
        verdict = audit_log.verify()
        assert verdict.ok and verdict.count == manifest["audit_head"]["seq"] + 1
        last = AuditEvent.get_by_id(verdict.count)
        assert last.action == "ops:backup:restored"
        assert last.prev_hash == manifest["audit_head"]["hash"]
        assert DatasetVersion.select().count() == 2
        referenced = {f.sha256 for f in DatasetFile.select()}
    assert referenced == set(filled)
    assert blob_files(target_config) == {d: filled[d] for d in referenced}
    assert not list(target_config.data_dir.glob(".restore-*"))


def test_backup_while_writes_go_on_restores_a_verifiable_copy(
    config, alice, project, dataset, target_config, tmp_path
):
    for i in range(40):  # enough blobs that copying them overlaps the writer
        upload_version(alice, project, dataset["id"], {f"f{i}.bin": os.urandom(100_000)})
    stop = threading.Event()
    written: list[str] = []
    failures: list[str] = []

    def writer():
        while not stop.is_set():
            try:
                body = os.urandom(50_000)
                upload_version(alice, project, dataset["id"], {"during.bin": body})
                written.append(hashlib.sha256(body).hexdigest())
            except AssertionError as exc:
                failures.append(str(exc))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(written) < 2:
            threading.Event().wait(0.05)
        create_backup(config, tmp_path / "backup")
        during = len(written)
    finally:
        stop.set()
        thread.join(30)
    assert not failures, failures
    assert during >= 2

    restore_backup(target_config, tmp_path / "backup")

    with Bound(target_config):
        assert audit_log.verify().ok
        referenced = {f.sha256 for f in DatasetFile.select()}
        versions = DatasetVersion.select().count()
    assert 40 + 2 <= versions <= 40 + len(written)
    assert referenced <= set(blob_files(target_config)), "a referenced blob is missing"


TAMPERINGS = {
    "blob-altered": ("backup_file_mismatch", 3),
    "blob-truncated": ("backup_file_mismatch", 3),
    "database-missing": ("backup_file_missing", 3),
    "extra-file": ("backup_file_extra", 3),
    "link-planted": ("backup_unsafe_entry", 3),
    "manifest-missing": ("backup_manifest_missing", 3),
    "manifest-not-json": ("backup_manifest_invalid", 3),
    "manifest-path-escapes": ("backup_manifest_invalid", 3),
    "manifest-without-created-at": ("backup_manifest_invalid", 3),
    "manifest-without-blobs": ("backup_manifest_invalid", 3),
    "head-rewritten-in-the-manifest": ("restore_head_mismatch", 4),
    "schema-from-a-newer-release": ("restore_schema_newer", 2),
}


def tamper(backup: Path, how: str) -> str:
    """Damage the backup as ``how`` says; returns the path the error must name, if any."""
    manifest = manifest_of(backup)
    blob = next(e["path"] for e in manifest["files"] if e["path"].startswith("blobs/"))
    database = manifest["database"]["file"]
    target = backup / blob
    if how in ("blob-altered", "blob-truncated"):
        data = bytearray(target.read_bytes())
        os.chmod(target, 0o644)
        if how == "blob-altered":
            data[len(data) // 2] ^= 1
        else:
            data = data[:-1]
        target.write_bytes(bytes(data))
        return blob
    if how == "database-missing":
        (backup / database).unlink()
        return database
    if how == "extra-file":
        (backup / "blobs" / "notes.txt").write_text("hello")
        return "blobs/notes.txt"
    if how == "link-planted":
        (backup / "keys-link").symlink_to("/etc")
        return "keys-link"
    if how == "manifest-missing":
        (backup / "MANIFEST.json").unlink()
        return "MANIFEST.json"
    if how == "manifest-not-json":
        (backup / "MANIFEST.json").write_text("{not json")
        return "MANIFEST.json"
    if how == "manifest-path-escapes":
        manifest["files"][0]["path"] = "../outside"
        (backup / "MANIFEST.json").write_text(json.dumps(manifest))
        return "../outside"
    if how in ("manifest-without-created-at", "manifest-without-blobs"):
        # Fields a restore reads after it swapped the data in: missing, it must not start.
        field = {"manifest-without-created-at": "created_at", "manifest-without-blobs": "blobs"}
        del manifest[field[how]]
        (backup / "MANIFEST.json").write_text(json.dumps(manifest))
        return f"MANIFEST.json: {field[how]} missing"
    if how == "schema-from-a-newer-release":
        manifest["database"]["schema_version"] = 999
        (backup / "MANIFEST.json").write_text(json.dumps(manifest))
        return "999"
    if how == "head-rewritten-in-the-manifest":
        manifest["audit_head"]["hash"] = "0" * 64
        (backup / "MANIFEST.json").write_text(json.dumps(manifest))
        return "0" * 64
    raise AssertionError(how)


@pytest.mark.parametrize("how", sorted(TAMPERINGS))
def test_a_tampered_backup_is_refused_with_its_own_error_and_nothing_is_written(
    config, filled, target_config, tmp_path, how, request
):
    backup = tmp_path / "backup"
    create_backup(config, backup)
    named = tamper(backup, how)
    code, exit_code = TAMPERINGS[how]

    done = animus(target_config, "restore", str(backup))

    assert done.returncode == exit_code, done.stderr
    assert f"error: {code}: " in done.stderr and named in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not target_config.data_dir.exists(), list(target_config.data_dir.rglob("*"))
    assert table_count(target_config, request) == 0


def test_verify_only_refuses_a_manifest_without_created_at(config, filled, tmp_path):
    backup = tmp_path / "backup"
    create_backup(config, backup)
    tamper(backup, "manifest-without-created-at")

    done = animus(config, "restore", str(backup), "--verify-only")

    assert done.returncode == 3, done.stderr
    assert (
        "error: backup_manifest_invalid: MANIFEST.json: created_at missing or not a timestamp"
        in done.stderr
    ), done.stderr
    assert "Traceback" not in done.stderr


def forge_history(backup: Path, backend: str, request) -> None:
    """Change the actor of event 2 in the backup's database copy, as a forger would."""
    if backend == "sqlite":
        copy = backup / "database" / "animus.db"
        connection = sqlite3.connect(copy)
        with connection:
            connection.execute("DROP TRIGGER audit_events_no_update")
            connection.execute("UPDATE audit_events SET actor = 'user:nobody' WHERE seq = 2")
        connection.close()
        rewrite_manifest_entry(backup, "database/animus.db")
        return
    server = request.getfixturevalue("postgres_server")
    scratch = "forge_" + uuid.uuid4().hex[:8]
    dump = backup / "database" / "animus.pgdump"
    server.psql(f"CREATE DATABASE {scratch}")
    where = ["-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres"]
    subprocess.run(
        [pg_tool("pg_restore"), *where, "--no-owner", "-d", scratch, str(dump)], check=True
    )
    server.psql(
        "DROP TRIGGER audit_events_immutable ON audit_events;"
        " UPDATE audit_events SET actor = 'user:nobody' WHERE seq = 2",
        scratch,
    )
    subprocess.run(
        [pg_tool("pg_dump"), *where, "--format=custom", f"--file={dump}", scratch], check=True
    )
    rewrite_manifest_entry(backup, "database/animus.pgdump")


def test_history_rewritten_with_a_matching_manifest_is_refused_by_the_chain(
    config, filled, target_config, tmp_path, backend, request
):
    """A forger who edits an audit event in the copy and fixes the manifest's hashes still
    fails: the staged chain does not verify, and nothing is swapped in."""
    backup = tmp_path / "backup"
    create_backup(config, backup)
    forge_history(backup, backend, request)

    with pytest.raises(BackupError) as refused:
        restore_backup(target_config, backup)

    assert (refused.value.code, refused.value.exit_code) == ("restore_chain_broken", 4)
    assert "seq 2" in refused.value.message
    assert not target_config.data_dir.exists()
    assert table_count(target_config, request) == 0


def test_restore_refuses_an_installation_holding_data_unless_forced(
    config, alice, project, dataset, filled, tmp_path
):
    backup = tmp_path / "backup"
    create_backup(config, backup)
    later = upload_version(alice, project, dataset["id"], {"later.csv": b"after the backup\n"})
    head_before = audit_log.verify()

    refused = animus(config, "restore", str(backup))

    assert refused.returncode == 2, refused.stderr
    assert "error: restore_target_not_empty: " in refused.stderr
    assert audit_log.verify() == head_before
    assert DatasetVersion.get_or_none(DatasetVersion.id == later["id"]) is not None

    forced = animus(config, "restore", str(backup), "--force", "--json")

    assert forced.returncode == 0, forced.stderr
    # This process's pooled connections still see the replaced SQLite file.
    db.database.close()
    db.database.obj.close_all()
    result = json.loads(forced.stdout)
    manifest = manifest_of(backup)
    assert result["audit_head"] == manifest["audit_head"]
    verdict = audit_log.verify()
    assert verdict.ok and verdict.count == manifest["audit_head"]["seq"] + 1
    assert DatasetVersion.get_or_none(DatasetVersion.id == later["id"]) is None
    assert hashlib.sha256(b"after the backup\n").hexdigest() not in blob_files(config)
    assert AuditEvent.get_by_id(verdict.count).payload["forced"] is True


def test_backup_into_a_non_empty_directory_exits_2_and_touches_nothing(config, filled, tmp_path):
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "keep.txt").write_text("mine")

    done = animus(config, "backup", str(target))

    assert done.returncode == 2
    assert "error: backup_target_not_empty: " in done.stderr and "Traceback" not in done.stderr
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_backup_cli_prints_progress_on_stderr_and_json_on_stdout(config, filled, tmp_path):
    done = animus(config, "backup", str(tmp_path / "b"), "--json")

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["audit_head"] == manifest_of(tmp_path / "b")["audit_head"]
    assert result["blobs"]["referenced"] == len(filled)
    assert "snapshot of the" in done.stderr and "backup complete" in done.stderr
    verified = animus(config, "restore", str(tmp_path / "b"), "--verify-only")
    assert verified.returncode == 0, verified.stderr


def test_a_damaged_blob_store_fails_the_backup_and_leaves_nothing(config, filled, tmp_path):
    digest = next(iter(filled))
    stored = config.blob_dir / "sha256" / digest[:2] / digest
    os.chmod(stored, 0o644)
    stored.write_bytes(b"bit rot")
    target = tmp_path / "backup"

    with pytest.raises(BackupError) as failed:
        create_backup(config, target)

    assert failed.value.code == "blob_corrupt" and digest in failed.value.message
    assert not target.exists()


def test_a_backup_verifies_after_being_copied_elsewhere(config, filled, tmp_path):
    """The manifest travels with the files: a copy (e.g. to removable media) verifies."""
    create_backup(config, tmp_path / "backup")
    shutil.copytree(tmp_path / "backup", tmp_path / "media" / "backup")
    manifest = verify_backup(tmp_path / "media" / "backup")
    assert manifest["audit_head"] == manifest_of(tmp_path / "backup")["audit_head"]


def test_a_backup_restores_only_into_its_own_backend(config, filled, tmp_path, backend, request):
    backup = tmp_path / "backup"
    create_backup(config, backup)
    if backend == "sqlite":
        server = request.getfixturevalue("postgres_server")
        name = "other_" + uuid.uuid4().hex[:8]
        server.psql(f"CREATE DATABASE {name}")
        url = server.url(name)
    else:
        url = ""
    other = config.__class__.from_env(
        {}, data_dir=str(tmp_path / "other"), database_url=url, blob_fsync="0"
    )

    with pytest.raises(BackupError) as refused:
        restore_backup(other, backup)

    assert (refused.value.code, refused.value.exit_code) == ("restore_backend_mismatch", 2)
    assert not other.data_dir.exists() and table_count(other, request) == 0


def test_hard_linked_blobs_share_the_store_s_files_and_restore_alike(
    config, filled, target_config, tmp_path
):
    backup = tmp_path / "backup"
    create_backup(config, backup, hard_link=True)
    for digest in filled:
        stored = config.blob_dir / "sha256" / digest[:2] / digest
        assert (backup / "blobs" / "sha256" / digest[:2] / digest).stat().st_ino == (
            stored.stat().st_ino
        )
    restore_backup(target_config, backup)
    assert set(filled) <= set(blob_files(target_config))
    restored = target_config.blob_dir / "sha256" / digest[:2] / digest
    assert restored.stat().st_ino != stored.stat().st_ino  # a restore copies


def test_a_restore_failing_after_staging_leaves_the_installation_as_it_was(
    config, alice, project, dataset, filled, tmp_path, backend
):
    """A backup whose database cannot be restored (its manifest agrees, so verification
    passes) fails while staging; the installation it was forced onto is untouched."""
    backup = tmp_path / "backup"
    create_backup(config, backup)
    upload_version(alice, project, dataset["id"], {"later.csv": b"kept\n"})
    database_file = manifest_of(backup)["database"]["file"]
    (backup / database_file).write_bytes(b"not a database " * 1000)
    rewrite_manifest_entry(backup, database_file)
    before_chain = audit_log.verify()
    before_blobs = blob_files(config)

    with pytest.raises(BackupError) as failed:
        restore_backup(config, backup, force=True)

    expected = "restore_database_unreadable" if backend == "sqlite" else "database_restore_failed"
    assert failed.value.code == expected, failed.value
    db.database.close()
    db.database.obj.close_all()
    assert audit_log.verify() == before_chain
    assert blob_files(config) == before_blobs
    leftovers = [p.name for p in config.data_dir.iterdir() if ".restore-" in p.name]
    assert leftovers == []


def test_every_column_naming_a_blob_is_known_to_the_backup():
    """A new table holding blob digests must be added to BLOB_REFERENCES, or a backup would
    not check that its blobs are present."""
    from appliance.domain.records import Record
    from appliance.ops.backup import BLOB_REFERENCES

    columns = {
        (model._meta.table_name, name)
        for model in Record.__subclasses__()
        for name in model._meta.fields
        if name == "sha256" or name.endswith("_sha256")
    }
    not_blobs = {("model_exports", "manifest_sha256")}  # the digest of a file inside a blob
    assert columns - not_blobs == set(BLOB_REFERENCES)


def test_a_broken_audit_chain_fails_the_backup_and_leaves_nothing(
    config, filled, tmp_path, backend, request
):
    """A backup must restore, and a restore needs an intact chain: the backup says so first."""
    if backend == "sqlite":
        connection = sqlite3.connect(config.data_dir / "animus.db")
        with connection:
            connection.execute("DROP TRIGGER audit_events_no_update")
            connection.execute("UPDATE audit_events SET actor = 'user:nobody' WHERE seq = 2")
        connection.close()
    else:
        server = request.getfixturevalue("postgres_server")
        server.psql(
            "DROP TRIGGER audit_events_immutable ON audit_events;"
            " UPDATE audit_events SET actor = 'user:nobody' WHERE seq = 2",
            config.database_url.rsplit("/", 1)[1],
        )
    target = tmp_path / "backup"

    done = animus(config, "backup", str(target))

    assert done.returncode == 1, done.stderr
    assert "error: audit_chain_broken: " in done.stderr and "seq 2" in done.stderr
    assert not target.exists()


def test_the_signing_public_key_is_in_the_backup_and_the_secret_key_is_not(
    config, app, filled, tmp_path
):
    from appliance.audit import signing

    key = signing.signing_key(config.gnupg_home, "", audit_log.installation_id())
    backup = tmp_path / "backup"

    create_backup(config, backup)

    manifest = manifest_of(backup)
    assert manifest["signing_public_keys"] == [key.fingerprint]
    armored = (backup / "keys" / "signing-public.asc").read_text()
    assert armored.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    everything = b"".join(p.read_bytes() for p in backup.rglob("*") if p.is_file())
    assert b"PRIVATE KEY" not in everything
    assert not any("gnupg" in str(p.relative_to(backup)) for p in backup.rglob("*"))


def test_restore_names_the_pinned_images_the_registry_no_longer_holds(
    config, filled, target_config, tmp_path, registry, pushed_runner
):
    """Images are not in a backup: the restore says which pinned digests must be pushed again."""
    backup = tmp_path / "backup"
    create_backup(config, backup)
    manifest = manifest_of(backup)
    present, absent = pushed_runner.split("@")[1], "sha256:" + "e" * 64
    manifest["environment_images"] = [present, absent]
    (backup / "MANIFEST.json").write_text(json.dumps(manifest))
    target = dataclasses.replace(
        target_config,
        registry_url=f"http://{registry.address}",
        environment_repository="animus/runner",
    )
    lines: list[str] = []

    result = restore_backup(target, backup, progress=lines.append)

    assert result["environment_images_missing"] == [absent]
    assert any(absent in line and "push it again" in line for line in lines)
    assert result["environment_images_unchecked"] == []


def test_a_registry_that_does_not_answer_leaves_the_images_unchecked_not_missing(
    config, filled, target_config, tmp_path
):
    """The registry is often stopped with the other processes during a restore: its images
    are then named as not checked, not as missing."""
    backup = tmp_path / "backup"
    create_backup(config, backup)
    manifest = manifest_of(backup)
    pinned = ["sha256:" + "d" * 64]
    manifest["environment_images"] = pinned
    (backup / "MANIFEST.json").write_text(json.dumps(manifest))
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
    target = dataclasses.replace(
        target_config, registry_url=f"http://{address}", environment_repository="animus/runner"
    )
    lines: list[str] = []

    result = restore_backup(target, backup, progress=lines.append)

    assert result["environment_images_missing"] == []
    assert result["environment_images_unchecked"] == pinned
    assert any(f"registry {address} is unreachable" in line and "not checked" in line
               for line in lines)  # fmt: skip
