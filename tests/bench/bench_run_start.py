"""Benchmark: time from ``RuncBackend.start()`` to the user's process running, beside a bare
``runc run`` of the same root filesystem.

Builds the runner image (from its committed lock, through the package cache), pushes it to a
docker-registry on loopback, then for several rounds, alternating which goes first:

- backend: ``start()`` of a snapshot whose command prints ``time.time()`` as its first act
  (inputs verified, code checkout verified, image resolved through the registry, bundle
  written, ``runc run --detach``, the run agent starting the command);
- bare: ``runc run`` of the same cached root filesystem with the sandbox config of
  ``appliance.images.runtime`` and the same command, no agent.

Prints the medians and the difference (target: the backend adds at most 300 ms at the
median), and how long ``start()`` itself blocks. Needs root, runc, docker-registry.

Run: python tests/bench/bench_run_start.py [--rounds N]
The machine is shared and noisy; compare the figures measured in one run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from appliance.execution.backend import Workspace, checkout_code  # noqa: E402
from appliance.execution.runc_backend import RuncBackend  # noqa: E402
from appliance.images.build import build_image  # noqa: E402
from appliance.images.definition import load_definition  # noqa: E402
from appliance.images.layout import Layout  # noqa: E402
from appliance.images.registry import RegistryClient, push_image  # noqa: E402
from appliance.images.registry_server import RegistrySettings, start_registry  # noqa: E402
from appliance.images.runtime import runtime_config, write_bundle  # noqa: E402
from appliance.images.unpack import pull_and_unpack  # noqa: E402

STAMP = "import time; print(repr(time.time()), flush=True)"
INPUT = b"x,y\n" + b"1,2\n" * 1000


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_repo(base: Path) -> tuple[str, str]:
    """A bare git repository with one commit: (file:// URL, SHA)."""
    work = base / "src"
    work.mkdir()
    (work / "README").write_text("bench\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.com"}
    env |= {"GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.com"}
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "bench"]):
        subprocess.run(["git", *args], cwd=work, env=env, check=True)
    sha = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=work, check=True, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(base / "repo.git")], check=True)
    return f"file://{base / 'repo.git'}", sha


def backend_round(backend: RuncBackend, reference: str, repo: tuple[str, str], work: Path):
    """(seconds from start() to the user's stamp, seconds start() blocked)."""
    run_id = "run_" + uuid.uuid4().hex[:12]
    workspace = Workspace.create(work / run_id)
    (workspace.inputs_dir / "data").mkdir()
    (workspace.inputs_dir / "data" / "rows.csv").write_bytes(INPUT)
    checkout_code(repo[0], repo[1], workspace.code_dir)
    snapshot = {
        "run_id": run_id,
        "image": reference,
        "command": ["python3", "-c", STAMP],
        "env": {},
        "resources": {"cpu": 1, "memory_mb": 512, "pids": 128, "timeout_seconds": 60},
        "network": {"egress": []},
        "inputs": [
            {
                "name": "data",
                "files": [{"path": "rows.csv", "sha256": hashlib.sha256(INPUT).hexdigest()}],
            }
        ],
        "code": {"repo_url": repo[0], "commit_sha": repo[1], "path": ""},
        "secrets": [],
    }
    began = time.time()
    backend.start(snapshot, workspace)
    returned = time.time()
    while not (line := backend.read_logs(run_id, 0)).endswith(b"\n"):
        time.sleep(0.002)
    while not backend.status(run_id).finished:
        time.sleep(0.01)
    backend.cleanup(run_id)
    shutil.rmtree(workspace.root)
    return float(line) - began, returned - began


def bare_round(image_config: dict, rootfs: Path, work: Path) -> float:
    """Seconds from ``runc run`` to the user's stamp, same rootfs and sandbox, no agent."""
    name = "bare-" + uuid.uuid4().hex[:12]
    scratch = work / name / "scratch"
    scratch.mkdir(parents=True)
    config = runtime_config(image_config, rootfs, args=["-c", STAMP], scratch=scratch)
    write_bundle(work / name / "bundle", config)
    began = time.time()
    result = subprocess.run(
        [
            "runc",
            "--root",
            str(work / "runc-bare"),
            "run",
            "--bundle",
            str(work / name / "bundle"),
            name,
        ],
        capture_output=True,
        check=True,
    )
    subprocess.run(
        ["runc", "--root", str(work / "runc-bare"), "delete", "--force", name], check=False
    )
    shutil.rmtree(work / name)
    return float(result.stdout) - began


def main() -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="animus-bench-run-"))
    settings = RegistrySettings(state_dir=work / "registry", listen=f"127.0.0.1:{free_port()}")
    try:
        built = build_image(load_definition(REPO_ROOT / "images" / "runner"), work / "layout")
        layout = Layout(built.layout)
        with start_registry(settings) as registry:
            client = RegistryClient(registry.address)
            reference = push_image(layout, layout.image(), client, "bench/runner").reference
            cache = work / "cache"
            image, rootfs = pull_and_unpack(reference, client, cache=cache)
            backend = RuncBackend(work / "backend", client, cache=cache)
            repo = make_repo(work)
            runs = work / "runs"
            runs.mkdir()
            backend_round(backend, reference, repo, runs)  # warm caches
            bare_round(image.config, rootfs, runs)
            ours, blocked, bare = [], [], []
            for round_no in range(args.rounds):
                if round_no % 2:
                    bare.append(bare_round(image.config, rootfs, runs))
                started, returned = backend_round(backend, reference, repo, runs)
                ours.append(started)
                blocked.append(returned)
                if not round_no % 2:
                    bare.append(bare_round(image.config, rootfs, runs))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:7.1f} ms"

    print(f"rounds: {args.rounds}")
    print(f"bare runc run → user process:        {ms(bare)}")
    print(f"backend.start() → user process:      {ms(ours)}")
    print(f"backend.start() blocks for:           {ms(blocked)}")
    added = (statistics.median(ours) - statistics.median(bare)) * 1000
    print(f"added by the backend (median):        {added:7.1f} ms  (target ≤ 300 ms)")
    return 0 if added <= 300 else 1


if __name__ == "__main__":
    sys.exit(main())
