"""The runc backend with real runc, the real runner image from a real registry, real git."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from appliance.execution.backend import ExecutionRefused, checkout_code
from appliance.execution.runc_backend import RuncBackend
from tests.integration.execution.conftest import wait_finished


def test_run_succeeds_with_logs_metrics_and_outputs(make_backend, prepare) -> None:
    backend: RuncBackend = make_backend()
    snapshot, workspace = prepare(["python3", "train.py"])
    backend.start(snapshot, workspace)
    run_id = snapshot["run_id"]

    status = wait_finished(backend, run_id)

    assert (status.state, status.exit_code, status.reason) == ("succeeded", 0, None)
    assert status.started_at and status.finished_at
    log = backend.read_logs(run_id, 0)
    assert b"rows: 3\n" in log and b"to stderr\n" in log
    assert backend.read_logs(run_id, len(log)) == b""
    assert backend.read_logs(run_id, 2, limit=3) == log[2:5]
    metrics = backend.read_metrics(run_id, 0)
    assert [(m["seq"], m["name"], m["value"], m["step"]) for m in metrics] == [
        (0, "loss", 0.5, 1),
        (1, "loss", 0.25, 2),
        (2, "accuracy", 0.9, None),
    ]
    assert metrics[0]["at"].endswith("Z")
    assert backend.read_metrics(run_id, 2) == metrics[2:]
    assert backend.read_metrics(run_id, 3) == []
    outputs = backend.outputs(run_id)
    assert [(o.path, o.size) for o in outputs] == [("model/weights.bin", 9), ("report.txt", 12)]
    assert outputs[0].sha256 == hashlib.sha256(b"\x00\x01weights").hexdigest()
    assert outputs[1].local_path.read_bytes() == b"A,B\n1,2\n3,4\n"
    assert outputs[1].sha256 == hashlib.sha256(b"A,B\n1,2\n3,4\n").hexdigest()


PROBE = r"""
import errno, json, os, socket, sys
result = {"uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(),
          "home": os.environ["HOME"], "tmpdir": os.environ["TMPDIR"]}
def attempt(key, action):
    try:
        action()
        result[key] = "ok"
    except OSError as exc:
        result[key] = errno.errorcode.get(exc.errno, str(exc))
for path in ["/usr/planted", "/planted", "/code/planted", "/inputs/train/planted",
             "/inputs/planted", "/home/animus/planted", "/scratch/planted",
             "/output/planted", "/run/secrets/planted"]:
    attempt("write " + path, lambda: open(path, "w").write("x"))
