"""Backup and restore against both database backends: a source installation with data (the
shared ``config``/``server`` fixtures) and an empty target installation to restore into."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from appliance import db
from appliance.config import Config
from appliance.demo import tar_of


def upload_version(person, project: dict, dataset_id: str, files: dict[str, bytes]) -> dict:
    response = person.api.post(
        f"/api/v1/projects/{project['id']}/datasets/{dataset_id}/versions",
        data=tar_of(files),
        headers={"Content-Type": "application/x-tar"},
    )
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture
def dataset(alice, project) -> dict:
    response = alice.api.post(
        f"/api/v1/projects/{project['id']}/datasets", json={"name": "transactions"}
    )
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture
def filled(alice, project, dataset) -> dict[str, bytes]:
    """Two dataset versions in the source installation; returns every file's content."""
    files = {"rows.csv": b"a,b\n1,2\n", "big.bin": os.urandom(300_000)}
    upload_version(alice, project, dataset["id"], files)
    more = {"rows.csv": b"a,b\n1,2\n3,4\n", "notes.txt": b"second version\n"}
    upload_version(alice, project, dataset["id"], more)
    return {hashlib.sha256(v).hexdigest(): v for v in [*files.values(), *more.values()]}


@pytest.fixture
def target_config(backend, tmp_path, request) -> Config:
    """An installation that holds nothing yet: a new data dir and an empty database."""
    data_dir = tmp_path / "restored"
    if backend == "sqlite":
        url = ""
    else:
        server = request.getfixturevalue("postgres_server")
        name = "r_" + uuid.uuid4().hex[:12]
        server.psql(f"CREATE DATABASE {name}")
        url = server.url(name)
    return Config.from_env(
        {}, data_dir=str(data_dir), database_url=url, blob_fsync="0", log_level="WARNING"
    )


def table_count(config: Config, request) -> int:
    """Tables in the configured database (0 for a missing SQLite file)."""
    if not config.database_url:
        path = config.data_dir / "animus.db"
        if not path.exists():
            return 0
        import sqlite3

        with sqlite3.connect(path) as connection:
            return connection.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
            ).fetchone()[0]
    server = request.getfixturevalue("postgres_server")
    name = config.database_url.rsplit("/", 1)[1]
    return int(
        server.psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", name).strip()
    )


def animus(config: Config, *args: str) -> subprocess.CompletedProcess:
    """Run ``animus ARGS`` as a separate process on ``config``'s installation."""
    env = {
        **os.environ,
        "ANIMUS_DATA_DIR": str(config.data_dir),
        "ANIMUS_DATABASE_URL": config.database_url,
        "ANIMUS_BLOB_FSYNC": "0",
        "ANIMUS_LOG_LEVEL": "WARNING",
    }
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


class Bound:
    """The models bound to another installation's database while the block runs."""

    def __init__(self, config: Config):
        self.config = config

    def __enter__(self):
        self.previous = db.database.obj
        self.database = db.open_database(self.config.effective_database_url)
        db.bind(self.database)
        return self.database

    def __exit__(self, *exc_info):
        self.database.close_all()
        if self.previous is not None:
            db.bind(self.previous)


def blob_files(config: Config) -> dict[str, bytes]:
    root = Path(config.blob_dir) / "sha256"
    return {p.name: p.read_bytes() for p in root.glob("*/*")} if root.exists() else {}
