"""Run lifecycle on the control plane, with the test acting as a Data Plane agent.

These tests drive the versioned Data Plane contract over HTTP the way an agent does; they
check what the control plane records. Real containers are exercised in
tests/integration/execution/.
"""

from __future__ import annotations

import hashlib
import io
import tarfile

import peewee
import pytest

from appliance.auth import identities
from appliance.domain.context import SYSTEM, Context
from appliance.domain.records import AuditEvent, Run
from appliance.execution import scheduler

COMMIT = "1" * 40


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def setup(server, alice, project, config, bound_db):
    """A project with a dataset version, a pinned code ref, a lock, and a registered agent."""
    pid = project["id"]
    api = alice.api
    ds = api.post(f"/api/v1/projects/{pid}/datasets", json={"name": "d"}).json()
    version = api.post(
        f"/api/v1/projects/{pid}/datasets/{ds['id']}/versions",
        data=tar_of({"x.csv": b"1,2\n"}),
        headers={"Content-Type": "application/x-tar"},
    ).json()
    code = api.post(
        f"/api/v1/projects/{pid}/code-refs",
        json={"repo_url": "file:///srv/git/model.git", "commit_sha": COMMIT},
    ).json()
    env = api.post(
        f"/api/v1/projects/{pid}/environments",
        json={"name": "e", "base_image": "runner", "packages": []},
    ).json()
    lock = api.post(
        f"/api/v1/projects/{pid}/environment-locks",
        json={"environment_id": env["id"], "image_digest": "sha256:" + "a" * 64, "packages": []},
    ).json()
    _, credential = identities.register_data_plane(Context(SYSTEM, "test"), "dp1", "runc")
    spec = {
        "code_ref_id": code["id"],
        "environment_lock_id": lock["id"],
        "inputs": [{"name": "train", "dataset_version_id": version["id"]}],
        "command": ["python3", "train.py"],
        "parameters": {"epochs": 2},
    }
    return {
        "pid": pid,
        "api": api,
        "spec": spec,
        "version": version,
        "code": code,
        "plane": server.client(credential),
        "config": config,
    }


def plan(config) -> dict:
    return scheduler.tick(config)


def test_non_production_run_records_limitations(setup):
    api, pid = setup["api"], setup["pid"]
    branch = api.post(
        f"/api/v1/projects/{pid}/code-refs",
        json={"repo_url": "file:///srv/git/model.git", "ref": "main"},
    ).json()
    run = api.post(
        f"/api/v1/projects/{pid}/runs",
        json={**setup["spec"], "code_ref_id": branch["id"], "inputs": []},
    )
    assert run.status_code == 201, run.text
    limitations = run.json()["limitations"]
    assert any("branch" in item for item in limitations)
    assert any("DatasetVersion" in item for item in limitations)
    event = AuditEvent.get(
        (AuditEvent.action == "run:record:created") & (AuditEvent.object_id == run.json()["id"])
    )
    assert event.payload["limitations"] == limitations


def test_production_gate_lists_every_missing_item(setup):
    api, pid = setup["api"], setup["pid"]
    branch = api.post(
        f"/api/v1/projects/{pid}/code-refs",
        json={"repo_url": "file:///srv/git/model.git", "ref": "main"},
    ).json()
    refused = api.post(
        f"/api/v1/projects/{pid}/runs",
        json={**setup["spec"], "code_ref_id": branch["id"], "inputs": [], "production": True},
    )
    assert refused.status_code == 422
    body = refused.json()
    assert body["error"] == "production_requirements_unmet"
    missing = " | ".join(body["details"]["missing"])
    assert "branch" in missing and "registry" in missing and "DatasetVersion" in missing
    assert Run.select().count() == 0


def test_cross_project_inputs_are_refused(setup, alice):
    api, pid = setup["api"], setup["pid"]
    other = api.post("/api/v1/projects", json={"name": "other"}).json()
    ds = api.post(f"/api/v1/projects/{other['id']}/datasets", json={"name": "d"}).json()
    foreign = api.post(
        f"/api/v1/projects/{other['id']}/datasets/{ds['id']}/versions",
        data=tar_of({"y": b"2"}),
        headers={"Content-Type": "application/x-tar"},
    ).json()
    refused = api.post(
        f"/api/v1/projects/{pid}/runs",
        json={**setup["spec"], "inputs": [{"dataset_version_id": foreign["id"]}]},
    )
    assert (refused.status_code, refused.json()["error"]) == (422, "cross_project_reference")


