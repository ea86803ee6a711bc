"""Time from `./install.sh --bundle` start to `/readyz` on the embedded default (target < 60 s).

Builds a real bundle (wheels from the committed lock, every image bundle.toml lists; with
``--runner-only`` just the runner image, quicker to build) with a throwaway GPG key, then installs it into a fresh prefix inside a network namespace with only a loopback
interface, as a sysadmin would on a host with no network. A poller inside the namespace
notes the first 200 from /readyz. Prints each install step's start (install.sh's own
``[Ns]`` marks), the time to the first ready answer, and install.sh's total; then stops the
services and deletes the namespace.

    .venv/bin/python tests/bench/bench_install.py [--rounds 1] [--keep DIR] [--runner-only]

Needs root (network namespaces, runc). Building the bundle is not timed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from appliance.bundle.build import build_bundle  # noqa: E402
from tests.integration.bundle.conftest import generate_signer  # noqa: E402
from tests.integration.install.test_offline_install import Namespace  # noqa: E402

POLLER = """
import sys, time, urllib.request
start = float(sys.argv[1])
while True:
    try:
        if urllib.request.urlopen("http://127.0.0.1:8080/readyz", timeout=1).status == 200:
            print(f"{time.time() - start:.2f}", flush=True)
            break
    except Exception:
        pass
    time.sleep(0.1)
"""


def install_once(ns: Namespace, bundle: Path, fingerprint: str, home: Path, prefix: Path) -> dict:
    started = time.time()
    poller = subprocess.Popen(
        ns.command(sys.executable, "-c", POLLER, str(started)),
        stdout=subprocess.PIPE,
        text=True,
    )
    proc = subprocess.run(
        [
            *ns.command(
                ROOT / "install.sh", "--bundle", bundle, "--trust-fingerprint", fingerprint
            ),
            "--prefix",
            str(prefix),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "GNUPGHOME": str(home)},
        check=False,
    )
    total = time.time() - started
    if proc.returncode != 0:
        poller.kill()
        sys.exit(f"install.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    try:
        ready = float(poller.communicate(timeout=60)[0].strip())
    finally:
        poller.kill()
    steps = re.findall(r"install\.sh: \[(\d+)s\] (.+)", proc.stderr)
    return {"total": total, "ready": ready, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="fresh installs to time")
    parser.add_argument("--keep", type=Path, help="build the bundle here and keep it")
    parser.add_argument(
        "--runner-only",
        action="store_true",
        help="bundle only the runner image (quicker to build; the registry role pushes less)",
    )
    args = parser.parse_args()
    run(args.rounds, args.keep, ("runner",) if args.runner_only else None)


def run(rounds: int = 1, keep: Path | None = None, images: tuple[str, ...] | None = None) -> None:
    """Build a bundle with IMAGES (None: all), install it ROUNDS times into fresh prefixes,
    print the times."""
    work = Path(tempfile.mkdtemp(prefix="animus-bench-"))
    key = generate_signer(work / "gpg", "Animus Bench <bench@example.test>")
    out = keep or work / "out"
    print("building the bundle (not timed) …", flush=True)
    started = time.perf_counter()
    built = build_bundle("1.0.0", key.fingerprint, out, images=images, gnupghome=key.home)
    print(
        f"bundle {built.tar} {built.size / (1 << 20):.0f} MiB, built in "
        f"{time.perf_counter() - started:.0f} s",
        flush=True,
    )
    try:
        for round_number in range(1, rounds + 1):
            ns = Namespace()
            prefix = work / f"prefix-{round_number}"
            try:
                result = install_once(ns, built.tar, key.fingerprint, key.home, prefix)
            finally:
                if (prefix / "bin" / "animusctl").exists():
                    ns.run(prefix / "bin" / "animusctl", "stop")
                ns.delete()
            print(f"round {round_number}:")
            for second, step in result["steps"]:
                print(f"  [{second:>3}s] {step[:100]}")
            print(
                f"  install.sh start → first /readyz 200: {result['ready']:.1f} s (target < 60 s: "
                f"{'met' if result['ready'] < 60 else 'NOT met'})"
            )
            print(f"  install.sh start → install.sh done:   {result['total']:.1f} s")
    finally:
        subprocess.run(["gpgconf", "--homedir", str(key.home), "--kill", "all"], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
