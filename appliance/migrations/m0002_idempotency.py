"""Remembered responses for `Idempotency-Key` on creating requests (DESIGN §11)."""

from __future__ import annotations


def upgrade(schema) -> None:
    schema.execute(
        """CREATE TABLE idempotency_records (
            principal TEXT NOT NULL,
            key TEXT NOT NULL,
            method TEXT NOT NULL,
            path TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            status INTEGER NOT NULL,
            body TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (principal, key)
        )"""
    )


def downgrade(schema) -> None:
    schema.execute("DROP TABLE idempotency_records")
