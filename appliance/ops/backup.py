"""Backup and restore of an installation (``animus backup DIR``, ``animus restore DIR``).

A backup is a directory::

    MANIFEST.json              format, versions, audit chain head, every file's path/size/sha256
    database/animus.db         SQLite: a copy made with SQLite's online backup API
    database/animus.pgdump     PostgreSQL: ``pg_dump --format=custom``
    blobs/sha256/ab/<digest>   the blob store, every blob the snapshot references (and more)
    keys/signing-public.asc    the public keys of the signing GPG home (no secret key)
    config.json                the effective settings, the database password removed

The database snapshot is taken first and is consistent while the appliance keeps running
(SQLite's backup API copies one read transaction; ``pg_dump`` runs inside a transaction
whose snapshot this module exports and reads from too). Blobs are copied afterwards: a blob
is promoted before the transaction that references it commits and is never changed or
deleted, so every blob the snapshot references is present by then, and that is checked.

Restore verifies every file of the backup before it writes anything, stages the database
and the blob store beside their places, checks the staged audit chain against the head the
manifest recorded, and only then swaps them in (renames; one transaction on PostgreSQL).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse

from appliance import __version__, db
from appliance.audit import chain
from appliance.audit import log as audit_log
from appliance.config import Config
from appliance.errors import AnimusError
from appliance.storage.blobs import fsync_path

FORMAT = "animus-backup/1"
MANIFEST = "MANIFEST.json"
SQLITE_FILE = "database/animus.db"
PGDUMP_FILE = "database/animus.pgdump"
KEYS_FILE = "keys/signing-public.asc"
CONFIG_FILE = "config.json"
BLOB_PREFIX = "blobs/sha256/"

#: Columns that hold the digest of a blob in the store.
BLOB_REFERENCES = (
    ("dataset_files", "sha256"),
    ("artifacts", "sha256"),
    ("model_versions", "artifact_sha256"),
    ("model_exports", "sha256"),
)

_CHUNK = 1 << 20
_HASH_WORKERS = max(2, min(8, 2 * (os.cpu_count() or 1)))
_DIGEST = re.compile(r"[0-9a-f]{64}")
_BLOB_PATH = re.compile(r"blobs/sha256/([0-9a-f]{2})/([0-9a-f]{64})")
_BLOB_MODE = 0o444

Progress = Callable[[str], None]


def _silent(_message: str) -> None:
    pass


class BackupError(Exception):
    """A backup or restore that cannot go on; ``code`` names why, ``exit_code`` is for the CLI.

    Exit codes: 1 a failure while working (I/O, database tools), 2 the target or settings
    are not fit (non-empty directory, other backend, newer schema), 3 the backup does not
    verify (missing, extra or altered files; bad manifest), 4 the restored data does not
    verify (audit chain, chain head, schema version).
    """

    def __init__(self, code: str, message: str, *, exit_code: int = 1):
        super().__init__(message)
        self.code = code
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def _refused(code: str, message: str) -> BackupError:
    return BackupError(code, message, exit_code=2)


def _invalid(code: str, message: str) -> BackupError:
    return BackupError(code, message, exit_code=3)


def _unverified(code: str, message: str) -> BackupError:
    return BackupError(code, message, exit_code=4)


# --- files ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, POSIX
    size: int
    sha256: str

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


def _sha256_file(path: Path) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            hasher.update(view[:count])
            size += count
    return hasher.hexdigest(), size


def _copy_hashing(source: Path, target: Path, *, mode: int = 0o600) -> tuple[str, int]:
    """Copy ``source`` to a new file ``target``; returns the sha256 and size of what ``target``
    then holds (read back, so the digest vouches for the copy, not only for the source).

    The kernel copies (``copy_file_range``): measured here, writing from Python buffers
    managed about 300 MB/s into the page cache, the kernel's copy about 2 GB/s, and reading
    the copy back to hash it costs less than the difference.
    """
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with open(source, "rb", buffering=0) as handle:
            _kernel_copy(handle.fileno(), fd, os.fstat(handle.fileno()).st_size)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return _sha256_file(target)


def _kernel_copy(source: int, target: int, size: int) -> None:
    copied = 0
    try:
        while True:
            count = os.copy_file_range(source, target, max(size - copied, _CHUNK))
            if count == 0:
                return
            copied += count
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    # Filesystems without copy_file_range between them: copy through a buffer.
    os.lseek(source, copied, os.SEEK_SET)
    os.lseek(target, copied, os.SEEK_SET)
    while chunk := os.read(source, _CHUNK):
        view = memoryview(chunk)
        while view:
            view = view[os.write(target, view) :]


def _sync_filesystem(path: Path) -> None:
    """Flush everything written on ``path``'s filesystem to disk.

    One syncfs(2) rather than an fsync per file: each fsync cost about 4 ms here, 7 s of an
    8.7 s backup of 1,700 blobs.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        if _syncfs is None or _syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


_syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)


def _write_file(root: Path, relative: str, data: bytes) -> FileEntry:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    return FileEntry(relative, len(data), hashlib.sha256(data).hexdigest())


class _Meter:
    """Throttled progress for many files: one line a second at most, and one at the end."""

    def __init__(self, progress: Progress, label: str, files: int, total: int):
        self.progress, self.label, self.files, self.total = progress, label, files, total
        self.done_files = 0
        self.done_bytes = 0
        self._last = 0.0
        self._lock = threading.Lock()

    def add(self, size: int) -> None:
        with self._lock:
            self.done_files += 1
            self.done_bytes += size
            now = time.monotonic()
            if self.done_files < self.files and now - self._last < 1.0:
                return
            self._last = now
            self.progress(
                f"  {self.label}: {self.done_files}/{self.files} files, "
                f"{_mib(self.done_bytes)}/{_mib(self.total)}"
            )