def test_planning_freezes_an_immutable_snapshot(setup, bound_db):
    api, pid, config = setup["api"], setup["pid"], setup["config"]
    run = api.post(f"/api/v1/projects/{pid}/runs", json=setup["spec"]).json()
    assert run["state"] == "queued"
    assert plan(config)["planned"] == 1
    got = api.get(f"/api/v1/projects/{pid}/runs/{run['id']}").json()
    assert got["state"] == "planned" and got["snapshot_digest"].startswith("sha256:")
    snapshot = api.get(f"/api/v1/projects/{pid}/runs/{run['id']}/snapshot").json()["snapshot"]
    assert snapshot["code"]["commit_sha"] == COMMIT
    assert snapshot["image"].endswith("@sha256:" + "a" * 64)
    assert snapshot["network"] == {"egress": []}
    assert snapshot["inputs"][0]["files"] == [
        {"path": "x.csv", "sha256": hashlib.sha256(b"1,2\n").hexdigest(), "size": 4}
    ]
    with pytest.raises(peewee.DatabaseError, match="immutable"), bound_db.atomic():
        bound_db.execute_sql("UPDATE execution_snapshots SET digest = 'x'")


def test_contract_full_lifecycle_is_idempotent(setup, bound_db):
    api, pid, plane, config = setup["api"], setup["pid"], setup["plane"], setup["config"]
    run = api.post(f"/api/v1/projects/{pid}/runs", json=setup["spec"]).json()
    plan(config)
    base = "/api/v1/dataplane"
    leased = plane.post(f"{base}/leases", json={"capacity": 4}).json()["runs"]
    assert [r["run_id"] for r in leased] == [run["id"]]
    again = plane.post(f"{base}/leases", json={"capacity": 4}).json()["runs"]
    assert [r["run_id"] for r in again] == [run["id"]]  # same lease, not a second run
    rid = run["id"]
    for _ in range(2):
        assert plane.post(f"{base}/runs/{rid}/state", json={"state": "running"}).status_code == 200
    assert plane.post(f"{base}/runs/{rid}/logs", json={"offset": 0, "data": "hello "}).json() == {
        "size": 6
    }
    assert plane.post(f"{base}/runs/{rid}/logs", json={"offset": 0, "data": "hello "}).json() == {
        "size": 6
    }
    assert plane.post(
        f"{base}/runs/{rid}/logs", json={"offset": 3, "data": "lo world\n"}
    ).json() == {"size": 12}
    gap = plane.post(f"{base}/runs/{rid}/logs", json={"offset": 99, "data": "x"})
    assert (gap.status_code, gap.json()["error"]) == (409, "log_gap")
    records = [
        {"seq": 0, "name": "loss", "value": 0.5, "step": 1},
        {"seq": 1, "name": "loss", "value": 0.25, "step": 2},
    ]
    for _ in range(2):
        assert plane.post(f"{base}/runs/{rid}/metrics", json={"records": records}).json() == {
            "count": 2
        }
    content = b"model-bytes"
    sha = hashlib.sha256(content).hexdigest()
    wrong = plane.put(
        f"{base}/runs/{rid}/artifacts/model.bin",
        data=content,
        headers={"X-Content-SHA256": "0" * 64},
    )
    assert (wrong.status_code, wrong.json()["error"]) == (422, "invalid_digest")
    for _ in range(2):
        stored = plane.put(
            f"{base}/runs/{rid}/artifacts/model.bin",
            data=content,
            headers={"X-Content-SHA256": sha},
        )
        assert stored.status_code == 200, stored.text
    for _ in range(2):
        done = plane.post(f"{base}/runs/{rid}/state", json={"state": "succeeded", "exit_code": 0})
        assert done.json() == {"state": "succeeded"}
    backwards = plane.post(f"{base}/runs/{rid}/state", json={"state": "running"})
    assert (backwards.status_code, backwards.json()["error"]) == (409, "invalid_state")

    assert api.get(f"/api/v1/projects/{pid}/runs/{rid}/logs").text == "hello world\n"
    assert api.get(f"/api/v1/projects/{pid}/runs/{rid}/logs", params={"follow": 1}).text == (
        "hello world\n"
    )
    metrics = api.get(f"/api/v1/projects/{pid}/runs/{rid}/metrics").json()["metrics"]
    assert [m["value"] for m in metrics["loss"]] == [0.5, 0.25]
    artifacts = api.get(f"/api/v1/projects/{pid}/runs/{rid}/artifacts").json()
    assert [(a["path"], a["sha256"]) for a in artifacts] == [("model.bin", sha)]
    assert api.get(f"/api/v1/projects/{pid}/runs/{rid}/artifacts/model.bin").content == content
    for statement in ("UPDATE artifacts SET size = 0", "DELETE FROM artifacts"):
        with pytest.raises(peewee.DatabaseError, match="immutable"), bound_db.atomic():
            bound_db.execute_sql(statement)
    states = [
        e.payload["to"]
        for e in AuditEvent.select()
        .where((AuditEvent.action == "run:state:changed") & (AuditEvent.object_id == rid))
        .order_by(AuditEvent.seq)
    ]
    assert states == ["planned", "running", "succeeded"]


