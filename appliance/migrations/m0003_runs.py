"""Runs, their frozen execution snapshots, metrics and artifacts, and registered Data Planes."""

from __future__ import annotations

IMMUTABLE = ("execution_snapshots", "artifacts", "run_approvals")

TABLES = [
    # Runs reference these with (project_id, id) so a cross-project reference cannot exist.
    "CREATE UNIQUE INDEX code_refs_project_id ON code_refs (project_id, id)",
    "CREATE UNIQUE INDEX environment_locks_project_id ON environment_locks (project_id, id)",
    """CREATE TABLE data_planes (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        token_hash TEXT NOT NULL UNIQUE,
        backend TEXT NOT NULL,
        created_at TEXT NOT NULL,
        last_seen_at TEXT,
        revoked_at TEXT
    )""",
    """CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects (id),
        state TEXT NOT NULL CHECK (state IN ('created', 'queued', 'planned', 'running',
            'succeeded', 'failed', 'canceled', 'unknown', 'reconciling')),
        production BOOLEAN NOT NULL,
        code_ref_id TEXT NOT NULL,
        environment_lock_id TEXT NOT NULL,
        inputs TEXT NOT NULL,
        command TEXT NOT NULL,
        parameters TEXT NOT NULL,
        env TEXT NOT NULL,
        secrets TEXT NOT NULL,
        resources TEXT,
        limitations TEXT NOT NULL,
        source_run_id TEXT,
        source_kind TEXT CHECK (source_kind IN ('rerun', 'replay', 'retry')),
        policy_snapshot_id TEXT,
        snapshot_id TEXT,
        data_plane_id TEXT,
        lease_expires_at TEXT,
        cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
        exit_code INTEGER,
        reason TEXT,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        queued_at TEXT,
        planned_at TEXT,
        started_at TEXT,
        finished_at TEXT,
        log_size BIGINT NOT NULL DEFAULT 0,
        UNIQUE (project_id, id),
        FOREIGN KEY (project_id, code_ref_id) REFERENCES code_refs (project_id, id),
        FOREIGN KEY (project_id, environment_lock_id)
            REFERENCES environment_locks (project_id, id),
        FOREIGN KEY (project_id, source_run_id) REFERENCES runs (project_id, id)
    )""",
    "CREATE INDEX runs_project_state ON runs (project_id, state, id)",
    "CREATE INDEX runs_state ON runs (state, id)",
    """CREATE TABLE execution_snapshots (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects (id),
        run_id TEXT NOT NULL UNIQUE REFERENCES runs (id),
        snapshot TEXT NOT NULL,
        digest TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    """CREATE TABLE run_metrics (
        run_id TEXT NOT NULL REFERENCES runs (id),
        seq INTEGER NOT NULL,
        name TEXT NOT NULL,
        value DOUBLE PRECISION NOT NULL,
        step BIGINT,
        at TEXT,
        PRIMARY KEY (run_id, seq)
    )""",
    """CREATE TABLE run_log_chunks (
        run_id TEXT NOT NULL REFERENCES runs (id),
        "offset" BIGINT NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (run_id, "offset")
    )""",
    """CREATE TABLE run_approvals (
        run_id TEXT NOT NULL REFERENCES runs (id),
        approver TEXT NOT NULL,
        reason TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (run_id, approver)
    )""",
    """CREATE TABLE artifacts (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects (id),
        run_id TEXT NOT NULL REFERENCES runs (id),
        path TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size BIGINT NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (run_id, path)
    )""",
    "CREATE INDEX artifacts_sha256 ON artifacts (sha256)",
]


def upgrade(schema) -> None:
    schema.script(TABLES)
    for table in IMMUTABLE:
        if schema.dialect == "postgresql":
            schema.script(
                [
                    f"CREATE TRIGGER {table}_immutable BEFORE UPDATE OR DELETE ON {table} "
                    "FOR EACH ROW EXECUTE FUNCTION animus_refuse_change()",
                    f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                    "FOR EACH STATEMENT EXECUTE FUNCTION animus_refuse_change()",
                ]
            )
        else:
            schema.script(
                [
                    f"CREATE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, 'animus: {op} on {table} refused: "
                    "the record is immutable'); END"
                    for op in ("UPDATE", "DELETE")
                ]
            )


def downgrade(schema) -> None:
    for table in (
        "artifacts",
        "run_approvals",
        "run_log_chunks",
        "run_metrics",
        "execution_snapshots",
        "runs",
        "data_planes",
    ):
        schema.execute(f"DROP TABLE {table}")
    schema.execute("DROP INDEX code_refs_project_id")
    schema.execute("DROP INDEX environment_locks_project_id")
