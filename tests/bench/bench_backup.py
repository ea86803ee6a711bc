"""Benchmark: backup and restore of an installation, next to a plain copy of the same data.

    .venv/bin/python tests/bench/bench_backup.py [--size-mib 1024] [--backend sqlite|postgresql]
                                                 [--events 20000] [--no-fsync]

Builds a throwaway installation (SQLite, or a PostgreSQL server started for the run on a
loopback port), fills its blob store with SIZE MiB of blobs (a mix of 8 MiB and 64 KiB
files) and its audit chain with EVENTS events, then measures in one run:

- ``cp -a`` of the data dir (and ``pg_dump`` of the database, for PostgreSQL), before and
  after the backup (the shared disk's speed drifts): the floor;
- ``create_backup``: database snapshot, blobs copied and hashed, manifest (the RPO cost);
- ``restore_backup`` into an empty installation: verify every file, stage, check the audit
  chain, swap in (the RTO, without starting the processes).

Figures depend on the page cache: the blobs were just written, so reads come from memory,
as they do for a backup of recently written data. fsync is on unless ``--no-fsync``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from appliance import db  # noqa: E402
from appliance.config import Config  # noqa: E402
from appliance.ops.backup import create_backup, pg_tool, restore_backup  # noqa: E402

MIB = 1 << 20
PG_BIN = Path(os.environ.get("ANIMUS_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


class PostgresServer:
    """A throwaway PostgreSQL server for the run (durable settings: fsync on)."""

    def __init__(self):
        self.directory = Path(tempfile.mkdtemp(prefix="animus-bench-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        self.data = self.directory / "data"
        self.port = free_port()
        initdb = [str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]
        subprocess.run(as_postgres(initdb), check=True, capture_output=True)
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
        start = [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options]
        start += ["-l", str(self.directory / "log"), "-w", "start"]
        subprocess.run(as_postgres(start), check=True, capture_output=True)

    def create(self, name: str) -> str:
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-qc",
             f"CREATE DATABASE {name}"],
            check=True,
            capture_output=True,
        )  # fmt: skip
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        stop = [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"]
        subprocess.run(as_postgres(stop), check=False, capture_output=True)
        shutil.rmtree(self.directory, ignore_errors=True)


def fill_blobs(blob_dir: Path, size: int) -> int:
    """SIZE bytes of blobs: 90% in 8 MiB files, 10% in 64 KiB files. Returns the count."""
    count = 0
    block = os.urandom(MIB)

    def put(data: bytes) -> None:
        nonlocal count
        digest = hashlib.sha256(data).hexdigest()
        path = blob_dir / "sha256" / digest[:2] / digest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chmod(path, 0o444)
        count += 1

    big, small = int(size * 0.9) // (8 * MIB), int(size * 0.1) // (64 << 10)
    for index in range(big):
        put(b"".join(block[:-8] + (index * 8 + i).to_bytes(8, "big") for i in range(8)))
    for index in range(small):
        put(block[: (64 << 10) - 8] + index.to_bytes(8, "big"))
    return count


def fill_audit_chain(count: int) -> None:
    from appliance.audit import log as audit_log
    from appliance.audit.actions import Action
    from appliance.domain.context import SYSTEM, Context

    ctx = Context(principal=SYSTEM, request_id="bench")
    batch = 500
    for start in range(0, count, batch):
        with db.write_transaction():
            for index in range(start, min(count, start + batch)):
                audit_log.record(
                    ctx,
                    Action.PROJECT_CREATED,
                    object_type="project",
                    object_id=f"prj_bench_{index}",
                    payload={"name": f"bench-{index}", "note": "x" * 200},
                )


def timed(func) -> tuple[float, object]:
    start = time.perf_counter()
    result = func()
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--no-fsync", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="animus-bench-backup-", dir=os.environ.get("TMPDIR")))
    server = PostgresServer() if args.backend == "postgresql" else None
    fsync = "0" if args.no_fsync else "1"
    try:
        source_url = server.create("bench_source") if server else ""
        target_url = server.create("bench_target") if server else ""
        source = Config.from_env(
            {}, data_dir=str(work / "data"), database_url=source_url, blob_fsync=fsync
        )
        target = Config.from_env(
            {}, data_dir=str(work / "restored"), database_url=target_url, blob_fsync=fsync
        )
        database = db.open_database(source.effective_database_url)
        db.bind(database)
        db.upgrade(log=lambda _line: None)
        fill_audit_chain(args.events)
        blobs = fill_blobs(source.blob_dir, args.size_mib * MIB)
        subprocess.run(["sync"], check=True)
        total = sum(p.stat().st_size for p in source.blob_dir.rglob("*") if p.is_file())
        print(f"installation: {args.backend}, {blobs} blobs, {total / MIB:.0f} MiB, "
              f"{args.events} audit events, fsync {'on' if fsync == '1' else 'off'}")  # fmt: skip

        def plain_copy(name: str) -> None:
            subprocess.run(["cp", "-a", str(source.data_dir), str(work / name)], check=True)
            if server:
                subprocess.run(
                    [pg_tool("pg_dump"), "-h", "127.0.0.1", "-p", str(server.port), "-U",
                     "postgres", "--format=custom", f"--file={work / name}.dump",
                     "bench_source"],
                    check=True,
                )  # fmt: skip
            subprocess.run(["sync"], check=True)

        # A plain copy before and after the backup: the shared disk's speed drifts.
        before_s, _ = timed(lambda: plain_copy("plain-before"))
        backup_s, summary = timed(lambda: create_backup(source, work / "backup"))
        after_s, _ = timed(lambda: plain_copy("plain-after"))
        copy_s = (before_s + after_s) / 2
        database.close_all()
        db.bind(db.open_database(target.effective_database_url))
        restore_s, restored = timed(lambda: restore_backup(target, work / "backup"))
        size = summary["bytes"]

        def rate(seconds: float) -> str:
            return f"{seconds:7.2f} s  {size / seconds / 1e6:7.0f} MB/s"

        print(f"plain copy (cp -a{' + pg_dump' if server else ''}):  {rate(copy_s)}  "
              f"(before {before_s:.2f} s, after {after_s:.2f} s)")  # fmt: skip
        print(f"animus backup:                {rate(backup_s)}  "
              f"(database {summary['seconds']['database']:.2f} s, "
              f"blobs {summary['seconds']['blobs']:.2f} s)  "
              f"{backup_s / copy_s:.2f}x the plain copies")  # fmt: skip
        print(f"animus restore:               {rate(restore_s)}  "
              f"(verify {restored['seconds']['verify']:.2f} s, "
              f"restore {restored['seconds']['restore']:.2f} s)")  # fmt: skip
        print(f"backup size: {size / MIB:.0f} MiB in {summary['files']} files; "
              f"audit chain after restore: {restored['audit_verify'][:40]}")  # fmt: skip
    finally:
        if server:
            with_pool = db.database.obj
            if with_pool is not None:
                with_pool.close_all()
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
