"""Models, their versions registered from a Run's artifact, and signed export packages.

A ModelVersion's stage changes (registered → approved | rejected → exported), but what it was
registered from never does: the database refuses an UPDATE of those columns and any DELETE.
Export packages are immutable records like artifacts.
"""

from __future__ import annotations

#: The columns of model_versions fixed at registration.
REGISTERED_COLUMNS = (
    "project_id",
    "model_id",
    "number",
    "source_run_id",
    "artifact_id",
    "artifact_path",
    "artifact_sha256",
    "artifact_size",
    "metrics",
    "created_at",
    "created_by",
)

TABLES = [
    # Versions reference artifacts with (project_id, id): a cross-project reference cannot exist.
    "CREATE UNIQUE INDEX artifacts_project_id ON artifacts (project_id, id)",
    """CREATE TABLE models (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects (id),
        name TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        UNIQUE (project_id, name),
        UNIQUE (project_id, id)
    )""",
    """CREATE TABLE model_versions (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects (id),
        model_id TEXT NOT NULL,
        number INTEGER NOT NULL,
        stage TEXT NOT NULL CHECK (stage IN ('registered', 'approved', 'rejected', 'exported')),
        source_run_id TEXT NOT NULL,
        artifact_id TEXT NOT NULL,
        artifact_path TEXT NOT NULL,
        artifact_sha256 TEXT NOT NULL,
        artifact_size BIGINT NOT NULL,
        metrics TEXT NOT NULL,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        decided_at TEXT,
        decided_by TEXT,
        decision_reason TEXT,
        exported_at TEXT,
        UNIQUE (model_id, number),
        UNIQUE (project_id, id),
        FOREIGN KEY (project_id, model_id) REFERENCES models (project_id, id),
        FOREIGN KEY (project_id, source_run_id) REFERENCES runs (project_id, id),
        FOREIGN KEY (project_id, artifact_id) REFERENCES artifacts (project_id, id)
    )""",
    "CREATE INDEX model_versions_artifact ON model_versions (artifact_id)",
    "CREATE INDEX model_versions_run ON model_versions (source_run_id)",
    """CREATE TABLE model_exports (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects (id),
        model_version_id TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size BIGINT NOT NULL,
        manifest_sha256 TEXT NOT NULL,
        signing_fingerprint TEXT NOT NULL,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        FOREIGN KEY (project_id, model_version_id) REFERENCES model_versions (project_id, id)
    )""",
    "CREATE INDEX model_exports_version ON model_exports (model_version_id, id)",
]


def _triggers(dialect: str) -> list[str]:
    fixed = ", ".join(REGISTERED_COLUMNS)
    if dialect == "postgresql":
        return [
            "CREATE TRIGGER model_exports_immutable BEFORE UPDATE OR DELETE ON model_exports "
            "FOR EACH ROW EXECUTE FUNCTION animus_refuse_change()",
            "CREATE TRIGGER model_exports_no_truncate BEFORE TRUNCATE ON model_exports "
            "FOR EACH STATEMENT EXECUTE FUNCTION animus_refuse_change()",
            f"CREATE TRIGGER model_versions_registered BEFORE UPDATE OF {fixed} "
            "ON model_versions FOR EACH ROW EXECUTE FUNCTION animus_refuse_change()",
            "CREATE TRIGGER model_versions_no_delete BEFORE DELETE ON model_versions "
            "FOR EACH ROW EXECUTE FUNCTION animus_refuse_change()",
            "CREATE TRIGGER model_versions_no_truncate BEFORE TRUNCATE ON model_versions "
            "FOR EACH STATEMENT EXECUTE FUNCTION animus_refuse_change()",
        ]

    def refuse(name: str, event: str, table: str) -> str:
        return (
            f"CREATE TRIGGER {name} BEFORE {event} ON {table} "
            f"BEGIN SELECT RAISE(ABORT, 'animus: {event.split()[0]} on {table} refused: "
            "the record is immutable'); END"
        )

    return [
        refuse("model_exports_no_update", "UPDATE", "model_exports"),
        refuse("model_exports_no_delete", "DELETE", "model_exports"),
        refuse("model_versions_registered", f"UPDATE OF {fixed}", "model_versions"),
        refuse("model_versions_no_delete", "DELETE", "model_versions"),
    ]


def upgrade(schema) -> None:
    schema.script(TABLES)
    schema.script(_triggers(schema.dialect))


def downgrade(schema) -> None:
    for table in ("model_exports", "model_versions", "models"):
        schema.execute(f"DROP TABLE {table}")
    schema.execute("DROP INDEX artifacts_project_id")
