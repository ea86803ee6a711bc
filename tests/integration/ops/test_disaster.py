"""The disaster test: a real single-host appliance (control plane, scheduler and Data Plane
agent as processes, user code in runc containers, images from a real registry) is backed up
while it runs, loses its data, is restored, and carries on as before."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid

import pytest
import requests

from tests.integration.execution.test_governed_runs import (  # noqa: F401 (fixtures)
    appliance,
    code_job,
    submit,
    wait_for,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def installation(request, monkeypatch):
    """The appliance of the governed-runs tests, on the embedded SQLite or on PostgreSQL."""
    lose_database = None
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres_server")
        name = "disaster_" + uuid.uuid4().hex[:8]
        server.psql(f"CREATE DATABASE {name}")
        monkeypatch.setenv("ANIMUS_DATABASE_URL", server.url(name))

        def lose_database():
            server.psql(f"DROP DATABASE {name} WITH (FORCE)")
            server.psql(f"CREATE DATABASE {name}")

    box = request.getfixturevalue("appliance")
    box.lose_database = lose_database
    return box


def wait_ready(box) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(box.url + "/readyz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise AssertionError("the restored appliance did not become ready")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_backup_lose_everything_restore_and_replay_still_reproduces(
    installation, pushed_runner, tmp_path
):
    box = installation
    project = f"{box.url}/api/v1/projects/{box.pid}"
    run_id = submit(box, "before-the-disaster", "0")
    assert wait_for(box, run_id, {"succeeded", "failed"})["state"] == "succeeded"
    artifacts = box.api.get(f"{project}/runs/{run_id}/artifacts").json()
    assert artifacts, "the run recorded no artifacts"
    first_replay = box.api.post(f"{project}/runs/{run_id}/replay").json()
    assert wait_for(box, first_replay["id"], {"succeeded", "failed"})["state"] == "succeeded"
    replayed = box.api.get(f"{project}/runs/{first_replay['id']}").json()
    assert replayed["reproducibility"]["reproduced"] == "identical"
    version_id = box.spec["inputs"][0]["dataset_version_id"]
    version = box.api.get(f"{project}/dataset-versions/{version_id}").json()

    # Backed up while serve, scheduler and the Data Plane agent keep running.
    backup = tmp_path / "backup"
    summary = json.loads(box.animus("backup", str(backup), "--json"))
    assert summary["blobs"]["referenced"] >= len(artifacts) + len(version["files"])

    box.stop()
    shutil.rmtree(box.root / "data")
    if box.lose_database is not None:
        box.lose_database()
    assert not (box.root / "data").exists()

    restored = json.loads(box.animus("restore", str(backup), "--json"))
    assert restored["audit_head"] == summary["audit_head"]
    # Images are not in the backup; the registry still holds the one the runs are pinned to.
    manifest = json.loads((backup / "MANIFEST.json").read_text())
    assert manifest["environment_images"] == [pushed_runner.split("@")[1]]
    assert restored["environment_images_missing"] == []
    verdict = box.animus("audit", "verify")
    assert verdict.startswith(f"OK {summary['audit_head']['seq'] + 1} events"), verdict

    box.processes = {}
    box.start("serve", "serve", "--port", str(box.port), "--no-upgrade")
    box.start("scheduler", "scheduler", "--interval", "0.2")
    box.start("dataplane", "dataplane", "--capacity", "4")
    wait_ready(box)

    for entry in version["files"]:
        data = box.api.get(f"{project}/dataset-versions/{version_id}/files/{entry['path']}").content
        assert (len(data), sha256(data)) == (entry["size"], entry["sha256"])
    for artifact in artifacts:
        data = box.api.get(f"{project}/runs/{run_id}/artifacts/{artifact['path']}").content
        assert sha256(data) == artifact["sha256"], artifact["path"]
    replay = box.api.post(f"{project}/runs/{run_id}/replay")
    assert replay.status_code == 201, replay.text
    done = wait_for(box, replay.json()["id"], {"succeeded", "failed"})
    assert done["state"] == "succeeded", done
    again = box.api.get(f"{project}/runs/{replay.json()['id']}").json()
    assert again["reproducibility"]["reproduced"] == "identical"
    events = box.api.get(f"{project}/audit-events", params={"limit": 500}).json()["items"]
    assert any(e["action"] == "run:state:changed" for e in events)
    assert box.animus("audit", "verify").startswith("OK ")
