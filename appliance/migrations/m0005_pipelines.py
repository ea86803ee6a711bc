"""Pipelines (an immutable, validated DAG of steps), their runs, and the state of each step.

A pipeline's spec never changes once stored: the database refuses UPDATE and DELETE on it.
A pipeline run's steps move ``pending → running → succeeded | failed``, or ``pending →
stopped`` when a step they depend on failed; each running step points at an ordinary Run.
"""

from __future__ import annotations

TABLES = [
    """CREATE TABLE pipelines (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects (id),
        name TEXT NOT NULL,
        spec TEXT NOT NULL,
        digest TEXT NOT NULL,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        UNIQUE (project_id, name),
        UNIQUE (project_id, id)
    )""",
    """CREATE TABLE pipeline_runs (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects (id),
        pipeline_id TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
        source_pipeline_run_id TEXT,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        finished_at TEXT,
        UNIQUE (project_id, id),
        FOREIGN KEY (project_id, pipeline_id) REFERENCES pipelines (project_id, id),
        FOREIGN KEY (project_id, source_pipeline_run_id) REFERENCES pipeline_runs (project_id, id)
    )""",
    "CREATE INDEX pipeline_runs_state ON pipeline_runs (state, id)",
    "CREATE INDEX pipeline_runs_pipeline ON pipeline_runs (pipeline_id, id)",
    """CREATE TABLE pipeline_steps (
        pipeline_run_id TEXT NOT NULL REFERENCES pipeline_runs (id),
        name TEXT NOT NULL,
        position INTEGER NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('pending', 'running', 'succeeded', 'failed', 'stopped')),
        run_id TEXT REFERENCES runs (id),
        reused BOOLEAN NOT NULL DEFAULT FALSE,
        input_digest TEXT,
        reason TEXT,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (pipeline_run_id, name)
    )""",
    "CREATE INDEX pipeline_steps_run ON pipeline_steps (run_id)",
]


def _triggers(dialect: str) -> list[str]:
    if dialect == "postgresql":
        return [
            "CREATE TRIGGER pipelines_immutable BEFORE UPDATE OR DELETE ON pipelines "
            "FOR EACH ROW EXECUTE FUNCTION animus_refuse_change()",
            "CREATE TRIGGER pipelines_no_truncate BEFORE TRUNCATE ON pipelines "
            "FOR EACH STATEMENT EXECUTE FUNCTION animus_refuse_change()",
        ]
    return [
        f"CREATE TRIGGER pipelines_no_{op.lower()} BEFORE {op} ON pipelines "
        f"BEGIN SELECT RAISE(ABORT, 'animus: {op} on pipelines refused: "
        "the record is immutable'); END"
        for op in ("UPDATE", "DELETE")
    ]


def upgrade(schema) -> None:
    schema.script(TABLES)
    schema.script(_triggers(schema.dialect))


def downgrade(schema) -> None:
    for table in ("pipeline_steps", "pipeline_runs", "pipelines"):
        schema.execute(f"DROP TABLE {table}")