attempt("read input", lambda: open("/inputs/train/data/rows.csv").read())
port = int(sys.argv[1])
attempt("connect host loopback", lambda: socket.create_connection(("127.0.0.1", port), 2))
attempt("connect external", lambda: socket.create_connection(("8.8.8.8", 53), 2))
status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines())
result["cap_eff"] = status["CapEff"].strip()
result["no_new_privs"] = status["NoNewPrivs"].strip()
result["seccomp"] = status["Seccomp"].strip()
print(json.dumps(result))
"""


def test_run_is_sandboxed_non_root_read_only_without_network(make_backend, prepare) -> None:
    backend: RuncBackend = make_backend()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        snapshot, workspace = prepare(["python3", "-c", PROBE, str(port)])
        backend.start(snapshot, workspace)
        status = wait_finished(backend, snapshot["run_id"])
    log = backend.read_logs(snapshot["run_id"], 0)
    assert status.state == "succeeded", log
    probe = json.loads(log)
    assert probe["uid"] != 0 and probe["gid"] != 0
    assert (probe["cwd"], probe["home"], probe["tmpdir"]) == ("/code", "/scratch", "/scratch")
    denied = {"EROFS", "EACCES", "EPERM"}
    for path in ["/usr", "", "/code", "/inputs/train", "/inputs", "/home/animus"]:
        assert probe[f"write {path}/planted"] in denied, path
    for path in ["/scratch", "/output"]:
        assert probe[f"write {path}/planted"] == "ok", path
    assert probe["read input"] == "ok"
    assert probe["connect host loopback"] != "ok"
    assert probe["connect external"] != "ok"
    assert probe["cap_eff"] == "0000000000000000"
    assert probe["no_new_privs"] == "1"
    assert probe["seccomp"] == "2"
    assert not (workspace.inputs_dir / "train" / "planted").exists()
    assert not (workspace.code_dir / "planted").exists()


def test_nonzero_exit_fails(make_backend, prepare) -> None:
    backend: RuncBackend = make_backend()
    snapshot, workspace = prepare(["python3", "-c", "import sys; print('bye'); sys.exit(3)"])
    backend.start(snapshot, workspace)
    status = wait_finished(backend, snapshot["run_id"])
    assert (status.state, status.exit_code, status.reason) == ("failed", 3, "nonzero_exit")
    assert backend.read_logs(snapshot["run_id"], 0) == b"bye\n"


def test_unknown_command_fails_to_start(make_backend, prepare) -> None:
    backend: RuncBackend = make_backend()
    snapshot, workspace = prepare(["no-such-program"])
    backend.start(snapshot, workspace)
    status = wait_finished(backend, snapshot["run_id"])
    assert (status.state, status.exit_code, status.reason) == ("failed", 127, "start_failed")
    assert b"cannot start 'no-such-program'" in backend.read_logs(snapshot["run_id"], 0)


def test_exceeding_memory_fails_with_oom(make_backend, prepare) -> None:
    backend: RuncBackend = make_backend()
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))"
    snapshot, workspace = prepare(["python3", "-c", hog], resources={"memory_mb": 64})
    backend.start(snapshot, workspace)
    status = wait_finished(backend, snapshot["run_id"])
    assert (status.state, status.reason) == ("failed", "oom")
    assert status.exit_code == 137


def test_exceeding_the_timeout_fails_with_timeout(make_backend, prepare) -> None:
    backend: RuncBackend = make_backend()
    command = ["python3", "-c", "import time; print('start', flush=True); time.sleep(60)"]
    snapshot, workspace = prepare(command, resources={"timeout_seconds": 1})
    backend.start(snapshot, workspace)
    status = wait_finished(backend, snapshot["run_id"], seconds=20)
    assert (status.state, status.reason) == ("failed", "timeout")
    assert backend.read_logs(snapshot["run_id"], 0) == b"start\n"


def test_cancel_stops_the_container(make_backend, prepare) -> None:
    backend: RuncBackend = make_backend()
    snapshot, workspace = prepare(["python3", "-c", "import time; time.sleep(60)"])
    run_id = snapshot["run_id"]
    backend.start(snapshot, workspace)
    assert backend.status(run_id).state == "running"

    backend.cancel(run_id)

    status = backend.status(run_id)
    assert (status.state, status.reason) == ("canceled", "canceled")
    assert status.finished_at is not None
    assert backend._container_state(run_id) is None
    backend.cancel(run_id)  # idempotent
    assert backend.status(run_id) == status


AGENT_THAT_DIES = r"""
import json, os, signal, sys
from pathlib import Path
from appliance.execution.backend import Workspace
from appliance.execution.runc_backend import RuncBackend
from appliance.images.registry import RegistryClient

