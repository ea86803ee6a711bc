"""Governed Runs end to end: control plane, scheduler and Data Plane agent as separate
processes, user code in real runc containers, images from a real registry.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port
from tests.integration.execution.conftest import _git

JOB = r"""
import json, os, sys, time
import animus_run

marker = sys.argv[1]
pause = float(sys.argv[2]) if len(sys.argv) > 2 else 0
rows = open(os.path.join(os.environ["ANIMUS_INPUTS_DIR"], "train", "rows.csv")).read()
print("rows", len(rows.splitlines()), flush=True)
secret_file = "/run/secrets/CANARY"
if os.path.exists(secret_file):
    value = open(secret_file).read()
    print("the secret is", value, flush=True)
    if "leak" in sys.argv:
        open(os.path.join(os.environ["ANIMUS_OUTPUT_DIR"], "leak.txt"), "w").write(value)
for step in range(3):
    animus_run.log_metric("loss", 1.0 / (step + 1), step=step)
time.sleep(pause)
out = os.environ["ANIMUS_OUTPUT_DIR"]
open(os.path.join(out, "model.json"), "w").write(json.dumps({"rows": rows.count("\n")}))
print("done", marker, flush=True)
"""


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class Appliance:
    """The three processes of a single-host installation, each started as `animus …`."""

    def __init__(self, root: Path, registry: str):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "ANIMUS_DATA_DIR": str(root / "data"),
            "ANIMUS_REGISTRY_URL": f"http://{registry}",
            "ANIMUS_ENVIRONMENT_REPOSITORY": "animus/runner",
            "ANIMUS_LEASE_SECONDS": "3",
            "ANIMUS_SECRETS_DIR": str(root / "secrets"),
            "ANIMUS_CONTROL_PLANE_URL": self.url,
            "ANIMUS_DATAPLANE_DIR": str(root / "dataplane"),
            "ANIMUS_LOG_LEVEL": "WARNING",
            "ANIMUS_BLOB_FSYNC": "0",
        }
        self.processes: dict[str, subprocess.Popen] = {}

    def animus(self, *args: str, stdin: str | None = None) -> str:
        return subprocess.run(
            [sys.executable, "-m", "appliance", *args],
            env=self.env,
            input=stdin,
            text=True,
            capture_output=True,
            check=True,
            timeout=120,
        ).stdout.strip()

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            [sys.executable, "-m", "appliance", *args], env=self.env, stdout=log, stderr=log
        )
        self.processes[name] = process
        return process

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def appliance(tmp_path, registry, pushed_runner, code_job):
    box = Appliance(tmp_path, registry.address)
    box.animus("db", "upgrade")
    box.animus("admin", "create-user", "alice")
    token = box.animus("token", "create", "--user", "alice")
    box.env["ANIMUS_DATAPLANE_TOKEN"] = box.animus("dataplane", "register", "host1")
    box.start("serve", "serve", "--port", str(box.port), "--no-upgrade")
    box.start("scheduler", "scheduler", "--interval", "0.2")
    box.start("dataplane", "dataplane", "--capacity", "4")
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {token}"
    for _ in range(100):
        try:
            if requests.get(box.url + "/readyz", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.1)
    box.api = api
    pid = api.post(box.url + "/api/v1/projects", json={"name": "p"}).json()["id"]
    ds = api.post(f"{box.url}/api/v1/projects/{pid}/datasets", json={"name": "d"}).json()
    version = api.post(
        f"{box.url}/api/v1/projects/{pid}/datasets/{ds['id']}/versions",
        data=tar_of({"rows.csv": b"a,b\n1,2\n3,4\n"}),
        headers={"Content-Type": "application/x-tar"},
    ).json()
    repo_url, sha = code_job
    code = api.post(
        f"{box.url}/api/v1/projects/{pid}/code-refs", json={"repo_url": repo_url, "commit_sha": sha}
    ).json()
    env = api.post(
        f"{box.url}/api/v1/projects/{pid}/environments",
        json={"name": "runner", "base_image": "runner", "packages": []},
    ).json()
    lock = api.post(
        f"{box.url}/api/v1/projects/{pid}/environment-locks",
        json={
            "environment_id": env["id"],
            "image_digest": pushed_runner.split("@")[1],
            "packages": [],
        },
    ).json()
    box.pid = pid
    box.spec = {
        "code_ref_id": code["id"],
        "environment_lock_id": lock["id"],
        "inputs": [{"name": "train", "dataset_version_id": version["id"]}],
        "production": True,
    }
    yield box
    box.stop()


@pytest.fixture(scope="session")
def code_job(tmp_path_factory) -> tuple[str, str]:
    base = tmp_path_factory.mktemp("job")
    work = base / "work"
    work.mkdir()
    (work / "job.py").write_text(JOB)
    _git("init", "-q", "-b", "main", cwd=work)
    _git("add", ".", cwd=work)
    _git("commit", "-q", "-m", "job", cwd=work)
    sha = _git("rev-parse", "HEAD", cwd=work)
    _git("clone", "-q", "--bare", str(work), str(base / "job.git"), cwd=base)
    return f"file://{base / 'job.git'}", sha


def submit(box: Appliance, *args: str, **spec) -> str:
    response = box.api.post(
        f"{box.url}/api/v1/projects/{box.pid}/runs",
        json={**box.spec, "command": ["python3", "job.py", *args], **spec},
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def wait_for(box: Appliance, run_id: str, states: set[str], timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = box.api.get(f"{box.url}/api/v1/projects/{box.pid}/runs/{run_id}").json()
        if run["state"] in states:
            return run
        time.sleep(0.2)
    raise AssertionError(f"{run_id} did not reach {states}: {run}")


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        chain.append(pid)
    return chain


def find_process(marker: str, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if marker.encode() in (entry / "cmdline").read_bytes():
                        return int(entry.name)
                except OSError:
                    continue
        time.sleep(0.1)
    raise AssertionError(f"no process with {marker}")


def test_production_run_replay_and_no_user_process_under_the_control_plane(appliance):
    box = appliance
    marker = f"marker-{uuid.uuid4().hex}"
    run_id = submit(box, marker, "2")
    user_pid = find_process(marker)
    chain = ancestors(user_pid)
    for name in ("serve", "scheduler"):
        assert box.processes[name].pid not in chain, f"user code runs under {name}"
    run = wait_for(box, run_id, {"succeeded", "failed"})
    assert (run["state"], run["exit_code"]) == ("succeeded", 0), run
    base = f"{box.url}/api/v1/projects/{box.pid}/runs/{run_id}"
    logs = box.api.get(base + "/logs").text
    assert "rows 3" in logs and f"done {marker}" in logs
    metrics = box.api.get(base + "/metrics").json()["metrics"]
    assert [m["value"] for m in metrics["loss"]] == [1.0, 0.5, 1.0 / 3]
    artifacts = box.api.get(base + "/artifacts").json()
    content = box.api.get(base + "/artifacts/model.json").content
    assert [(a["path"], a["sha256"]) for a in artifacts] == [
        ("model.json", hashlib.sha256(content).hexdigest())
    ]
    replay = box.api.post(base + "/replay").json()
    done = wait_for(box, replay["id"], {"succeeded", "failed"})
    assert done["state"] == "succeeded"
    verdict = box.api.get(f"{box.url}/api/v1/projects/{box.pid}/runs/{replay['id']}").json()
    assert verdict["reproducibility"]["reproduced"] == "identical"
    assert box.animus("audit", "verify").startswith("OK ")


def test_agent_killed_mid_run_then_restarted_reaches_the_true_outcome(appliance):
    box = appliance
    run_id = submit(box, "kill-test", "6")
    wait_for(box, run_id, {"running"})
    box.kill("dataplane")
    assert wait_for(box, run_id, {"unknown"}, timeout=30)["state"] == "unknown"
    box.kill("scheduler")
    box.start("scheduler", "scheduler", "--interval", "0.2")
    box.start("dataplane", "dataplane", "--capacity", "4")
    run = wait_for(box, run_id, {"succeeded", "failed"})
    assert run["state"] == "succeeded", run
    events = box.api.get(
        f"{box.url}/api/v1/projects/{box.pid}/audit-events", params={"limit": 500}
    ).json()["items"]
    finals = [
        e
        for e in events
        if e["object_id"] == run_id
        and e["action"] == "run:state:changed"
        and e["payload"]["to"] == "succeeded"
    ]
    assert len(finals) == 1
    assert (
        "done kill-test"
        in box.api.get(f"{box.url}/api/v1/projects/{box.pid}/runs/{run_id}/logs").text
    )


def test_secret_canary_never_leaves_the_container(appliance):
    box = appliance
    canary = "canary-" + uuid.uuid4().hex
    secret_dir = box.root / "secrets" / box.pid
    secret_dir.mkdir(parents=True)
    (secret_dir / "CANARY").write_text(canary)
    policy = box.api.get(f"{box.url}/api/v1/projects/{box.pid}/policy").json()
    policy["secret_grants"] = ["CANARY"]
    box.api.put(f"{box.url}/api/v1/projects/{box.pid}/policy", json=policy)
    used = submit(box, "secret-user", secrets=["CANARY"])
    leaked = submit(box, "secret-leaker", "0", "leak", secrets=["CANARY"])
    first = wait_for(box, used, {"succeeded", "failed"})
    second = wait_for(box, leaked, {"succeeded", "failed"})
    assert first["state"] == "succeeded"
    assert (second["state"], second["reason"]) == ("failed", "secret_in_output")
    seen = []
    for run_id in (used, leaked):
        base = f"{box.url}/api/v1/projects/{box.pid}/runs/{run_id}"
        logs = box.api.get(base + "/logs").text
        assert "the secret is [REDACTED]" in logs
        for path in ("", "/logs", "/metrics", "/artifacts", "/snapshot"):
            seen.append(box.api.get(base + path).text)
    seen.append(
        json.dumps(
            box.api.get(
                f"{box.url}/api/v1/projects/{box.pid}/audit-events", params={"limit": 500}
            ).json()
        )
    )
    assert all(canary not in text for text in seen)
    for directory in (box.root / "data", box.root / "dataplane"):
        for path in directory.rglob("*"):
            if path.is_file():
                assert canary.encode() not in path.read_bytes(), f"canary in {path}"


@pytest.mark.slow
def test_fifty_runs_with_concurrency_four_finish_exactly_once(appliance):
    box = appliance
    ids = [submit(box, f"many-{i}") for i in range(50)]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        runs = box.api.get(
            f"{box.url}/api/v1/projects/{box.pid}/runs", params={"limit": 500}
        ).json()["items"]
        if all(r["state"] in ("succeeded", "failed") for r in runs if r["id"] in ids):
            break
        time.sleep(1)
    states = {r["id"]: r["state"] for r in runs}
    assert all(states[i] == "succeeded" for i in ids), states
    events = []
    after = 0
    while True:
        page = box.api.get(
            f"{box.url}/api/v1/projects/{box.pid}/audit-events",
            params={"limit": 500, "after_seq": after},
        ).json()
        events += page["items"]
        if page["next_after_seq"] is None:
            break
        after = page["next_after_seq"]
    finals = [
        e["object_id"]
        for e in events
        if e["action"] == "run:state:changed" and e["payload"]["to"] == "succeeded"
    ]
    assert sorted(finals) == sorted(ids)


def test_production_run_waits_for_two_approvals_by_other_admins(appliance):
    box = appliance
    url = f"{box.url}/api/v1/projects/{box.pid}"
    policy = box.api.get(url + "/policy").json()
    policy["required_approvals"] = 2
    box.api.put(url + "/policy", json=policy)
    people = {}
    for name, role in (("bea", "admin"), ("carl", "admin"), ("ed", "editor")):
        box.animus("admin", "create-user", name)
        session = requests.Session()
        session.headers["Authorization"] = "Bearer " + box.animus("token", "create", "--user", name)
        box.api.put(f"{url}/members/{name}", json={"role": role})
        people[name] = session
    run_id = submit(box, "approved", "0")
    assert box.api.get(f"{url}/runs/{run_id}").json()["state"] == "created"
    approve = f"{url}/runs/{run_id}/approve"
    own = box.api.post(approve, json={"reason": "I wrote it"})
    assert (own.status_code, own.json()["error"]) == (409, "invalid_state")
    assert people["ed"].post(approve, json={"reason": "fine"}).status_code == 403
    assert people["bea"].post(approve, json={"reason": ""}).status_code == 400
    first = people["bea"].post(approve, json={"reason": "data checked"}).json()
    assert first["state"] == "created"
    assert people["bea"].post(approve, json={"reason": "again"}).status_code == 409
    second = people["carl"].post(approve, json={"reason": "code reviewed"}).json()
    assert second["state"] == "queued"
    assert [a["reason"] for a in second["approvals"]] == ["data checked", "code reviewed"]
    assert wait_for(box, run_id, {"succeeded", "failed"})["state"] == "succeeded"
    events = box.api.get(f"{url}/audit-events", params={"limit": 500}).json()["items"]
    granted = [
        e["payload"]["reason"]
        for e in events
        if e["action"] == "run:approval:granted" and e["object_id"] == run_id
    ]
    assert granted == ["data checked", "code reviewed"]


def test_pipeline_artifact_reaches_the_next_step_inside_its_container(appliance):
    """A two-step pipeline on the real appliance: the second step reads the first step's
    output from /inputs/<name>, fetched by the agent and verified by digest."""
    box = appliance
    url = f"{box.url}/api/v1/projects/{box.pid}"
    base = {k: box.spec[k] for k in ("code_ref_id", "environment_lock_id")}
    produce = {
        **base,
        "name": "produce",
        "command": ["python3", "job.py", "produce"],
        "inputs": [
            {"name": "train", "dataset_version_id": box.spec["inputs"][0]["dataset_version_id"]}
        ],
    }
    consume = {
        **base,
        "name": "consume",
        "command": [
            "python3",
            "-c",
            "import os; print('got', open(os.path.join("
            "os.environ['ANIMUS_INPUTS_DIR'], 'upstream', 'model.json')).read())",
        ],
        "inputs": [{"name": "upstream", "from_step": "produce", "artifact": "model.json"}],
    }
    pipeline = box.api.post(
        url + "/pipelines", json={"name": "two", "spec": {"steps": [produce, consume]}}
    )
    assert pipeline.status_code == 201, pipeline.text
    started = box.api.post(f"{url}/pipelines/{pipeline.json()['id']}/runs").json()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = box.api.get(f"{url}/pipeline-runs/{started['id']}").json()
        if state["state"] in ("succeeded", "failed"):
            break
        time.sleep(0.3)
    assert state["state"] == "succeeded", state
    steps = {s["name"]: s for s in state["steps"]}
    logs = box.api.get(f"{url}/runs/{steps['consume']['run_id']}/logs").text
    assert 'got {"rows": 3}' in logs
