"""Bundle verification speed, in one run over the same generated bundle.

Prints: bundle/verify.py on the unpacked bundle (signature + every file's size and
SHA-256, parallel threads; the whole process, from interpreter start to exit), ``sha256sum
-c`` over the same files, and the machine's limit: cores × single-core ``hashlib.sha256``
speed, measured in the same run on a buffer of the verifier's read size. The page cache is
warm for every contender (each reads the files once before timing), so the limit is the CPU,
not the disk. The rounds alternate between the contenders, and the limit is measured in each
round, so a busy machine slows all of them alike; figures are the best round of each. On a
shared, busy machine the CPU-time line is the steadier one: CPU seconds verify.py used
against CPU seconds hashing the same bytes takes at the single-core speed.

The bundle is shaped like a real one: three OCI image layouts with a few large layers, a few
hundred wheels of very different sizes, and many small files (docs, Ansible content). The
verifier runs as install.sh runs it (``$PYTHON -I -S verify.py``).

    PYTHON=/usr/bin/python3 .venv/bin/python tests/bench/bench_bundle_verify.py \\
        [--size-mib 2048] [--rounds 5] [--install]

With ``--install`` it then times ``install.sh`` start → the first ``/readyz`` on a real
bundle, offline (tests/bench/bench_install.py; target under 60 s).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.util
import mmap
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance.bundle.manifest import hash_tree, render_manifest
from appliance.bundle.signing import sign_detached

ROOT = Path(__file__).resolve().parents[2]
VERIFY = ROOT / "bundle" / "verify.py"
MIB = 1 << 20

#: Image layers as shares of the bundle: three images, a large base layer each.
LAYERS = {
    "control-plane": [0.14, 0.08, 0.03, 0.01],
    "data-plane": [0.10, 0.06, 0.02],
    "registry": [0.06, 0.03, 0.01, 0.005],
}
WHEELS = 400  # sharing what the layers leave, sizes log-normal (a few kB to tens of MB)
SMALL_FILES = 800  # docs, Ansible roles, OCI index and config files: 0.5–32 KiB each


def _load_verifier():
    """bundle/verify.py as a module: the bench uses its read size and thread count."""
    spec = importlib.util.spec_from_file_location("animus_bundle_verify_bench", VERIFY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _sizes(total: int, rng: random.Random) -> dict[str, int]:
    """Relative path → size, about TOTAL bytes in all."""
    sizes: dict[str, int] = {}
    for image, shares in LAYERS.items():
        layout = f"images/{image}"
        sizes[f"{layout}/oci-layout"] = 30
        sizes[f"{layout}/index.json"] = 400
        sizes[f"{layout}/blobs/sha256/{rng.randbytes(32).hex()}"] = 1500  # image manifest
        sizes[f"{layout}/blobs/sha256/{rng.randbytes(32).hex()}"] = 6000  # image config
        for share in shares:
            sizes[f"{layout}/blobs/sha256/{rng.randbytes(32).hex()}"] = int(total * share)
    small = {}
    for index in range(SMALL_FILES):
        folder = ("docs", "ansible/roles", "ansible/playbooks")[index % 3]
        small[f"{folder}/file-{index:04d}"] = rng.randint(512, 32 << 10)
    left = total - sum(sizes.values()) - sum(small.values())
    weights = [rng.lognormvariate(0, 1.6) for _ in range(WHEELS)]
    scale = left / sum(weights)
    for index, weight in enumerate(weights):
        size = min(int(weight * scale), total // 20)  # no wheel above 5 % of the bundle
        sizes[f"offline-wheels/package_{index:03d}-1.0-py3-none-any.whl"] = max(size, 2048)
    sizes.update(small)
    return sizes


def _generate(root: Path, total: int) -> None:
    """Write a bundle-like tree of about TOTAL bytes (random, so incompressible data)."""
    rng = random.Random(6)
    block = os.urandom(4 * MIB)
    for index, (rel, size) in enumerate(sorted(_sizes(total, rng).items())):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as out:
            header = index.to_bytes(8, "big")  # each file differs
            out.write(header[:size])
            left = size - len(header)
            while left > 0:
                out.write(block[: min(left, len(block))])
                left -= len(block)


def _sign_bundle(root: Path, fingerprint: str, home: Path) -> list:
    """MANIFEST.json and its signature for the files under ROOT; returns the entries."""
    entries = hash_tree(root)  # also warms the page cache
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
    return entries


def _single_core_sha256(buffer_size: int, seconds: float = 0.3) -> tuple[float, float]:
    """Bytes per second one core hashes with hashlib.sha256, fed BUFFER_SIZE bytes per
    update() from one page-aligned buffer (as the verifier's threads are): per second of
    wall-clock time, and per second of CPU time."""
    with mmap.mmap(-1, buffer_size) as buffer:
        buffer.write(os.urandom(buffer_size))
        view = memoryview(buffer)
        digest = hashlib.sha256()
        done = 0
        start, start_cpu = time.perf_counter(), time.thread_time()
        while (elapsed := time.perf_counter() - start) < seconds:
            for _ in range(16):
                digest.update(view)
            done += 16 * buffer_size
        view.release()
    return done / elapsed, done / (time.thread_time() - start_cpu)


def _one_thread_from_page_cache(verifier, paths: list[str]) -> float:
    """CPU-time speed of one thread hashing the bundle's files with the verifier's own
    reader: what the copy out of the page cache costs, against the limit."""
    start = time.thread_time()
    done = 0
    with verifier._read_buffer() as mapped, memoryview(mapped) as buffer:
        for path in paths:
            done += verifier._hash_file(path, buffer)[1]
    return done / (time.thread_time() - start)


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


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(command: list[str], env: dict, cwd: Path, cpu: list | None = None) -> float:
    """Wall-clock seconds of COMMAND; its CPU seconds (with gpg's) are appended to CPU."""
    used = _children_cpu()
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if cpu is not None:
        cpu.append(_children_cpu() - used)
    return elapsed


def _spread(speeds: list[float]) -> str:
    return (
        f"best {max(speeds) / MIB:5.0f}, median {statistics.median(speeds) / MIB:5.0f}, "
        f"worst {min(speeds) / MIB:5.0f} MiB/s"
    )


def main() -> None:
    """Generate the bundle, time the contenders, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--python",
        default=os.environ.get("PYTHON") or sys.executable,
        help="interpreter that runs verify.py, with -I -S as install.sh does (default: $PYTHON, "
        "else this one)",
    )
    parser.add_argument(
        "--install",
        action="store_true",
        help="then build a real bundle and time install.sh start → /readyz on the embedded "
        "default, offline (root; tests/bench/bench_install.py)",
    )
    args = parser.parse_args()
    verifier = _load_verifier()
    work = Path(tempfile.mkdtemp(prefix="animus-bench-"))
    home = work / "gnupg"
    home.mkdir(mode=0o700)
    try:
        fingerprint = _gpg_key(home)
        root = work / "bundle"
        root.mkdir()
        print(f"generating {args.size_mib} MiB of bundle files …", file=sys.stderr)
        _generate(root, args.size_mib * MIB)
        entries = _sign_bundle(root, fingerprint, home)
        tiny = work / "tiny"  # one small file: what every run costs before it hashes
        tiny.mkdir()
        (tiny / "README").write_text("fixed cost\n")
        _sign_bundle(tiny, fingerprint, home)
        print("writing the files back to disk …", file=sys.stderr)
        os.sync()  # else the kernel's writeback of 2 GiB competes with the first rounds
        total = sum(e.size for e in entries)
        largest = max(e.size for e in entries)
        sums = work / "SHA256SUMS"
        sums.write_text("".join(f"{e.sha256}  {e.path}\n" for e in entries))
        env = {**os.environ, "GNUPGHOME": str(home)}
        ours_cmd = [args.python, "-I", "-S", str(VERIFY), str(root), "--quiet"]
        tiny_cmd = [args.python, "-I", "-S", str(VERIFY), str(tiny), "--quiet"]
        theirs_cmd = ["sha256sum", "--quiet", "-c", str(sums)]
        _timed(ours_cmd, env, root)  # every contender reads the files once before timing
        _timed(theirs_cmd, env, root)
        ours, theirs, fixed, per_core, ours_cpu, core_cpu = [], [], [], [], [], []
        one_thread = []
        paths = [str(root / e.path) for e in entries]
        for _ in range(args.rounds):
            ours.append(total / _timed(ours_cmd, env, root, ours_cpu))
            theirs.append(total / _timed(theirs_cmd, env, root))
            fixed.append(_timed(tiny_cmd, env, tiny))
            speed, cpu_speed = _single_core_sha256(verifier.READ_SIZE)
            per_core.append(speed)
            core_cpu.append(cpu_speed)
            one_thread.append(_one_thread_from_page_cache(verifier, paths))
        cores = verifier.usable_cores()
        best_core = max(per_core)
        limit = best_core * cores
        best_ours, best_theirs = max(ours), max(theirs)
        print(
            f"bundle: {len(entries)} files, {total / MIB:.0f} MiB, largest file "
            f"{100 * largest / total:.0f} %; page cache warm for every contender; {cores} cores"
        )
        print(f"verify.py: {args.python} -I -S, {args.rounds} rounds, whole process")
        print(f"verify.py (parallel):  {_spread(ours)}")
        print(f"sha256sum -c:          {_spread(theirs)}")
        print(
            f"machine limit:         {limit / MIB:5.0f} MiB/s  ({cores} × {best_core / MIB:.0f} "
            f"MiB/s single-core hashlib.sha256, {verifier.READ_SIZE // 1024} KiB buffer; "
            f"slowest round {min(per_core) / MIB:.0f})"
        )
        print(
            f"fixed cost per run:    {1000 * min(fixed):5.0f} ms  (interpreter, imports, gpg "
            "--verify; a one-file bundle)"
        )
        hashing = total / (total / best_ours - min(fixed))
        print(
            f"verify.py less the fixed cost: {hashing / MIB:5.0f} MiB/s  "
            f"({100 * hashing / limit:.0f} % of the limit; for very large bundles)"
        )
        needed = total / max(core_cpu)
        print(
            f"CPU time: verify.py {min(ours_cpu):.2f} s at best (median "
            f"{statistics.median(ours_cpu):.2f}); hashing {total / MIB:.0f} MiB at the "
            f"single-core speed takes {needed:.2f} s: {100 * needed / min(ours_cpu):.0f} % efficient"
        )
        print(
            f"one thread hashing the files from the page cache: {max(one_thread) / MIB:.0f} MiB "
            f"per CPU second, {100 * max(one_thread) / max(core_cpu):.0f} % of hashing in memory"
        )
        ratio, share = best_ours / best_theirs, best_ours / limit
        print(
            f"verify.py / sha256sum -c:  {ratio:.2f}×  (best of each; target ≥ 4×: "
            f"{'met' if ratio >= 4 else 'NOT met'})"
        )
        print(
            f"verify.py / machine limit: {100 * share:.0f} %  (best of each; target ≥ 80 %: "
            f"{'met' if share >= 0.8 else 'NOT met'})"
        )
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False)
        shutil.rmtree(work, ignore_errors=True)
    if args.install:
        import bench_install  # beside this file

        bench_install.run()


if __name__ == "__main__":
    main()
