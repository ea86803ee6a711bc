"""Benchmark: time from a Run being ``queued`` to its user process starting, through the whole
appliance, beside a bare ``runc run`` of the same root filesystem measured in the same run.

The appliance runs as on a single host: ``animus serve``, ``animus scheduler`` and
``animus dataplane --backend runc`` as separate processes, the runner image in a
docker-registry on loopback. Each round creates a Run whose command prints ``time.time()``
as its first act; the figure is that stamp minus the Run's ``queued_at``. Covered: the
scheduler planning it (policy snapshot, execution snapshot), the agent's lease, input
download and verification, the checkout at the commit, image resolution, ``runc run``, and
the run agent starting the command.

Prints the medians and the difference (target: at most 300 ms added at the median).
Needs root, runc, docker-registry. Run: python tests/bench/bench_queue_to_start.py [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from appliance.images.build import build_image  # noqa: E402
from appliance.images.definition import load_definition  # noqa: E402
from appliance.images.layout import Layout  # noqa: E402
from appliance.images.registry import RegistryClient, push_image  # noqa: E402
from appliance.images.registry_server import RegistrySettings, start_registry  # noqa: E402
from appliance.images.unpack import pull_and_unpack  # noqa: E402
from tests.bench.bench_run_start import STAMP, bare_round, free_port, make_repo  # noqa: E402
from tests.integration.execution.test_governed_runs import Appliance, tar_of  # noqa: E402


def seconds(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="animus-bench-queue-"))
    settings = RegistrySettings(state_dir=work / "registry", listen=f"127.0.0.1:{free_port()}")
    built = build_image(load_definition(REPO_ROOT / "images" / "runner"), work / "layout")
    layout = Layout(built.layout)
    with start_registry(settings) as registry:
        client = RegistryClient(registry.address)
        reference = push_image(layout, layout.image(), client, "animus/runner").reference
        image, rootfs = pull_and_unpack(reference, client, cache=work / "cache")
        box = Appliance(work, registry.address)
        box.env["ANIMUS_CACHE_DIR"] = str(work / "cache")
        box.animus("db", "upgrade")
        box.animus("admin", "create-user", "bench")
        token = box.animus("token", "create", "--user", "bench")
        box.env["ANIMUS_DATAPLANE_TOKEN"] = box.animus("dataplane", "register", "bench-host")
        box.start("serve", "serve", "--port", str(box.port), "--no-upgrade")
        box.start("scheduler", "scheduler")
        box.start("dataplane", "dataplane", "--capacity", "1")
        try:
            api = requests.Session()
            api.headers["Authorization"] = f"Bearer {token}"
            for _ in range(100):
                try:
                    if requests.get(box.url + "/readyz", timeout=1).status_code == 200:
                        break
                except requests.ConnectionError:
                    time.sleep(0.1)
            url = box.url + "/api/v1/projects"
            pid = api.post(url, json={"name": "bench"}).json()["id"]
            ds = api.post(f"{url}/{pid}/datasets", json={"name": "d"}).json()
            version = api.post(
                f"{url}/{pid}/datasets/{ds['id']}/versions",
                data=tar_of({"rows.csv": b"x,y\n" + b"1,2\n" * 1000}),
                headers={"Content-Type": "application/x-tar"},
            ).json()
            repo_url, sha = make_repo(work)
            code = api.post(
                f"{url}/{pid}/code-refs", json={"repo_url": repo_url, "commit_sha": sha}
            ).json()
            env = api.post(
                f"{url}/{pid}/environments",
                json={"name": "runner", "base_image": "runner", "packages": []},
            ).json()
            lock = api.post(
                f"{url}/{pid}/environment-locks",
                json={
                    "environment_id": env["id"],
                    "image_digest": reference.split("@")[1],
                    "packages": [],
                },
            ).json()
            spec = {
                "production": True,
                "code_ref_id": code["id"],
                "environment_lock_id": lock["id"],
                "command": ["python3", "-c", STAMP],
                "inputs": [{"name": "data", "dataset_version_id": version["id"]}],
            }
            runs_dir = work / "bare"
            runs_dir.mkdir()
            ours, bare = [], []
            for round_no in range(args.rounds + 1):
                if round_no % 2:
                    bare.append(bare_round(image.config, rootfs, runs_dir))
                run = api.post(f"{url}/{pid}/runs", json=spec).json()
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    text = api.get(f"{url}/{pid}/runs/{run['id']}/logs").text
                    if text.endswith("\n"):
                        break
                    time.sleep(0.05)  # reading the log does not move the stamp
                stamp = float(text.split()[0])
                if round_no:  # the first round warms the image cache
                    ours.append(stamp - seconds(run["queued_at"]))
                if not round_no % 2:
                    bare.append(bare_round(image.config, rootfs, runs_dir))
        finally:
            box.stop()

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:7.1f} ms"

    print(f"rounds: {args.rounds}")
    print(f"bare runc run → user process:        {ms(bare)}")
    print(f"queued → user process (appliance):   {ms(ours)}")
    added = (statistics.median(ours) - statistics.median(bare)) * 1000
    print(f"added by the appliance (median):     {added:7.1f} ms  (target ≤ 300 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
