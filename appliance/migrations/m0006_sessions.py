"""Server-side sessions of the web UI (DESIGN §8): absolute lifetime, idle timeout, forced
logout, and a limit on parallel sessions per user.

Only a SHA-256 of the session secret is stored: a copy of the database cannot be used to
sign in. Ended sessions keep their row (when and by whom they ended) for the admins' view.

A personal API token issued from a web session records that session (``api_tokens.
session_id``), so a forced logout also revokes the tokens the session minted: a hijacked
session cannot outlive its revocation through a token.

Failed password sign-ins are kept for the throttle (``sign_in_failures``): one row per
failure and throttle key (a digest of the username, or the client address), pruned as
they age out of the window. Shared by every server process.

Also an index on ``runs.source_run_id``: the pages that draw lineage follow reruns and
replays from each run, which without it scans every run of the installation once per run.
"""

from __future__ import annotations

TABLES = [
    """CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL REFERENCES users (id),
        csrf_token TEXT NOT NULL,
        created_at TEXT NOT NULL,
        last_seen_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        remote_addr TEXT NOT NULL DEFAULT '',
        user_agent TEXT NOT NULL DEFAULT '',
        ended_at TEXT,
        ended_by TEXT,
        end_reason TEXT
    )""",
    "CREATE INDEX sessions_user_active ON sessions (user_id, ended_at, created_at)",
    "CREATE INDEX sessions_active ON sessions (ended_at, created_at)",
    "CREATE INDEX runs_source ON runs (source_run_id)",
    "ALTER TABLE api_tokens ADD COLUMN session_id TEXT",
    "CREATE INDEX api_tokens_session ON api_tokens (session_id)",
    """CREATE TABLE sign_in_failures (
        id TEXT PRIMARY KEY,
        throttle_key TEXT NOT NULL,
        failed_at TEXT NOT NULL
    )""",
    "CREATE INDEX sign_in_failures_key ON sign_in_failures (throttle_key, failed_at)",
]


def upgrade(schema) -> None:
    schema.script(TABLES)


def downgrade(schema) -> None:
    schema.execute("DROP TABLE sign_in_failures")
    schema.execute("DROP INDEX api_tokens_session")
    schema.execute("ALTER TABLE api_tokens DROP COLUMN session_id")
    schema.execute("DROP INDEX runs_source")
    schema.execute("DROP TABLE sessions")
