"""Real parts for execution tests: the runner image in the session registry (../conftest.py),
a git repository of user code, workspaces, and a runc backend on a temporary root."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.execution.backend import RunStatus, Workspace, checkout_code
from appliance.execution.runc_backend import RuncBackend
from appliance.images.registry import RegistryClient

TRAIN = r"""
import json, os, sys
import animus_run

rows = open(os.path.join(os.environ["ANIMUS_INPUTS_DIR"], "train", "data/rows.csv")).read()
print("rows:", len(rows.splitlines()))
print("to stderr", file=sys.stderr)
animus_run.log_metric("loss", 0.5, step=1)
with open(os.environ["ANIMUS_METRICS_FILE"], "a") as metrics:
    metrics.write(json.dumps({"name": "loss", "value": 0.25, "step": 2}) + "\n")
    metrics.write("not json\n")
animus_run.log_metric("accuracy", 0.9)
out = os.environ["ANIMUS_OUTPUT_DIR"]
os.makedirs(os.path.join(out, "model"), exist_ok=True)
with open(os.path.join(out, "model", "weights.bin"), "wb") as handle:
    handle.write(b"\x00\x01weights")
with open(os.path.join(out, "report.txt"), "w") as handle:
    handle.write(rows.upper())
os.symlink("/etc/passwd", os.path.join(out, "link"))
"""


def _git(*args: str, cwd: Path) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    return subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture(scope="session")
def code_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A bare repository holding train.py: (file:// URL, commit SHA)."""
    base = tmp_path_factory.mktemp("code")
    work = base / "work"
    work.mkdir()
    (work / "train.py").write_text(TRAIN)
    (work / "sub").mkdir()
    (work / "sub" / "hello.py").write_text("print('hello from sub')\n")
    _git("init", "-q", "-b", "main", cwd=work)
    _git("add", ".", cwd=work)
    _git("commit", "-q", "-m", "train", cwd=work)
    sha = _git("rev-parse", "HEAD", cwd=work)
    _git("clone", "-q", "--bare", str(work), str(base / "repo.git"), cwd=base)
    return f"file://{base / 'repo.git'}", sha


@pytest.fixture(scope="session")
def image_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pull and unpack of the runner for the whole session."""
    return tmp_path_factory.mktemp("image-cache")


@pytest.fixture
def make_backend(
    tmp_path: Path, registry_client: RegistryClient, image_cache: Path
) -> Callable[..., RuncBackend]:
    """A RuncBackend on this test's root; calling again gives a fresh object on the same
    root, which is what a restarted Data Plane agent has."""
    created: list[RuncBackend] = []

    def make(**options: Any) -> RuncBackend:
        options.setdefault("kill_grace_seconds", 1.0)
        backend = RuncBackend(tmp_path / "backend", registry_client, cache=image_cache, **options)
        created.append(backend)
        return backend

    yield make
    if created:
        for run_id in created[-1].recover():
            created[-1].cleanup(run_id)


INPUT_ROWS = b"a,b\n1,2\n3,4\n"


@pytest.fixture
def prepare(
    tmp_path: Path, pushed_runner: str, code_repo: tuple[str, str]
) -> Callable[..., tuple[dict[str, Any], Workspace]]:
    """A snapshot running COMMAND on the runner image, and its prepared workspace (inputs
    fetched, code checked out) as the Data Plane agent would hand them to a backend."""

    def make(
        command: list[str],
        *,
        resources: dict[str, Any] | None = None,
        secrets: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        egress: list[str] | None = None,
    ) -> tuple[dict[str, Any], Workspace]:
        run_id = "run_" + uuid.uuid4().hex[:12]
        repo_url, sha = code_repo
        workspace = Workspace.create(tmp_path / "work" / run_id, secrets)
        data = workspace.inputs_dir / "train" / "data" / "rows.csv"
        data.parent.mkdir(parents=True)
        data.write_bytes(INPUT_ROWS)
        checkout_code(repo_url, sha, workspace.code_dir)
        snapshot = {
            "run_id": run_id,
            "project_id": "prj_test",
            "image": pushed_runner,
            "command": command,
            "env": env or {},
            "resources": {
                "cpu": 1,
                "memory_mb": 256,
                "pids": 128,
                "timeout_seconds": 60,
                **(resources or {}),
            },
            "network": {"egress": egress or []},
            "inputs": [
                {
                    "name": "train",
                    "dataset_version_id": "dsv_test",
                    "digest": "sha256:" + "0" * 64,
                    "files": [
                        {
                            "path": "data/rows.csv",
                            "sha256": hashlib.sha256(INPUT_ROWS).hexdigest(),
                            "size": len(INPUT_ROWS),
                        }
                    ],
                }
            ],
            "code": {"repo_url": repo_url, "commit_sha": sha, "path": ""},
            "secrets": sorted(secrets or {}),
        }
        return snapshot, workspace

    return make


def wait_finished(backend: RuncBackend, run_id: str, seconds: float = 60) -> RunStatus:
    """Poll the backend until the run reaches a final state."""
    deadline = time.monotonic() + seconds
    while True:
        status = backend.status(run_id)
        assert status is not None
        if status.finished:
            return status
        assert time.monotonic() < deadline, f"run still {status.state} after {seconds} s"
        time.sleep(0.05)
