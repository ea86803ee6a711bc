"""Benchmark: `animus image push` against `skopeo copy` of the same OCI layouts.

Builds the runner and control-plane images (from their committed locks, through the package
cache), then for several rounds pushes each layout to a fresh docker-registry on loopback with
our pusher and with skopeo, alternating which goes first. Prints each image's compressed size
and the median MB/s of both, and their ratio (target: ours at least as fast as skopeo).

Run: python tests/bench/bench_image_push.py [--rounds N] [--keep DIR]
The machine is shared and noisy; compare the ratio measured in one run, not absolute figures.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from appliance.images.build import build_image  # noqa: E402
from appliance.images.definition import load_definition  # noqa: E402
from appliance.images.layout import Layout  # noqa: E402
from appliance.images.registry import RegistryClient, push_image  # noqa: E402
from appliance.images.registry_server import RegistrySettings, start_registry  # noqa: E402

IMAGES = ("runner", "control-plane")


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed_push_ours(layout: Layout, state: Path) -> float:
    """Seconds our pusher takes into a fresh registry."""
    settings = RegistrySettings(state_dir=state, listen=f"127.0.0.1:{free_port()}")
    with start_registry(settings) as registry:
        client = RegistryClient(registry.address)
        image = layout.image()
        start = time.perf_counter()
        push_image(layout, image, client, "bench/image", tag="latest")
        return time.perf_counter() - start


def timed_push_skopeo(layout: Layout, ref_name: str, state: Path) -> float:
    """Seconds `skopeo copy oci:… docker://…` takes into a fresh registry."""
    settings = RegistrySettings(state_dir=state, listen=f"127.0.0.1:{free_port()}")
    with start_registry(settings) as registry:
        start = time.perf_counter()
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                f"oci:{layout.root}:{ref_name}",
                f"docker://{registry.address}/bench/image:latest",
            ],
            check=True,
        )
        return time.perf_counter() - start


def main() -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="Build layouts here and keep them.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="animus-bench-"))
    layouts_dir = args.keep or work / "layouts"
    try:
        layouts = {}
        for name in IMAGES:
            built = build_image(load_definition(REPO_ROOT / "images" / name), layouts_dir / name)
            layouts[name] = (Layout(built.layout), built.compressed_size)

        print(f"{'image':<15}{'compressed':>12}{'ours MB/s':>12}{'skopeo MB/s':>13}{'ratio':>8}")
        for name, (layout, size) in layouts.items():
            total = sum(blob["size"] for blob in layout.image().blobs)
            ours, theirs = [], []
            for round_no in range(args.rounds):
                order = ["ours", "skopeo"] if round_no % 2 == 0 else ["skopeo", "ours"]
                for who in order:
                    state = work / f"{name}-{who}-{round_no}"
                    if who == "ours":
                        ours.append(timed_push_ours(layout, state))
                    else:
                        theirs.append(timed_push_skopeo(layout, name, state))
                    shutil.rmtree(state, ignore_errors=True)
            mb = total / 1e6
            ours_rate = mb / statistics.median(ours)
            theirs_rate = mb / statistics.median(theirs)
            print(
                f"{name:<15}{size / 1e6:>9.1f} MB{ours_rate:>12.1f}{theirs_rate:>13.1f}"
                f"{ours_rate / theirs_rate:>7.2f}x"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
