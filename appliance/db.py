"""Database binding, write transactions and the migrations runner.

SQLite (WAL, foreign keys on) is the embedded default; PostgreSQL is used when the URL says
so. Schema changes are numbered migrations in ``appliance/migrations/`` with the applied
version recorded in ``schema_migrations``.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote, urlparse

import peewee
from playhouse.pool import PooledPostgresqlDatabase, PooledSqliteDatabase

from appliance import migrations as migrations_package

#: The handle every model is bound to; ``bind()`` points it at a real database.
database = peewee.DatabaseProxy()

# Connections per process; a request waits up to `timeout` seconds for a free one.
_POOL = {"max_connections": 32, "stale_timeout": 300, "timeout": 30}

# PostgreSQL advisory lock keys: one for schema migrations.
_MIGRATION_LOCK_KEY = 0x616E_696D_0001


def open_database(url: str) -> peewee.Database:
    """Open (lazily) the database named by ``url``: ``sqlite:///PATH`` or ``postgresql://…``."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = Path(unquote(parsed.path))
        path.parent.mkdir(parents=True, exist_ok=True)
        # Pooled: closing the last connection to a WAL database checkpoints it, which would
        # cost every request a checkpoint; and opening one costs the pragmas each time.
        return PooledSqliteDatabase(
            str(path),
            pragmas={
                "journal_mode": "wal",
                "foreign_keys": 1,
                # FULL: a committed DatasetVersion or AuditEvent survives a power cut.
                "synchronous": "full",
                "busy_timeout": 30_000,
            },
            check_same_thread=False,
            **_POOL,
        )
    if parsed.scheme in {"postgresql", "postgres"}:
        return PooledPostgresqlDatabase(
            unquote(parsed.path.lstrip("/")),
            user=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
            host=parsed.hostname or None,
            port=parsed.port or None,
            **_POOL,
        )
    raise ValueError(f"unsupported database URL scheme {parsed.scheme!r}")


def bind(db: peewee.Database) -> None:
    database.initialize(db)


def dialect(db: peewee.Database | None = None) -> str:
    db = db or database.obj
    return "postgresql" if isinstance(db, peewee.PostgresqlDatabase) else "sqlite"


@contextlib.contextmanager
def write_transaction() -> Iterator[None]:
    """One unit of work: the change and its audit event commit together or not at all.

    On SQLite the write lock is taken at BEGIN (``IMMEDIATE``) so concurrent writers queue
    instead of failing on a lock upgrade half-way through.
    """
    db = database.obj
    if db.transaction_depth() == 0 and dialect(db) == "sqlite":
        with db.atomic(lock_type="IMMEDIATE"):
            yield
    else:
        with db.atomic():
            yield


# --- migrations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    module: ModuleType

    @property
    def reversible(self) -> bool:
        return hasattr(self.module, "downgrade")


class MigrationError(RuntimeError):
    """A migration cannot be applied or reverted."""


def available_migrations() -> list[Migration]:
    """Every migration module ``mNNNN_name`` in version order."""
    found = []
    for info in pkgutil.iter_modules(migrations_package.__path__):
        if not info.name.startswith("m") or "_" not in info.name:
            continue
        number, _, name = info.name[1:].partition("_")
        if not number.isdigit():
            continue
        module = importlib.import_module(f"{migrations_package.__name__}.{info.name}")
        found.append(Migration(int(number), name, module))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return found


class SchemaEditor:
    """What a migration sees: the dialect and a way to run SQL."""

    def __init__(self, db: peewee.Database):
        self.db = db
        self.dialect = dialect(db)

    def execute(self, sql: str, params: tuple = ()) -> None:
        """Run ``sql``; write placeholders as ``{p}``."""
        if params:
            self.db.execute_sql(sql.replace("{p}", self.db.param), params)
        else:
            # Without parameters the driver must not read '%' in function bodies as one.
            self.db.cursor().execute(sql)

    def script(self, statements: list[str]) -> None:
        for statement in statements:
            self.execute(statement)


def _ensure_version_table(db: peewee.Database) -> None:
    db.execute_sql(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY,"
        " name TEXT NOT NULL,"
        " applied_at TEXT NOT NULL)"
    )


def current_version(db: peewee.Database | None = None) -> int:
    db = db or database.obj
    _ensure_version_table(db)
    row = db.execute_sql("SELECT MAX(version) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


@contextlib.contextmanager
def _migration_lock(db: peewee.Database) -> Iterator[None]:
    # Two processes upgrading at once must not both apply the same migration.
    if dialect(db) == "postgresql":
        db.execute_sql("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK_KEY,))
        try:
            yield
        finally:
            db.execute_sql("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK_KEY,))
    else:
        yield


def _transaction(db: peewee.Database):
    return db.atomic(lock_type="IMMEDIATE") if dialect(db) == "sqlite" else db.atomic()


def upgrade(db: peewee.Database | None = None, target: int | None = None, log=print) -> int:
    """Apply every pending migration up to ``target`` (default: the newest). Returns the version."""
    db = db or database.obj
    migrations = available_migrations()
    target = migrations[-1].version if target is None else target
    if target > len(migrations):
        raise MigrationError(f"no migration {target}; the newest is {len(migrations)}")
    editor = SchemaEditor(db)
    with _migration_lock(db):
        _ensure_version_table(db)
        for migration in migrations:
            if migration.version > target:
                break
            with _transaction(db):
                if migration.version <= current_version(db):
                    continue
                log(f"applying {migration.version:04d} {migration.name}")
                migration.module.upgrade(editor)
                p = db.param
                db.execute_sql(
                    f"INSERT INTO schema_migrations (version, name, applied_at) VALUES ({p}, {p}, {p})",
                    (migration.version, migration.name, _now()),
                )
    return current_version(db)


def downgrade_problem(version: int, target: int) -> str | None:
    """Why this release cannot revert the schema from VERSION to TARGET, or None if it can:
    a target out of range, a schema newer than its migrations, an irreversible migration."""
    migrations = {m.version: m for m in available_migrations()}
    if target < 0 or target > version:
        return f"cannot downgrade from {version} to {target}"
    if version > len(migrations):
        return (
            f"the database is at schema {version}, newer than this release knows "
            f"({len(migrations)}): revert it with the newest release"
        )
    blocked = [v for v in range(target + 1, version + 1) if not migrations[v].reversible]
    if blocked:
        newest = migrations[blocked[-1]]
        return (
            f"migration {newest.version:04d} ({newest.name}) cannot be reverted: "
            f"{newest.module.IRREVERSIBLE_BECAUSE}"
        )
    return None


def downgrade(target: int, db: peewee.Database | None = None, log=print) -> int:
    """Revert migrations above ``target``, newest first. Irreversible ones refuse."""
    db = db or database.obj
    migrations = {m.version: m for m in available_migrations()}
    editor = SchemaEditor(db)
    with _migration_lock(db):
        version = current_version(db)
        problem = downgrade_problem(version, target)
        if problem:
            raise MigrationError(problem)
        for number in range(version, target, -1):
            migration = migrations[number]
            with _transaction(db):
                log(f"reverting {migration.version:04d} {migration.name}")
                migration.module.downgrade(editor)
                db.execute_sql(
                    f"DELETE FROM schema_migrations WHERE version = {db.param}", (number,)
                )
    return current_version(db)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