job = json.load(sys.stdin)
workspace = Workspace(**{k: Path(v) for k, v in job["workspace"].items()})
backend = RuncBackend(Path(job["root"]), RegistryClient(job["registry"]), cache=Path(job["cache"]))
backend.start(job["snapshot"], workspace)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_status_survives_a_killed_agent_and_a_new_backend(
    make_backend, prepare, registry_client, image_cache
) -> None:
    first: RuncBackend = make_backend()
    command = ["python3", "-c", "import time; time.sleep(1.5); print('done')"]
    snapshot, workspace = prepare(command)
    run_id = snapshot["run_id"]
    job = {
        "workspace": {k: str(v) for k, v in vars(workspace).items() if k != "secrets"},
        "root": str(first.root),
        "registry": registry_client.registry,
        "cache": str(image_cache),
        "snapshot": snapshot,
    }
    agent = subprocess.run(
        [sys.executable, "-c", AGENT_THAT_DIES],
        input=json.dumps(job),
        text=True,
        capture_output=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert agent.returncode == -signal.SIGKILL, agent.stderr

    restarted: RuncBackend = make_backend()
    assert restarted.recover() == [run_id]
    assert restarted.status(run_id).state == "running"
    status = wait_finished(restarted, run_id)
    assert (status.state, status.exit_code) == ("succeeded", 0)
    assert restarted.read_logs(run_id, 0) == b"done\n"

    again: RuncBackend = make_backend()
    assert again.recover() == [run_id]
    assert again.status(run_id) == status
    again.cleanup(run_id)
    assert again.recover() == []
    assert again.status(run_id) is None
    assert not workspace.state_dir.exists() and not workspace.scratch_dir.exists()


def test_a_tampered_input_is_refused_before_start(make_backend, prepare) -> None:
    backend: RuncBackend = make_backend()
    snapshot, workspace = prepare(["python3", "-c", "print('never')"])
    (workspace.inputs_dir / "train" / "data" / "rows.csv").write_bytes(b"a,b\n1,2\n3,5\n")
    with pytest.raises(ExecutionRefused) as refused:
        backend.start(snapshot, workspace)
    assert refused.value.details["reason"] == "input_digest_mismatch"
    assert refused.value.details["path"] == "data/rows.csv"
    assert backend.recover() == []
    assert backend.status(snapshot["run_id"]) is None


def test_a_checkout_at_an_unknown_or_other_commit_is_refused(
    make_backend, prepare, code_repo, tmp_path
) -> None:
    repo_url, sha = code_repo
    with pytest.raises(ExecutionRefused) as unknown:
        checkout_code(repo_url, "1" * 40, tmp_path / "unknown")
    assert unknown.value.details["reason"] == "commit_unknown"
    with pytest.raises(ExecutionRefused):
        checkout_code(repo_url, "main", tmp_path / "branch")

    backend: RuncBackend = make_backend()
    snapshot, workspace = prepare(["python3", "-c", "print('never')"])
    snapshot["code"]["commit_sha"] = "2" * 40
    with pytest.raises(ExecutionRefused) as other:
        backend.start(snapshot, workspace)
    assert other.value.details["reason"] == "commit_mismatch"
    assert backend.recover() == []


def test_egress_is_refused_unless_host_network_is_allowed(make_backend, prepare) -> None:
    backend: RuncBackend = make_backend()
    snapshot, workspace = prepare(["python3", "-c", "print('never')"], egress=["10.0.0.0/8"])
    with pytest.raises(ExecutionRefused) as refused:
        backend.start(snapshot, workspace)
    assert refused.value.details["reason"] == "egress_not_allowed"
    assert backend.recover() == []


SECRET_USER = r"""
import hashlib, os, sys, time
value = open("/run/secrets/DB_PASSWORD").read()
print("sha256", hashlib.sha256(value.encode()).hexdigest())
print("in env:", any(value in v for v in os.environ.values()))
print("mode:", oct(os.stat("/run/secrets/DB_PASSWORD").st_mode & 0o777))
sys.stdout.write("leak " + value[:5])
sys.stdout.flush()
time.sleep(0.2)
sys.stdout.write(value[5:] + " end\n")
"""


def test_a_secret_reaches_only_its_container_and_nothing_on_disk(
    make_backend, prepare, tmp_path
) -> None:
    secret = "s3cr3t-" + uuid.uuid4().hex
    backend: RuncBackend = make_backend()
    snapshot, workspace = prepare(["python3", "-c", SECRET_USER], secrets={"DB_PASSWORD": secret})
    assert secret not in repr(workspace)
    backend.start(snapshot, workspace)
    run_id = snapshot["run_id"]
    status = wait_finished(backend, run_id)
    log = backend.read_logs(run_id, 0).decode()
    assert status.state == "succeeded", log
    assert f"sha256 {hashlib.sha256(secret.encode()).hexdigest()}" in log
    assert "in env: False" in log
    assert "mode: 0o400" in log
    assert "leak [REDACTED] end" in log

    def files_holding(data: bytes) -> list[Path]:
        return [
            path
            for path in tmp_path.rglob("*")
            if path.is_file() and not path.is_symlink() and data in path.read_bytes()
        ]

    assert files_holding(secret.encode()) == []  # not in config.json, runc state or the log
    backend.cleanup(run_id)
    assert files_holding(secret.encode()) == []