def _mib(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB"


def _parallel(func: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    items = list(items)
    if len(items) < 2:
        return [func(item) for item in items]
    with ThreadPoolExecutor(max_workers=_HASH_WORKERS, thread_name_prefix="backup") as pool:
        return list(pool.map(func, items))


# --- the database, whichever backend ----------------------------------------------------------


def backend_of(config: Config) -> str:
    return "postgresql" if urlparse(config.effective_database_url).scheme != "sqlite" else "sqlite"


def _sqlite_path(config: Config) -> Path:
    # ``sqlite:////abs/path`` parses to the path ``//abs/path``.
    return Path("/" + unquote(urlparse(config.effective_database_url).path).lstrip("/"))


def _pg_params(config: Config) -> dict[str, Any]:
    parsed = urlparse(config.effective_database_url)
    return {
        "dbname": unquote(parsed.path.lstrip("/")),
        "user": unquote(parsed.username) if parsed.username else None,
        "password": unquote(parsed.password) if parsed.password else None,
        "host": parsed.hostname or None,
        "port": parsed.port or None,
    }


def _pg_connect(config: Config):
    import psycopg2

    params = {k: v for k, v in _pg_params(config).items() if v is not None}
    try:
        return psycopg2.connect(**params, connect_timeout=30)
    except psycopg2.Error as exc:
        raise BackupError(
            "database_unavailable", f"cannot connect to PostgreSQL: {str(exc).strip()}"
        ) from None


def _pg_env(config: Config) -> dict[str, str]:
    """The environment for pg_dump/pg_restore: the password never goes on a command line.

    Other libpq variables (``PGSSLMODE``, ``PGPASSFILE``…) pass through, as they do for the
    appliance's own connections.
    """
    names = {"dbname": "PGDATABASE", "user": "PGUSER", "password": "PGPASSWORD"}
    names |= {"host": "PGHOST", "port": "PGPORT"}
    env = dict(os.environ)
    for key, value in _pg_params(config).items():
        if value is not None:
            env[names[key]] = str(value)
    return env


def pg_tool(name: str) -> str:
    """``pg_dump`` or ``pg_restore``: the newest in /usr/lib/postgresql/*/bin, else on PATH."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
        reverse=True,
    )
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise BackupError(
            "tool_missing", f"{name} not found (install the PostgreSQL client: postgresql-client)"
        )
    return found


class _Cursor:
    """A DB-API cursor with its placeholder, over a SQLite file or a PostgreSQL transaction."""

    def __init__(self, cursor: Any, param: str, tables: set[str]):
        self.cursor, self.param, self.tables = cursor, param, tables

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        self.cursor.execute(sql.replace("{p}", self.param), params)
        return self.cursor.fetchall()

    def value(self, sql: str, params: tuple = ()) -> Any:
        rows = self.rows(sql, params)
        return rows[0][0] if rows else None


def _sqlite_cursor(connection: sqlite3.Connection) -> _Cursor:
    cursor = connection.cursor()
    tables = {r[0] for r in cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return _Cursor(cursor, "?", tables)


def _pg_cursor(connection: Any) -> _Cursor:
    cursor = connection.cursor()
    cursor.execute("SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = 'public'")
    return _Cursor(cursor, "%s", {r[0] for r in cursor.fetchall()})


@dataclass
class SnapshotFacts:
    """What a database snapshot says about itself."""

    schema_version: int
    installation_id: str
    head_seq: int
    head_hash: str
    referenced: set[str] = field(default_factory=set)
    environment_images: list[str] = field(default_factory=list)


def _read_facts(cur: _Cursor, *, qualify: str = "") -> SnapshotFacts:
    missing = {"schema_migrations", "system_settings", "audit_events"} - cur.tables
    if missing:
        raise BackupError(
            "database_not_initialized",
            f"the database has no {', '.join(sorted(missing))} table: run `animus db upgrade`",
        )
    version = cur.value(f"SELECT MAX(version) FROM {qualify}schema_migrations") or 0
    installation = cur.value(
        f"SELECT value FROM {qualify}system_settings WHERE key = {{p}}", ("installation_id",)
    )
    head = cur.rows(f"SELECT seq, hash FROM {qualify}audit_events ORDER BY seq DESC LIMIT 1")
    referenced: set[str] = set()
    for table, column in BLOB_REFERENCES:
        if table in cur.tables:
            referenced.update(
                r[0] for r in cur.rows(f"SELECT DISTINCT {column} FROM {qualify}{table}")
            )
    return SnapshotFacts(
        schema_version=int(version),
        installation_id=str(installation or ""),
        head_seq=int(head[0][0]) if head else 0,
        head_hash=head[0][1] if head else chain.genesis_hash(str(installation or "")),
        referenced=referenced,
        environment_images=sorted(
            r[0] for r in cur.rows(f"SELECT DISTINCT image_digest FROM {qualify}environment_locks")
        )
        if "environment_locks" in cur.tables
        else [],
    )


def _chain_rows(cur: _Cursor, *, qualify: str = "") -> Iterator[tuple[int, dict, str, str, str]]:
    """Every stored event as ``(seq, columns, canonical, prev_hash, hash)``, as the verifier
    of ``animus audit verify`` reads them."""
    last = 0
    while True:
        rows = cur.rows(
            "SELECT seq, at, actor, action, project_id, object_type, object_id, request_id,"
            f" payload, prev_hash, hash, canonical FROM {qualify}audit_events"
            " WHERE seq > {p} ORDER BY seq LIMIT 5000",
            (last,),
        )
        if not rows:
            return
        yield from map(audit_log.decode_row, rows)
        last = rows[-1][0]


def _check_restored_chain(cur: _Cursor, manifest: dict, *, qualify: str = "") -> chain.Verdict:
    """The staged database must hold an intact chain ending at the manifest's head."""
    facts = _read_facts(cur, qualify=qualify)
    recorded = manifest["database"]
    if facts.schema_version != recorded["schema_version"]:
        raise _unverified(
            "restore_schema_mismatch",
            f"the restored database is at schema {facts.schema_version}, "
            f"the manifest says {recorded['schema_version']}",
        )
    if facts.installation_id != recorded["installation_id"]:
        raise _unverified(
            "restore_installation_mismatch",
            "the restored database belongs to another installation than the manifest says",
        )
    verdict = chain.verify_chain(
        _chain_rows(cur, qualify=qualify), chain.genesis_hash(facts.installation_id)
    )
    _compare_head(verdict, manifest)
    return verdict


def _require_intact_chain(cur: _Cursor, facts: SnapshotFacts, *, qualify: str = "") -> None:
    """A backup must restore, and a restore requires an intact chain: check it at the source."""
    verdict = chain.verify_chain(
        _chain_rows(cur, qualify=qualify), chain.genesis_hash(facts.installation_id)
    )
    if not verdict.ok or verdict.count != facts.head_seq:
        raise BackupError(
            "audit_chain_broken",
            f"the audit chain in the snapshot does not verify ({verdict}); a backup of it "
            "would not restore. Investigate with `animus audit verify`",
        )


def _compare_head(verdict: chain.Verdict, manifest: dict) -> None:
    if not verdict.ok:
        raise _unverified("restore_chain_broken", f"the audit chain does not verify: {verdict}")
    head = manifest["audit_head"]
    if (verdict.count, verdict.head_hash) != (head["seq"], head["hash"]):
        raise _unverified(
            "restore_head_mismatch",
            f"the restored audit chain ends at seq {verdict.count} ({verdict.head_hash}); "
            f"the manifest recorded seq {head['seq']} ({head['hash']})",
        )


# --- snapshots ----------------------------------------------------------------------------


def _snapshot_sqlite(config: Config, target: Path) -> SnapshotFacts:
    path = _sqlite_path(config)
    if not path.is_file():
        raise BackupError("database_unavailable", f"no SQLite database at {path}")
    target.parent.mkdir(parents=True, exist_ok=True)
    source = sqlite3.connect(path, timeout=30)
    try:
        copy = sqlite3.connect(target)
        try:
            # One step: the whole copy is read in one read transaction, a consistent snapshot;
            # in WAL mode the appliance keeps writing meanwhile.
            source.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            cur = _sqlite_cursor(copy)
            facts = _read_facts(cur)
            _require_intact_chain(cur, facts)
            return facts
        finally:
            copy.close()
    except sqlite3.Error as exc:
        raise BackupError("database_snapshot_failed", f"SQLite backup failed: {exc}") from None
    finally:
        source.close()


def _snapshot_postgresql(config: Config, target: Path) -> SnapshotFacts:
    import psycopg2

    target.parent.mkdir(parents=True, exist_ok=True)
    dump = pg_tool("pg_dump")
    connection = _pg_connect(config)
    try:
        connection.set_session(isolation_level="REPEATABLE READ", readonly=True)
        cursor = connection.cursor()
        # pg_dump reads the very snapshot this transaction reads the chain head and the
        # referenced blobs from, so the manifest describes exactly what was dumped.
        cursor.execute("SELECT pg_export_snapshot()")
        snapshot_id = cursor.fetchone()[0]
        cur = _pg_cursor(connection)
        facts = _read_facts(cur, qualify="public.")
        with tempfile.TemporaryFile() as errors:
            result = subprocess.run(
                [dump, "--format=custom", f"--snapshot={snapshot_id}", "--no-password",
                 f"--file={target}"],
                env=_pg_env(config),
                stdout=subprocess.DEVNULL,
                stderr=errors,
                check=False,
            )  # fmt: skip
            if result.returncode != 0:
                errors.seek(0)
                raise BackupError(
                    "database_snapshot_failed",
                    f"pg_dump failed (exit {result.returncode}): "
                    + errors.read().decode(errors="replace").strip()[-1500:],
                )
        _require_intact_chain(cur, facts, qualify="public.")
        return facts
    except psycopg2.Error as exc:
        raise BackupError("database_snapshot_failed", f"PostgreSQL: {str(exc).strip()}") from None
    finally:
        connection.close()


# --- blobs --------------------------------------------------------------------------------


def _store_blobs(blob_dir: Path) -> list[Path]:
    """Every blob file in the store, in digest order."""
    root = blob_dir / "sha256"
    if not root.is_dir():
        return []
    found = []
    for shard in sorted(root.iterdir()):
        if not (shard.is_dir() and re.fullmatch(r"[0-9a-f]{2}", shard.name)):
            continue
        for blob in sorted(shard.iterdir()):
            if _DIGEST.fullmatch(blob.name) and blob.name[:2] == shard.name and blob.is_file():
                found.append(blob)
    return found


def _copy_blobs(
    blob_dir: Path,
    dest: Path,
    referenced: set[str],
    progress: Progress,
    *,
    hard_link: bool,
) -> list[FileEntry]:
    sources = _store_blobs(blob_dir)
    present = {p.name for p in sources}
    missing = sorted(referenced - present)
    if missing:
        raise BackupError(
            "blob_missing",
            f"{len(missing)} blob(s) the database references are not in the blob store "
            f"(first: sha256:{missing[0]}); the store is damaged",
        )
    total = sum(p.stat().st_size for p in sources)
    meter = _Meter(progress, "blobs", len(sources), total)
    progress(f"copying {len(sources)} blobs ({_mib(total)}){' as hard links' if hard_link else ''}")
    for shard in {p.parent.name for p in sources}:
        (dest / "blobs" / "sha256" / shard).mkdir(parents=True, exist_ok=True)

    def copy(source: Path) -> FileEntry:
        relative = f"{BLOB_PREFIX}{source.parent.name}/{source.name}"
        target = dest / relative
        linked = False
        if hard_link:
            try:
                os.link(source, target)
                linked = True
            except OSError:
                linked = False  # another filesystem: copy instead
        if linked:
            digest, size = _sha256_file(target)
        else:
            digest, size = _copy_hashing(source, target, mode=_BLOB_MODE)
        if digest != source.name:
            raise BackupError(
                "blob_corrupt",
                f"blob sha256:{source.name} in the store has other content (sha256:{digest}); "
                "the store is damaged",
            )
        meter.add(size)
        return FileEntry(relative, size, digest)

    return _parallel(copy, sources)


# --- keys and settings --------------------------------------------------------------------


def _public_keys(config: Config) -> tuple[bytes, list[str]]:
    """The ASCII-armored public keys of the signing GPG home and their fingerprints."""
    home = config.gnupg_home
    if not any((home / name).exists() for name in ("pubring.kbx", "pubring.gpg")):
        return b"", []
    gpg = shutil.which("gpg")
    if gpg is None:
        raise BackupError("tool_missing", "gpg is needed to export the signing public keys")
    base = [gpg, "--batch", "--no-tty", "--homedir", str(home)]
    try:
        listing = subprocess.run(
            [*base, "--with-colons", "--list-keys"], capture_output=True, check=True, timeout=60
        ).stdout.decode()
        armored = subprocess.run(
            [*base, "--armor", "--export-options", "export-minimal", "--export"],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise BackupError(
            "signing_keys_unreadable", f"gpg could not list the keys: {exc}"
        ) from None
    fingerprints, primary = [], False
    for line in listing.splitlines():
        kind = line.split(":")[0]
        if kind == "pub":
            primary = True
        elif kind == "fpr" and primary:
            fingerprints.append(line.split(":")[9])
            primary = False
    return armored, fingerprints


def _settings_without_secrets(config: Config) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, value in vars(config).items():
        if name == "database_url" and value:
            value = re.sub(r"://([^:/@]+):[^@]*@", r"://\1@", value)
        values[name] = str(value) if isinstance(value, Path) else value
    return values


# --- backup -------------------------------------------------------------------------------


def _prepare_empty_dir(dest: Path) -> bool:
    """Make sure ``dest`` is an empty directory; returns whether it was created."""
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir():
            raise _refused("backup_target_not_empty", f"{dest} exists and is not a directory")
        if any(dest.iterdir()):
            raise _refused(
                "backup_target_not_empty",
                f"{dest} is not empty: give a new or empty directory for the backup",
            )
        return False
    try:
        dest.mkdir(parents=True)
    except OSError as exc:
        raise _refused("backup_target_unusable", f"cannot create {dest}: {exc.strerror}") from None
    return True


def _empty(dest: Path, *, remove: bool) -> None:
    if remove:
        shutil.rmtree(dest, ignore_errors=True)
        return
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                child.unlink()


def create_backup(
    config: Config,
    dest: Path,
    progress: Progress = _silent,
    *,
    hard_link: bool = False,
    ctx: Any = None,
) -> dict[str, Any]:
    """Back up the installation named by ``config`` into ``dest`` (absent or empty) while it
    runs; returns a summary (what the CLI prints with ``--json``).

    ``hard_link`` links blobs instead of copying them when ``dest`` is on the blob store's
    filesystem (blobs are read-only and never change; the upgrade path uses it). On any
    failure nothing is left in ``dest``. The backup is recorded in the audit chain as
    ``ops:backup:created`` (after the snapshot, so not inside it).
    """
    dest = Path(dest).absolute()
    started = time.monotonic()
    backend = backend_of(config)
    if dest.is_relative_to(config.data_dir.absolute()):
        raise _refused(
            "backup_target_unusable",
            "the backup cannot go inside the data dir it backs up (ANIMUS_DATA_DIR)",
        )
    created = _prepare_empty_dir(dest)
    fsync = config.blob_fsync
    try:
        progress(f"snapshot of the {backend} database")
        if backend == "sqlite":
            db_relative = SQLITE_FILE
            facts = _snapshot_sqlite(config, dest / db_relative)
        else:
            db_relative = PGDUMP_FILE
            facts = _snapshot_postgresql(config, dest / db_relative)
        db_digest, db_size = _sha256_file(dest / db_relative)
        snapshot_done = time.monotonic()
        progress(
            f"  database: {_mib(db_size)}, schema {facts.schema_version}, "
            f"audit head seq {facts.head_seq}"
        )
        entries = [FileEntry(db_relative, db_size, db_digest)]
        entries += _copy_blobs(
            config.blob_dir, dest, facts.referenced, progress, hard_link=hard_link
        )
        blobs_done = time.monotonic()
        armored, fingerprints = _public_keys(config)
        if armored:
            entries.append(_write_file(dest, KEYS_FILE, armored))
        settings = json.dumps(_settings_without_secrets(config), indent=2, sort_keys=True)
        entries.append(_write_file(dest, CONFIG_FILE, settings.encode() + b"\n"))
        entries.sort(key=lambda e: e.path)
        blob_entries = [e for e in entries if e.path.startswith(BLOB_PREFIX)]
        manifest = {
            "format": FORMAT,
            "product_version": __version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "backend": backend,
            "database": {
                "file": db_relative,
                "schema_version": facts.schema_version,
                "installation_id": facts.installation_id,
            },
            "audit_head": {"seq": facts.head_seq, "hash": facts.head_hash},
            "blobs": {
                "count": len(blob_entries),
                "bytes": sum(e.size for e in blob_entries),
                "referenced": len(facts.referenced),
            },
            "signing_public_keys": fingerprints,
            # Not in the backup: the registry holds them (see docs/ops/backup.md).
            "environment_images": facts.environment_images,
            "files": [e.as_json() for e in entries],
        }
        data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
        manifest_sha256 = hashlib.sha256(data).hexdigest()
        # The manifest goes last, under its name only when complete: a directory without it
        # is no backup.
        partial = dest / (MANIFEST + ".partial")
        _write_file(dest, partial.name, data)
        if fsync:
            _sync_filesystem(dest)
        _record(
            config,
            ctx,
            "BACKUP_CREATED",
            facts.installation_id,
            {
                "destination": str(dest),
                "manifest_sha256": manifest_sha256,
                "audit_head_seq": facts.head_seq,
                "audit_head_hash": facts.head_hash,
                "schema_version": facts.schema_version,
                "files": len(entries),
                "bytes": sum(e.size for e in entries),
            },
        )
        os.replace(partial, dest / MANIFEST)
        if fsync:
            fsync_path(dest)
    except BaseException:
        _empty(dest, remove=created)
        raise
    finished = time.monotonic()
    progress(f"backup complete: {len(entries)} files in {finished - started:.2f} s")
    return {
        "path": str(dest),
        "backend": backend,
        "manifest_sha256": manifest_sha256,
        "schema_version": facts.schema_version,
        "audit_head": manifest["audit_head"],
        "files": len(entries),
        "bytes": sum(e.size for e in entries),
        "database_bytes": db_size,
        "blobs": manifest["blobs"],
        "signing_public_keys": fingerprints,
        "seconds": {
            "database": round(snapshot_done - started, 3),
            "blobs": round(blobs_done - snapshot_done, 3),
            "total": round(finished - started, 3),
        },
    }


# --- verification -------------------------------------------------------------------------


def _load_manifest(source: Path) -> dict[str, Any]:
    if not source.is_dir():
        raise _invalid("backup_not_found", f"{source} is not a directory")
    path = source / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise _invalid(
            "backup_manifest_missing",
            f"{source} has no {MANIFEST}: not a backup, or an incomplete one",
        )
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid("backup_manifest_invalid", f"{MANIFEST} is not valid JSON: {exc}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise _invalid("backup_manifest_invalid", f"{MANIFEST}: {problem}")
    return manifest


def _is_timestamp(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        dt.datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return "not an object"
    if manifest.get("format") != FORMAT:
        return f"unknown format {manifest.get('format')!r} (this release reads {FORMAT})"
    if manifest.get("backend") not in ("sqlite", "postgresql"):
        return "unknown backend"
    if not _is_timestamp(manifest.get("created_at")):
        return "created_at missing or not a timestamp"
    database, head = manifest.get("database"), manifest.get("audit_head")
    if not (
        isinstance(database, dict)
        and isinstance(database.get("schema_version"), int)
        and isinstance(database.get("installation_id"), str)
        and database.get("file")
        == (SQLITE_FILE if manifest["backend"] == "sqlite" else PGDUMP_FILE)
    ):
        return "database section missing or wrong"
    if not (
        isinstance(head, dict)
        and isinstance(head.get("seq"), int)
        and isinstance(head.get("hash"), str)
        and _DIGEST.fullmatch(head["hash"])
    ):
        return "audit_head missing or wrong"
    if not isinstance(manifest.get("blobs"), dict):  # a restore reports it as it is
        return "blobs missing or wrong"
    images = manifest.get("environment_images") or []
    if not (isinstance(images, list) and all(isinstance(i, str) for i in images)):
        return "environment_images is not a list of digests"
    files = manifest.get("files")
    if not isinstance(files, list):
        return "files missing"
    seen = set()
    for entry in files:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("size"), int)
            and entry["size"] >= 0
            and isinstance(entry.get("sha256"), str)
            and _DIGEST.fullmatch(entry["sha256"])
        ):
            return f"malformed file entry {str(entry)[:200]}"
        path = entry["path"]
        parts = path.split("/")
        if path.startswith("/") or any(p in ("", ".", "..") for p in parts) or path == MANIFEST:
            return f"unsafe path {path!r}"
        if path in seen:
            return f"{path} listed twice"
        seen.add(path)
        blob = _BLOB_PATH.fullmatch(path)
        if path.startswith("blobs/") and not (
            blob and blob.group(2).startswith(blob.group(1)) and blob.group(2) == entry["sha256"]
        ):
            return f"{path} is not a blob stored under its own digest"
    if database["file"] not in seen:
        return f"{database['file']} is not listed"
    return None


def verify_backup(source: Path, progress: Progress = _silent) -> dict[str, Any]:
    """Check every file of the backup at ``source`` against its manifest; return the manifest.

    Raises ``BackupError`` (exit code 3) naming the first problem: no or a bad manifest, a
    missing file, an extra file, a link or special file, a size or hash that differs.
    """
    source = Path(source).absolute()
    manifest = _load_manifest(source)
    listed = {e["path"]: e for e in manifest["files"]}
    present: set[str] = set()
    for directory, dirnames, filenames in os.walk(source):
        base = Path(directory)
        for name in list(dirnames) + filenames:
            path = base / name
            relative = path.relative_to(source).as_posix()
            if path.is_symlink():
                raise _invalid("backup_unsafe_entry", f"{relative} is a symbolic link")
            if name in filenames:
                if not path.is_file():
                    raise _invalid("backup_unsafe_entry", f"{relative} is not a regular file")
                if relative != MANIFEST:
                    present.add(relative)
    missing = sorted(set(listed) - present)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise _invalid("backup_file_missing", f"{missing[0]}{more} listed in {MANIFEST} is missing")
    extra = sorted(present - set(listed))
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise _invalid("backup_file_extra", f"{extra[0]}{more} is not listed in {MANIFEST}")
    for path, entry in listed.items():
        size = (source / path).stat().st_size
        if size != entry["size"]:
            raise _invalid(
                "backup_file_mismatch",
                f"{path}: {size} bytes, {MANIFEST} says {entry['size']} (altered or damaged)",
            )
    total = sum(e["size"] for e in listed.values())
    progress(f"verifying {len(listed)} files ({_mib(total)}) of the backup")
    meter = _Meter(progress, "verified", len(listed), total)

    def check(path: str) -> tuple[str, str]:
        digest, size = _sha256_file(source / path)
        meter.add(size)
        return path, digest

    for path, digest in _parallel(check, sorted(listed)):
        if digest != listed[path]["sha256"]:
            raise _invalid(
                "backup_file_mismatch",
                f"{path}: sha256 differs from {MANIFEST} (altered or damaged)",
            )
    return manifest


# --- restore ------------------------------------------------------------------------------


def _blob_store_has_blobs(blob_dir: Path) -> bool:
    root = blob_dir / "sha256"
    return root.is_dir() and any(any(shard.iterdir()) for shard in root.iterdir() if shard.is_dir())


def _holds_data(cur: _Cursor) -> bool:
    """Whether a database has anything beyond an empty migrations table (which any command
    run against a missing database creates)."""
    if cur.tables - {"schema_migrations"}:
        return True
    return "schema_migrations" in cur.tables and bool(
        cur.value("SELECT count(*) FROM schema_migrations")
    )


def _target_in_use(config: Config, backend: str) -> str | None:
    """Why the target is not empty, or ``None``."""
    if _blob_store_has_blobs(config.blob_dir):
        return f"the blob store {config.blob_dir} holds blobs"
    if backend == "sqlite":
        path = _sqlite_path(config)
        if not path.exists():
            return None
        try:
            connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
            try:
                holds = _holds_data(_sqlite_cursor(connection))
            finally:
                connection.close()
        except sqlite3.DatabaseError:
            holds = path.stat().st_size > 0
        return f"the database {path} holds data" if holds else None
    connection = _pg_connect(config)
    try:
        if _holds_data(_pg_cursor(connection)):
            return f"the PostgreSQL database {_pg_params(config)['dbname']} holds data"
        return None
    finally:
        connection.close()


class _StagedBlobs:
    """The backup's blobs copied beside the blob store, swapped in by renames."""

    def __init__(self, blob_dir: Path, staging: Path):
        self.blob_dir = blob_dir
        self.staged = staging / "blobs"
        self.previous = staging / "previous-blobs"
        self.swapped = False
        self.moved_previous = False

    def fill(self, source: Path, entries: list[dict], progress: Progress) -> None:
        (self.staged / "tmp").mkdir(parents=True)
        (self.staged / "sha256").mkdir()
        for shard in {e["path"].split("/")[2] for e in entries}:
            (self.staged / "sha256" / shard).mkdir()
        meter = _Meter(progress, "blobs", len(entries), sum(e["size"] for e in entries))

        def copy(entry: dict) -> None:
            relative = entry["path"][len("blobs/") :]
            digest, size = _copy_hashing(
                source / entry["path"], self.staged / relative, mode=_BLOB_MODE
            )
            if digest != entry["sha256"]:
                raise _invalid(
                    "backup_file_mismatch", f"{entry['path']} changed while it was restored"
                )
            meter.add(size)

        _parallel(copy, entries)

    def swap_in(self) -> None:
        if self.blob_dir.exists():
            os.rename(self.blob_dir, self.previous)
            self.moved_previous = True
        os.rename(self.staged, self.blob_dir)
        self.swapped = True

    def undo(self) -> None:
        if self.swapped:
            os.rename(self.blob_dir, self.staged)
            self.swapped = False
        if self.moved_previous:
            os.rename(self.previous, self.blob_dir)
            self.moved_previous = False


class _PendingSqlite:
    """The restored SQLite file staged beside the database, verified, not yet in place."""

    _COMPANIONS = ("", "-wal", "-shm", "-journal")

    def __init__(self, config: Config, token: str):
        self.path = _sqlite_path(config)
        self.staged = self.path.with_name(f".{self.path.name}.restore-{token}")
        self.token = token
        self.aside: list[tuple[Path, Path]] = []

    def prepare(self, source: Path, manifest: dict) -> chain.Verdict:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entry = next(e for e in manifest["files"] if e["path"] == SQLITE_FILE)
        digest, _ = _copy_hashing(source / SQLITE_FILE, self.staged)
        if digest != entry["sha256"]:
            raise _invalid("backup_file_mismatch", f"{SQLITE_FILE} changed while it was restored")
        try:
            connection = sqlite3.connect(f"{self.staged.as_uri()}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise _unverified("restore_database_unreadable", f"{SQLITE_FILE}: {exc}") from None
        try:
            return _check_restored_chain(_sqlite_cursor(connection), manifest)
        except sqlite3.DatabaseError as exc:
            raise _unverified("restore_database_unreadable", f"{SQLITE_FILE}: {exc}") from None
        finally:
            connection.close()

    def commit(self) -> None:
        # The old database and its WAL go aside together: a new file beside an old WAL
        # would be read through that WAL.
        for suffix in self._COMPANIONS:
            current = Path(f"{self.path}{suffix}")
            if current.exists():
                aside = self.path.with_name(f".{self.path.name}{suffix}.previous-{self.token}")
                os.rename(current, aside)
                self.aside.append((current, aside))
        try:
            os.rename(self.staged, self.path)
        except BaseException:
            self._put_back()
            raise

    def _put_back(self) -> None:
        for current, aside in reversed(self.aside):
            os.rename(aside, current)
        self.aside = []

    def abort(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.staged.unlink()

    def cleanup(self) -> None:
        self.abort()
        for _, aside in self.aside:
            with contextlib.suppress(FileNotFoundError):
                aside.unlink()


class _CopyData:
    """The data lines of one COPY block of pg_restore's script, read up to its ``\\.`` line."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.ended = False

    def read(self, _size: int = -1) -> bytes:
        if self.ended:
            return b""
        line = self.stream.readline()
        if not line:
            raise BackupError("database_restore_failed", "pg_restore ended inside a COPY block")
        if line in (b"\\.\n", b"\\.\r\n"):
            self.ended = True
            return b""
        return line

    readline = read


class _PendingPostgresql:
    """The dump replayed into the configured database in one open transaction."""

    def __init__(self, config: Config):
        self.config = config
        self.connection: Any = None

    def prepare(self, source: Path, manifest: dict, *, force: bool) -> chain.Verdict:
        import psycopg2

        restore = pg_tool("pg_restore")
        self.connection = _pg_connect(self.config)
        cursor = self.connection.cursor()
        try:
            if not force and _holds_data(_pg_cursor(self.connection)):
                # Checked again inside the transaction: nothing appeared since the first check.
                raise _refused(
                    "restore_target_not_empty",
                    "the PostgreSQL database holds data: use --force to replace it",
                )
            cursor.execute("DROP SCHEMA IF EXISTS public CASCADE")
            cursor.execute("CREATE SCHEMA public")
            self._replay(cursor, restore, source / PGDUMP_FILE)
            return _check_restored_chain(_pg_cursor(self.connection), manifest, qualify="public.")
        except psycopg2.Error as exc:
            raise BackupError(
                "database_restore_failed", f"PostgreSQL refused the restore: {str(exc).strip()}"
            ) from None

    def _replay(self, cursor: Any, restore: str, dump: Path) -> None:
        # pg_restore writes the script; it runs here, in this one transaction, so a failure
        # anywhere leaves the database as it was.
        with tempfile.TemporaryFile() as errors:
            process = subprocess.Popen(
                [restore, "--no-owner", "--no-privileges", "--file=-", str(dump)],
                env=_pg_env(self.config),
                stdout=subprocess.PIPE,
                stderr=errors,
            )
            try:
                statements: list[bytes] = []
                for line in process.stdout:
                    if line.startswith((b"\\restrict", b"\\unrestrict")):
                        continue  # psql's guard against scripts from a hostile server
                    if line.startswith(b"\\"):
                        raise BackupError(
                            "database_restore_failed", f"unexpected psql command {line[:40]!r}"
                        )
                    if line.startswith(b"COPY ") and line.rstrip().endswith(b"FROM stdin;"):
                        self._execute(cursor, statements)
                        statements = []
                        cursor.copy_expert(
                            line.decode().rstrip().rstrip(";"), _CopyData(process.stdout)
                        )
                        continue
                    statements.append(line)
                self._execute(cursor, statements)
            finally:
                process.stdout.close()
                code = process.wait()
            if code != 0:
                errors.seek(0)
                raise BackupError(
                    "database_restore_failed",
                    f"pg_restore failed (exit {code}): "
                    + errors.read().decode(errors="replace").strip()[-1500:],
                )

    @staticmethod
    def _execute(cursor: Any, statements: list[bytes]) -> None:
        text = b"".join(statements).decode()
        # psycopg2 refuses a text that is only comments.
        if any(line.strip() and not line.lstrip().startswith("--") for line in text.splitlines()):
            cursor.execute(text)

    def commit(self) -> None:
        self.connection.commit()

    def abort(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.rollback()

    def cleanup(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.close()
            self.connection = None


def restore_backup(
    config: Config,
    source: Path,
    force: bool = False,
    progress: Progress = _silent,
    *,
    ctx: Any = None,
) -> dict[str, Any]:
    """Restore the backup at ``source`` into the installation named by ``config``.

    Verifies the backup first (nothing is written if it does not verify); refuses a target
    that holds data unless ``force``. The database and the blob store are staged, the staged
    audit chain is verified against the manifest's head, then both are swapped in; on any
    failure the target stays as it was. Afterwards the chain is verified as ``animus audit
    verify`` does and ``ops:backup:restored`` is appended to it. Stop the appliance's
    processes first.
    """
    source = Path(source).absolute()
    started = time.monotonic()
    manifest = verify_backup(source, progress)
    verified = time.monotonic()
    backend = backend_of(config)
    if manifest["backend"] != backend:
        raise _refused(
            "restore_backend_mismatch",
            f"the backup holds a {manifest['backend']} database; this installation is "
            f"configured for {backend} (ANIMUS_DATABASE_URL)",
        )
    newest = len(db.available_migrations())
    if manifest["database"]["schema_version"] > newest:
        raise _refused(
            "restore_schema_newer",
            f"the backup's schema version {manifest['database']['schema_version']} is newer "
            f"than this release's {newest}: restore it with the release that made it",
        )
    if not force:
        reason = _target_in_use(config, backend)
        if reason:
            raise _refused("restore_target_not_empty", f"{reason}: use --force to replace it")
    _close_connections_to(config)
    data_dir = config.data_dir
    created_data_dir = not data_dir.exists()
    token = secrets.token_hex(6)
    staging = config.blob_dir.parent / f".restore-{token}"
    staging.mkdir(parents=True)
    blobs = _StagedBlobs(config.blob_dir, staging)
    pending: _PendingSqlite | _PendingPostgresql = (
        _PendingSqlite(config, token) if backend == "sqlite" else _PendingPostgresql(config)
    )
    fsync = config.blob_fsync
    try:
        entries = [e for e in manifest["files"] if e["path"].startswith(BLOB_PREFIX)]
        progress(f"staging {len(entries)} blobs")
        blobs.fill(source, entries, progress)
        progress(f"restoring the {backend} database and checking its audit chain")
        if isinstance(pending, _PendingSqlite):
            staged_verdict = pending.prepare(source, manifest)
        else:
            staged_verdict = pending.prepare(source, manifest, force=force)
        progress(f"  staged audit chain: {staged_verdict}")
        if fsync:
            # On disk before it replaces anything.
            _sync_filesystem(staging)
            if isinstance(pending, _PendingSqlite):
                _sync_filesystem(pending.staged.parent)
        blobs.swap_in()
        try:
            pending.commit()
        except BaseException:
            blobs.undo()
            raise
    except BaseException:
        pending.abort()
        if created_data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise
    finally:
        pending.cleanup()
        shutil.rmtree(staging, ignore_errors=True)
    if fsync:  # the renames themselves
        fsync_path(config.blob_dir.parent)
        if isinstance(pending, _PendingSqlite):
            fsync_path(pending.path.parent)
    swapped = time.monotonic()
    verdict = _verify_and_record(config, manifest, source, force, ctx)
    missing_images, unchecked_images = _images_missing_from_registry(config, manifest, progress)
    finished = time.monotonic()
    progress(f"restore complete in {finished - started:.2f} s; audit chain {verdict}")
    schema = manifest["database"]["schema_version"]
    return {
        "source": str(source),
        "backend": backend,
        "schema_version": schema,
        "schema_upgrade_needed": schema < newest,
        "audit_head": manifest["audit_head"],
        "audit_verify": str(verdict),
        "environment_images_missing": missing_images,
        "environment_images_unchecked": unchecked_images,
        "blobs": manifest["blobs"],
        "files": len(manifest["files"]),
        "bytes": sum(e["size"] for e in manifest["files"]),
        "seconds": {
            "verify": round(verified - started, 3),
            "restore": round(swapped - verified, 3),
            "total": round(finished - started, 3),
        },
    }


def _images_missing_from_registry(
    config: Config, manifest: dict, progress: Progress
) -> tuple[list[str], list[str]]:
    """The EnvironmentLock images the registry does not hold (they are not in a backup, and
    Runs pinned to them cannot start until they are pushed again), and those left unchecked
    because the registry did not answer (it is often stopped with the other processes)."""
    from appliance.execution.registry_check import digest_verifier
    from appliance.images.registry import RegistryClient

    images = manifest.get("environment_images") or []
    if not images or not config.registry_url:
        return [], []
    parsed = urlparse(config.registry_url)
    try:
        RegistryClient(parsed.netloc, tls=parsed.scheme == "https").ping()
    except AnimusError as exc:
        progress(
            f"warning: {exc.message}: the {len(images)} pinned environment image(s) were not "
            "checked; once it runs: `animus image verify REGISTRY/REPOSITORY@DIGEST` for each "
            "digest in MANIFEST.json's environment_images"
        )
        return [], list(images)
    verify = digest_verifier(config.registry_url, config.environment_repository)
    missing = [digest for digest in images if verify(digest) is not None]
    for digest in missing:
        progress(f"warning: environment image {digest} is not in the registry: push it again")
    return missing, []


def _same_database(database: Any, config: Config) -> bool:
    if backend_of(config) == "sqlite":
        # ``sqlite:////abs/path`` may have been opened as the path ``//abs/path``.
        opened = Path("/" + str(Path(database.database).absolute()).lstrip("/"))
        return db.dialect(database) == "sqlite" and opened == _sqlite_path(config).absolute()
    params = _pg_params(config)
    connect = getattr(database, "connect_params", {})
    return (
        db.dialect(database) == "postgresql"
        and database.database == params["dbname"]
        and connect.get("host") == params["host"]
        and connect.get("port") == params["port"]
    )


def _close_connections_to(config: Config) -> None:
    # A pooled connection opened before the swap would keep reading the old SQLite file.
    current = db.database.obj
    if current is None or not _same_database(current, config):
        return
    with contextlib.suppress(Exception):
        if not current.is_closed():
            current.close()
    close_all = getattr(current, "close_all", None)
    if close_all is not None:
        close_all()


@contextlib.contextmanager
def _bound_to(config: Config) -> Iterator[None]:
    """The models bound to ``config``'s database while the block runs.

    A process already bound to it (the CLI after its first use, the upgrade path, a running
    server) keeps its binding untouched. A process bound to another database is rebound for
    the block and gets its binding back afterwards; it must not be serving meanwhile.
    """
    current = db.database.obj
    if current is not None and _same_database(current, config):
        yield
        return
    fresh = db.open_database(config.effective_database_url)
    db.bind(fresh)
    try:
        yield
    finally:
        fresh.close_all()
        if current is not None:
            db.bind(current)


def _verify_and_record(
    config: Config, manifest: dict, source: Path, force: bool, ctx: Any
) -> chain.Verdict:

    with _bound_to(config):
        # What `animus audit verify` runs, on the database now in place.
        verdict = audit_log.verify()
        _compare_head(verdict, manifest)
        event = _record(
            config,
            ctx,
            "BACKUP_RESTORED",
            manifest["database"]["installation_id"],
            {
                "source": str(source),
                "backup_created_at": manifest["created_at"],
                "audit_head_seq": manifest["audit_head"]["seq"],
                "audit_head_hash": manifest["audit_head"]["hash"],
                "schema_version": manifest["database"]["schema_version"],
                "forced": force,
            },
        )
        # The chain up to the head is verified above; the new event must extend it.
        extended = chain.verify_chain(
            [(event.seq, None, event.canonical, event.prev_hash, event.hash)],
            verdict.head_hash,
            first_seq=verdict.count + 1,
        )
        if not extended.ok:
            raise _unverified("restore_chain_broken", f"the restore event: {extended}")
        return chain.Verdict(True, verdict.count + 1, event.hash)


def _record(config: Config, ctx: Any, action: str, installation_id: str, payload: dict) -> Any:
    from appliance.audit.actions import Action
    from appliance.domain.context import SYSTEM, Context

    ctx = ctx or Context(principal=SYSTEM, request_id=f"cli_{action.lower()}")
    with _bound_to(config), db.write_transaction():
        return audit_log.record(
            ctx,
            Action[action],
            object_type="installation",
            object_id=installation_id,
            payload=payload,
        )
