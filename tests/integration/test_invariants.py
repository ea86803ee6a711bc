"""DESIGN §2 invariants that no single feature test owns: each test fails if its rule breaks."""

from __future__ import annotations

import peewee
import pytest

from appliance.audit import log as audit_log
from appliance.domain.records import AuditEvent, Dataset, DatasetVersion, Project
from appliance.storage.blobs import StagedBlobs


def test_no_action_without_its_event(server, alice, bound_db, monkeypatch):
    """§2.3: when the audit append fails, the action it records is rolled back with it."""
    events = AuditEvent.select().count()

    def refuse(*_args, **_kwargs):
        raise peewee.OperationalError("audit storage unavailable")

    monkeypatch.setattr(audit_log.AuditEvent, "create", refuse)
    response = alice.api.post("/api/v1/projects", json={"name": "unaudited"})
    assert response.status_code == 503
    monkeypatch.undo()
    assert Project.select().where(Project.name == "unaudited").count() == 0
    assert AuditEvent.select().count() == events


def test_no_event_without_its_action(server, alice, project, config, bound_db, monkeypatch):
    """§2.3: when the action fails after its event was appended, the event is rolled back."""
    dataset = alice.api.post(
        f"/api/v1/projects/{project['id']}/datasets", json={"name": "d"}
    ).json()
    events = AuditEvent.select().count()

    def fail_promote(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StagedBlobs, "promote", fail_promote)
    response = alice.api.post(
        f"/api/v1/projects/{project['id']}/datasets/{dataset['id']}/versions",
        files=[("files", ("a.csv", b"1,2\n"))],
    )
    monkeypatch.undo()
    assert response.status_code == 500
    assert "No space" not in response.text  # no internals reach the client
    assert DatasetVersion.select().count() == 0
    assert AuditEvent.select().count() == events
    assert not any(p.is_file() for p in (config.blob_dir / "sha256").rglob("*"))
    assert audit_log.verify().ok


def test_database_refuses_a_cross_project_reference(server, alice, bound_db):
    """§2.6: the composite foreign keys make a cross-project reference impossible in SQL."""
    first = alice.api.post("/api/v1/projects", json={"name": "one"}).json()["id"]
    second = alice.api.post("/api/v1/projects", json={"name": "two"}).json()["id"]
    dataset = alice.api.post(f"/api/v1/projects/{first}/datasets", json={"name": "d"}).json()
    with pytest.raises(peewee.IntegrityError), bound_db.atomic():
        DatasetVersion.create(
            id="dsv_forged",
            project_id=second,
            dataset_id=dataset["id"],
            number=1,
            digest="sha256:" + "0" * 64,
            file_count=0,
            total_size=0,
            created_by="attacker",
        )
    assert Dataset.select().count() == 1 and DatasetVersion.select().count() == 0
