"""Bundle verification speed, in one run over the same generated bundle.

Prints: bundle/verify.py on the unpacked bundle (signature + every file's size and
SHA-256, parallel threads), ``sha256sum -c`` over the same files, and the machine's limit:
cores × single-core ``hashlib.sha256`` speed on data in memory. Files are read once before
timing so every contender hashes from the page cache (the limit is the CPU, not the disk).

    .venv/bin/python tests/bench/bench_bundle_verify.py [--size-mib 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance.bundle.manifest import hash_tree, render_manifest
from appliance.bundle.signing import sign_detached

ROOT = Path(__file__).resolve().parents[2]
VERIFY = ROOT / "bundle" / "verify.py"


def _generate(root: Path, total: int) -> None:
    """A bundle-like mix: a few large image layers, many mid-size wheels, small docs."""
    block = os.urandom(1 << 20)
    sizes = [total // 8] * 4  # half of the bytes in four large layers
    rest = total - sum(sizes)
    sizes += [rest // 200] * 200  # wheels
    for index, size in enumerate(sizes):
        folder = "images/blobs" if index < 4 else "offline-wheels"
        path = root / folder / f"file-{index:04d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as out:
            header = index.to_bytes(8, "big")  # each file differs
            out.write(header)
            left = size - len(header)
            while left > 0:
                out.write(block[: min(left, len(block))])
                left -= len(block)
    docs = root / "docs"
    docs.mkdir()
    for index in range(300):
        (docs / f"page-{index}.md").write_bytes(os.urandom(4096))


def _single_core_sha256() -> float:
    data = os.urandom(64 << 20)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        hashlib.sha256(data).digest()
        best = max(best, len(data) / (time.perf_counter() - start))
    return best


def _gpg_key(home: Path) -> str:
    gpg = ["gpg", "--batch", "--homedir", str(home)]
    subprocess.run(
        [*gpg, "--passphrase", "", "--quick-gen-key", "Bench <bench@example.test>", "ed25519"],
        check=True,
        capture_output=True,
    )
    out = subprocess.run(
        [*gpg, "--with-colons", "--list-secret-keys"], check=True, capture_output=True, text=True
    ).stdout
    return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr"))


def _timed(command: list[str], env: dict, cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    """Generate the bundle, time the contenders, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="animus-bench-"))
    home = work / "gnupg"
    home.mkdir(mode=0o700)
    try:
        fingerprint = _gpg_key(home)
        root = work / "bundle"
        root.mkdir()
        print(f"generating {args.size_mib} MiB of bundle files …", file=sys.stderr)
        _generate(root, args.size_mib << 20)
        entries = hash_tree(root)  # also warms the page cache
        total = sum(e.size for e in entries)
        now = dt.datetime.now(dt.UTC)
        manifest = render_manifest(
            version="1.0.0",
            created=now,
            expires=now + dt.timedelta(days=1),
            min_upgrade_from=None,
            files=entries,
            images=[],
            sbom=None,
        )
        (root / "MANIFEST.json").write_bytes(manifest)
        sign_detached(
            root / "MANIFEST.json", root / "MANIFEST.json.asc", fingerprint, armor=True,
            gnupghome=home,
        )  # fmt: skip
        sums = work / "SHA256SUMS"
        sums.write_text("".join(f"{e.sha256}  {e.path}\n" for e in entries))
        env = {**os.environ, "GNUPGHOME": str(home)}
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(_timed([sys.executable, str(VERIFY), str(root), "--quiet"], env, root))
            theirs.append(_timed(["sha256sum", "--quiet", "-c", str(sums)], env, root))
        per_core = _single_core_sha256()
        cores = os.cpu_count() or 1
        limit = per_core * cores
        mib = 1 << 20
        ours_speed, theirs_speed = total / min(ours), total / min(theirs)
        print(f"bundle: {len(entries)} files, {total / mib:.0f} MiB (page cache), {cores} cores")
        print(f"verify.py (parallel):  {ours_speed / mib:7.0f} MiB/s  best of {args.rounds}")
        print(f"sha256sum -c:          {theirs_speed / mib:7.0f} MiB/s  best of {args.rounds}")
        print(
            f"machine limit:         {limit / mib:7.0f} MiB/s  "
            f"({cores} × {per_core / mib:.0f} MiB/s single-core hashlib.sha256)"
        )
        print(f"verify.py / sha256sum -c:  {ours_speed / theirs_speed:.2f}×")
        print(f"verify.py / machine limit: {100 * ours_speed / limit:.0f} %")
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