def test_only_data_planes_use_the_contract(setup):
    refused = setup["api"].post("/api/v1/dataplane/leases", json={"capacity": 1})
    assert refused.status_code == 403


def test_lease_expiry_then_the_agent_returns(setup, bound_db):
    api, pid, plane, config = setup["api"], setup["pid"], setup["plane"], setup["config"]
    rid = api.post(f"/api/v1/projects/{pid}/runs", json=setup["spec"]).json()["id"]
    plan(config)
    plane.post("/api/v1/dataplane/leases", json={"capacity": 1})
    plane.post(f"/api/v1/dataplane/runs/{rid}/state", json={"state": "running"})
    Run.update(lease_expires_at="2000-01-01T00:00:00.000000Z").where(Run.id == rid).execute()
    assert plan(config)["leases_expired"] == 1
    assert Run.get_by_id(rid).state == "unknown"
    beat = plane.post(f"/api/v1/dataplane/runs/{rid}/heartbeat").json()
    assert beat["state"] == "reconciling"
    plane.post(
        f"/api/v1/dataplane/runs/{rid}/state",
        json={"state": "failed", "exit_code": 1, "reason": "nonzero_exit"},
    )
    final = api.get(f"/api/v1/projects/{pid}/runs/{rid}").json()
    assert (final["state"], final["exit_code"], final["reason"]) == ("failed", 1, "nonzero_exit")


def test_reconcile_requeues_unstarted_and_fails_lost_runs(setup, bound_db):
    api, pid, plane, config = setup["api"], setup["pid"], setup["plane"], setup["config"]
    first = api.post(f"/api/v1/projects/{pid}/runs", json=setup["spec"]).json()["id"]
    second = api.post(f"/api/v1/projects/{pid}/runs", json=setup["spec"]).json()["id"]
    plan(config)
    plane.post("/api/v1/dataplane/leases", json={"capacity": 2})
    plane.post(f"/api/v1/dataplane/runs/{second}/state", json={"state": "running"})
    settled = plane.post("/api/v1/dataplane/reconcile", json={"known_run_ids": []}).json()
    assert {s["run_id"]: s["state"] for s in settled["settled"]} == {
        first: "planned",
        second: "failed",
    }
    assert Run.get_by_id(first).data_plane_id is None
    assert Run.get_by_id(second).reason == "lost"


def test_cancel_before_and_after_lease(setup, bound_db):
    api, pid, plane, config = setup["api"], setup["pid"], setup["plane"], setup["config"]
    early = api.post(f"/api/v1/projects/{pid}/runs", json=setup["spec"]).json()["id"]
    assert api.post(f"/api/v1/projects/{pid}/runs/{early}/cancel").json()["state"] == "canceled"
    again = api.post(f"/api/v1/projects/{pid}/runs/{early}/cancel")
    assert (again.status_code, again.json()["error"]) == (409, "invalid_state")
    late = api.post(f"/api/v1/projects/{pid}/runs", json=setup["spec"]).json()["id"]
    plan(config)
    plane.post("/api/v1/dataplane/leases", json={"capacity": 1})
    assert api.post(f"/api/v1/projects/{pid}/runs/{late}/cancel").json()["cancel_requested"]
    assert plane.post(f"/api/v1/dataplane/runs/{late}/heartbeat").json()["cancel_requested"]


def _finish(plane, rid: str, artifact: bytes) -> None:
    base = "/api/v1/dataplane"
    plane.post(f"{base}/runs/{rid}/state", json={"state": "running"})
    plane.put(
        f"{base}/runs/{rid}/artifacts/model.bin",
        data=artifact,
        headers={"X-Content-SHA256": hashlib.sha256(artifact).hexdigest()},
    )
    plane.post(f"{base}/runs/{rid}/state", json={"state": "succeeded", "exit_code": 0})


