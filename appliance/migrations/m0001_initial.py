"""The initial schema: projects, identities, datasets, code, environments, policies, audit.

Immutable records (DESIGN §2.5) and the audit log (§2.4) get triggers that refuse UPDATE and
DELETE inside the database itself, so code that forgets the rule — or a person with a SQL
prompt — cannot change history without first dropping a trigger.
"""

from __future__ import annotations

import secrets

IRREVERSIBLE_BECAUSE = "it creates the audit log, which is never dropped"

IMMUTABLE_TABLES = (
    "audit_events",
    "dataset_versions",
    "dataset_files",
    "code_refs",
    "environment_locks",
    "policy_snapshots",
)

TABLES = [
    """CREATE TABLE system_settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    """CREATE TABLE users (
        id TEXT PRIMARY KEY,
        username TEXT NOT NULL UNIQUE,
        password_hash TEXT,
        system_role TEXT CHECK (system_role IN ('admin', 'auditor')),
        is_active BOOLEAN NOT NULL DEFAULT TRUE,
        created_at TEXT NOT NULL
    )""",
    """CREATE TABLE projects (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        description TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL CHECK (state IN ('active', 'archived')),
        policy TEXT NOT NULL,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        archived_at TEXT
    )""",
    """CREATE TABLE service_accounts (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects (id),
        name TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        UNIQUE (project_id, name),
        UNIQUE (project_id, id)
    )""",
    """CREATE TABLE role_bindings (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects (id),
        user_id TEXT REFERENCES users (id),
        service_account_id TEXT,
        role TEXT NOT NULL CHECK (role IN ('viewer', 'editor', 'admin')),
        created_at TEXT NOT NULL,
        CHECK ((user_id IS NULL) <> (service_account_id IS NULL)),
        FOREIGN KEY (project_id, service_account_id) REFERENCES service_accounts (project_id, id),
        UNIQUE (project_id, user_id),
        UNIQUE (project_id, service_account_id)
    )""",
    """CREATE TABLE api_tokens (
        id TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,
        user_id TEXT REFERENCES users (id),
        service_account_id TEXT REFERENCES service_accounts (id),
        name TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        revoked_at TEXT,
        CHECK ((user_id IS NULL) <> (service_account_id IS NULL))
    )""",
    """CREATE TABLE datasets (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects (id),
        name TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        UNIQUE (project_id, name),
        UNIQUE (project_id, id)
    )""",
    # The composite foreign keys make a cross-project reference impossible in the database
    # itself, not only in code.
    """CREATE TABLE dataset_versions (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects (id),
        dataset_id TEXT NOT NULL,
        number INTEGER NOT NULL,
        digest TEXT NOT NULL,
        parent_id TEXT,
        file_count BIGINT NOT NULL,
        total_size BIGINT NOT NULL,
        message TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        UNIQUE (dataset_id, number),
        UNIQUE (project_id, id),
        FOREIGN KEY (project_id, dataset_id) REFERENCES datasets (project_id, id),
        FOREIGN KEY (project_id, parent_id) REFERENCES dataset_versions (project_id, id)
    )""",
    """CREATE TABLE dataset_files (
        version_id TEXT NOT NULL REFERENCES dataset_versions (id),
        path TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size BIGINT NOT NULL,
        PRIMARY KEY (version_id, path)
    )""",
    "CREATE INDEX dataset_files_sha256 ON dataset_files (sha256)",
    """CREATE TABLE code_refs (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects (id),
        repo_url TEXT NOT NULL,
        commit_sha TEXT,
        ref TEXT,
        path TEXT NOT NULL DEFAULT '',
        production_ready BOOLEAN NOT NULL,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        CHECK ((commit_sha IS NULL) <> (ref IS NULL))
    )""",
    """CREATE TABLE environment_definitions (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects (id),
        name TEXT NOT NULL,
        base_image TEXT NOT NULL,
        packages TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        UNIQUE (project_id, name),
        UNIQUE (project_id, id)
    )""",
    """CREATE TABLE environment_locks (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects (id),
        environment_id TEXT NOT NULL,
        image_digest TEXT NOT NULL,
        packages TEXT NOT NULL,
        digest TEXT NOT NULL,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        FOREIGN KEY (project_id, environment_id)
            REFERENCES environment_definitions (project_id, id)
    )""",
    """CREATE TABLE policy_snapshots (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects (id),
        policy TEXT NOT NULL,
        digest TEXT NOT NULL,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL
    )""",
    # No foreign keys: the audit log must outlive and stand apart from what it describes.
    """CREATE TABLE audit_events (
        seq BIGINT PRIMARY KEY,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        project_id TEXT,
        object_type TEXT NOT NULL,
        object_id TEXT NOT NULL,
        request_id TEXT NOT NULL,
        payload TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        canonical TEXT NOT NULL
    )""",
    "CREATE INDEX audit_events_project ON audit_events (project_id, seq)",
]


def _immutability_triggers(dialect: str) -> list[str]:
    statements = []
    if dialect == "postgresql":
        statements.append(
            """CREATE OR REPLACE FUNCTION animus_refuse_change() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'animus: % on % refused: the record is immutable',
                    TG_OP, TG_TABLE_NAME USING ERRCODE = 'restrict_violation';
            END
            $$"""
        )
        for table in IMMUTABLE_TABLES:
            statements.append(
                f"CREATE TRIGGER {table}_immutable BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION animus_refuse_change()"
            )
            statements.append(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION animus_refuse_change()"
            )
    else:
        for table in IMMUTABLE_TABLES:
            for op in ("UPDATE", "DELETE"):
                statements.append(
                    f"CREATE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, 'animus: {op} on {table} refused: "
                    "the record is immutable'); END"
                )
    return statements


def upgrade(schema) -> None:
    schema.script(TABLES)
    schema.script(_immutability_triggers(schema.dialect))
    # The installation id seeds the audit chain's genesis hash; it never changes.
    schema.execute(
        "INSERT INTO system_settings (key, value) VALUES ({p}, {p})",
        ("installation_id", "inst_" + secrets.token_hex(16)),
    )
