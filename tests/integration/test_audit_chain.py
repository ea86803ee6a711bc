"""The audit chain against real databases: concurrency, triggers, tampering, access."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import peewee
import pytest

from appliance import db
from appliance.audit import chain
from appliance.audit import log as audit_log
from appliance.domain.records import AuditEvent


def verify_cli(config) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "ANIMUS_DATA_DIR": str(config.data_dir),
        "ANIMUS_DATABASE_URL": config.database_url,
    }
    return subprocess.run(
        [sys.executable, "-m", "appliance", "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_parallel_mutations_form_one_gapless_chain(server, alice, project, config, bound_db):
    threads, per_thread = 8, 200
    errors: list[str] = []
    pid = project["id"]

    def work(worker: int) -> None:
        client = server.client(alice.token)
        for i in range(per_thread):
            response = client.post(
                f"/api/v1/projects/{pid}/code-refs",
                json={"repo_url": f"https://git.example/w{worker}.git", "ref": f"b{i}"},
            )
            if response.status_code != 201:
                errors.append(response.text)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    seqs = [e.seq for e in AuditEvent.select(AuditEvent.seq).order_by(AuditEvent.seq)]
    assert seqs == list(range(1, len(seqs) + 1))
    code_events = AuditEvent.select().where(AuditEvent.action == "code:ref:created").count()
    assert code_events == threads * per_thread
    verdict = audit_log.verify()
    assert verdict.ok and verdict.count == len(seqs)
    result = verify_cli(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"OK {len(seqs)} events, head {verdict.head_hash}"


@pytest.mark.parametrize(
    "statement", ["UPDATE audit_events SET actor = 'x'", "DELETE FROM audit_events"]
)
def test_database_refuses_changing_history(alice, project, bound_db, statement):
    with pytest.raises(peewee.DatabaseError, match="immutable"), bound_db.atomic():
        bound_db.execute_sql(statement)
    assert AuditEvent.select().count() >= 1


IMMUTABLE_TABLES = [
    "dataset_versions",
    "dataset_files",
    "code_refs",
    "environment_locks",
    "policy_snapshots",
]


@pytest.mark.parametrize("table", IMMUTABLE_TABLES)
def test_database_refuses_changing_immutable_records(alice, project, bound_db, table):
    pid = project["id"]
    api = alice.api
    dataset = api.post(f"/api/v1/projects/{pid}/datasets", json={"name": "d"}).json()
    upload = api.post(
        f"/api/v1/projects/{pid}/datasets/{dataset['id']}/versions",
        files=[("files", ("a.csv", b"1,2\n"))],
    )
    code = api.post(
        f"/api/v1/projects/{pid}/code-refs",
        json={"repo_url": "https://git.example/r.git", "commit_sha": "b" * 40},
    )
    env = api.post(
        f"/api/v1/projects/{pid}/environments",
        json={"name": "e", "base_image": "runner", "packages": []},
    ).json()
    lock = api.post(
        f"/api/v1/projects/{pid}/environment-locks",
        json={"environment_id": env["id"], "image_digest": "sha256:" + "c" * 64, "packages": []},
    )
    snapshot = api.post(f"/api/v1/projects/{pid}/policy-snapshots")
    assert {upload.status_code, code.status_code, lock.status_code, snapshot.status_code} == {201}
    rows = bound_db.execute_sql(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    assert rows >= 1  # a row trigger fires only on a table that has rows
    column = "size" if table == "dataset_files" else "created_by"
    for statement in (f"UPDATE {table} SET {column} = {column}", f"DELETE FROM {table}"):
        with pytest.raises(peewee.DatabaseError, match="immutable"), bound_db.atomic():
            bound_db.execute_sql(statement)
    assert bound_db.execute_sql(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == rows


def _drop_audit_triggers(database) -> None:
    if db.dialect() == "postgresql":
        database.execute_sql("ALTER TABLE audit_events DISABLE TRIGGER USER")
    else:
        database.execute_sql("DROP TRIGGER audit_events_no_update")


FIELDS = [
    "at",
    "actor",
    "action",
    "project_id",
    "object_type",
    "object_id",
    "request_id",
    "payload",
    "prev_hash",
    "hash",
    "canonical",
]


@pytest.mark.parametrize("field", FIELDS)
def test_any_tampered_field_is_reported_at_its_seq(alice, project, bound_db, config, field):
    pid = project["id"]
    for i in range(4):
        alice.api.post(f"/api/v1/projects/{pid}/datasets", json={"name": f"d{i}"})
    total = AuditEvent.select().count()
    target = total - 2
    _drop_audit_triggers(bound_db)
    original = AuditEvent.get_by_id(target)
    forged = {
        "payload": '{"name":"forged"}',
        "canonical": original.canonical.replace('"d', '"e', 1),
        "prev_hash": "0" * 64,
        "hash": "f" * 64,
        "project_id": "prj_someoneelse",
    }.get(field, getattr(original, field) + "x" if field != "payload" else None)
    bound_db.execute_sql(
        f"UPDATE audit_events SET {field} = {bound_db.param} WHERE seq = {bound_db.param}",
        (forged, target),
    )
    result = verify_cli(config)
    assert result.returncode == 1
    assert result.stdout.startswith(f"BROKEN at seq {target}:"), result.stdout


def test_deleted_event_is_reported_as_missing(alice, project, bound_db, config):
    pid = project["id"]
    for i in range(3):
        alice.api.post(f"/api/v1/projects/{pid}/datasets", json={"name": f"d{i}"})
    if db.dialect() == "postgresql":
        bound_db.execute_sql("ALTER TABLE audit_events DISABLE TRIGGER USER")
    else:
        bound_db.execute_sql("DROP TRIGGER audit_events_no_delete")
    bound_db.execute_sql("DELETE FROM audit_events WHERE seq = 3")
    result = verify_cli(config)
    assert result.returncode == 1 and result.stdout.strip() == "BROKEN at seq 3: event 3 is missing"


def test_first_event_chains_from_the_installation_genesis(alice, project, bound_db):
    first = AuditEvent.get_by_id(1)
    assert first.prev_hash == chain.genesis_hash(audit_log.installation_id())
    assert first.hash == chain.event_hash(first.prev_hash, first.canonical)


def test_project_admins_read_their_events_and_auditors_read_all(alice, make_user, project):
    pid = project["id"]
    bob = make_user("bob")
    other = bob.api.post("/api/v1/projects", json={"name": "bobs"}).json()
    alice.api.put(f"/api/v1/projects/{pid}/members/bob", json={"role": "editor"})
    own = alice.api.get(f"/api/v1/projects/{pid}/audit-events").json()["items"]
    assert own and {e["project_id"] for e in own} == {pid}
    assert [e["seq"] for e in own] == sorted(e["seq"] for e in own)
    assert bob.api.get(f"/api/v1/projects/{pid}/audit-events").status_code == 403  # editor
    assert alice.api.get(f"/api/v1/projects/{other['id']}/audit-events").status_code == 404
    assert alice.api.get("/api/v1/audit-events").status_code == 403
    auditor = make_user("audra", "auditor")
    everything = auditor.api.get("/api/v1/audit-events", params={"limit": 500}).json()
    assert {pid, other["id"]} <= {e["project_id"] for e in everything["items"]}
    assert auditor.api.get(f"/api/v1/projects/{pid}/audit-events").status_code == 200
    assert auditor.api.get(f"/api/v1/projects/{pid}").status_code == 404  # nothing else
    assert auditor.api.get("/api/v1/projects").json()["items"] == []
    status = auditor.api.get("/api/v1/audit/chain").json()
    assert status["ok"] and status["count"] == everything["items"][-1]["seq"]
    page = auditor.api.get("/api/v1/audit-events", params={"limit": 2}).json()
    after = auditor.api.get(
        "/api/v1/audit-events", params={"limit": 2, "after_seq": page["next_after_seq"]}
    ).json()
    assert after["items"][0]["seq"] == page["items"][-1]["seq"] + 1