def test_replay_reuses_the_snapshot_and_gives_a_verdict(setup, bound_db):
    api, pid, plane, config = setup["api"], setup["pid"], setup["plane"], setup["config"]
    source = api.post(f"/api/v1/projects/{pid}/runs", json=setup["spec"]).json()["id"]
    plan(config)
    plane.post("/api/v1/dataplane/leases", json={"capacity": 1})
    _finish(plane, source, b"weights-v1")
    verdicts = {}
    for content in (b"weights-v1", b"weights-v2"):
        replay = api.post(f"/api/v1/projects/{pid}/runs/{source}/replay")
        assert replay.status_code == 201 and replay.json()["source_kind"] == "replay"
        rid = replay.json()["id"]
        plan(config)
        source_snap = api.get(f"/api/v1/projects/{pid}/runs/{source}/snapshot").json()["snapshot"]
        replay_snap = api.get(f"/api/v1/projects/{pid}/runs/{rid}/snapshot").json()["snapshot"]
        assert {
            k: v for k, v in replay_snap.items() if k not in ("run_id", "policy_snapshot_id")
        } == {k: v for k, v in source_snap.items() if k not in ("run_id", "policy_snapshot_id")}
        plane.post("/api/v1/dataplane/leases", json={"capacity": 1})
        _finish(plane, rid, content)
        verdicts[content] = api.get(f"/api/v1/projects/{pid}/runs/{rid}").json()["reproducibility"]
    assert verdicts[b"weights-v1"]["reproduced"] == "identical"
    different = verdicts[b"weights-v2"]
    assert different["reproduced"] == "different"
    assert [d["path"] for d in different["differences"]] == ["model.bin"]
    retry = api.post(f"/api/v1/projects/{pid}/runs/{source}/retry")
    assert (retry.status_code, retry.json()["error"]) == (409, "invalid_state")
    rerun = api.post(f"/api/v1/projects/{pid}/runs/{source}/rerun").json()
    assert (rerun["source_run_id"], rerun["source_kind"]) == (source, "rerun")


def test_runs_list_filters_by_state(setup):
    api, pid = setup["api"], setup["pid"]
    for _ in range(3):
        api.post(f"/api/v1/projects/{pid}/runs", json=setup["spec"])
    one = api.get(f"/api/v1/projects/{pid}/runs").json()["items"][0]["id"]
    api.post(f"/api/v1/projects/{pid}/runs/{one}/cancel")
    queued = api.get(f"/api/v1/projects/{pid}/runs", params={"state": "queued"}).json()["items"]
    assert len(queued) == 2 and one not in [r["id"] for r in queued]


def test_dataplane_render_prints_validated_kubernetes_manifests(setup, bound_db):
    """`animus dataplane render --backend kubernetes --run` on a planned run, for review."""
    import dataclasses
    import os
    import subprocess
    import sys

    import kubernetes_validate
    import yaml

    api, pid, config = setup["api"], setup["pid"], setup["config"]
    rid = api.post(f"/api/v1/projects/{pid}/runs", json=setup["spec"]).json()["id"]
    registry = "registry.animus.local:5000"
    plan(dataclasses.replace(config, registry_url=f"https://{registry}"))
    env = {
        **os.environ,
        "ANIMUS_DATA_DIR": str(config.data_dir),
        "ANIMUS_DATABASE_URL": config.database_url,
        "ANIMUS_K8S_REGISTRY": registry,
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "dataplane",
            "render",
            "--backend",
            "kubernetes",
            "--run",
            rid,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    manifests = list(yaml.safe_load_all(result.stdout))
    kinds = {m["kind"] for m in manifests}
    assert {"Job", "NetworkPolicy"} <= kinds
    for manifest in manifests:
        kubernetes_validate.validate(manifest, "1.30.0", strict=True)
    job = next(m for m in manifests if m["kind"] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"{registry}/animus/environments@sha256:" + "a" * 64
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert job["spec"]["backoffLimit"] == 0
    other = subprocess.run(
        [sys.executable, "-m", "appliance", "dataplane", "render", "--run", rid],
        env={**env, "ANIMUS_K8S_REGISTRY": "elsewhere:5000"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert other.returncode == 1 and "not in this Data Plane's registry" in other.stderr
    assert "Traceback" not in other.stderr
