"""Shared fixtures: real databases (SQLite and a PostgreSQL server), a live API server, clients.

Every API test runs against both database backends: the ``database_url`` fixture is
parametrized, and the PostgreSQL server is a real one started on a free loopback port.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from werkzeug.serving import make_server

from appliance import db
from appliance.config import Config

PG_BIN = Path(os.environ.get("ANIMUS_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
BACKENDS = ("sqlite", "postgresql")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    directory: Path
    port: int

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        return subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-qAtc",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout


def _as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for this test session, with a migrated template database."""
    if not (PG_BIN / "initdb").exists():
        pytest.fail(
            f"PostgreSQL server binaries not found in {PG_BIN} (apt-get install postgresql)"
        )
    # Not under pytest's private tmp dir: the server runs as the postgres user and must reach it.
    directory = Path(tempfile.mkdtemp(prefix="animus-pg-"))
    data = directory / "data"
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    subprocess.run(
        _as_postgres(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ]
        ),
        check=True,
        capture_output=True,
    )
    port = free_port()
    options = (
        f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    )
    subprocess.run(
        _as_postgres(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(directory / "log"),
                "-w",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    server = PostgresServer(directory, port)
    try:
        server.psql("CREATE DATABASE animus_template")
        template = db.open_database(server.url("animus_template"))
        db.upgrade(template, log=lambda _line: None)
        template.close_all()
        yield server
    finally:
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            check=False,
            capture_output=True,
        )
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def database_url(backend, tmp_path, request) -> Iterator[str]:
    """A fresh, migrated database on ``backend`` for one test."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'data' / 'animus.db'}"
        database = db.open_database(url)
        db.upgrade(database, log=lambda _line: None)
        database.close_all()
        yield url
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = "t_" + uuid.uuid4().hex[:12]
    server.psql(f"CREATE DATABASE {name} TEMPLATE animus_template")
    yield server.url(name)


@pytest.fixture
def config(tmp_path, database_url) -> Config:
    return Config.from_env(
        {},
        data_dir=str(tmp_path / "data"),
        database_url=database_url,
        blob_fsync="0",
        log_level="WARNING",
    )


@pytest.fixture
def app(config):
    from appliance.app import create_app

    application = create_app(config)
    yield application
    from appliance.audit import signing

    signing.stop_agent(config.gnupg_home)  # a gpg-agent started for export signing
    if not db.database.is_closed():
        db.database.close()
    db.database.obj.close_all()  # the pool's idle connections to this test's database


@dataclass
class LiveServer:
    url: str
    clients: list = field(default_factory=list)

    def client(self, token: str | None = None) -> ApiClient:
        client = ApiClient(self.url, token)
        self.clients.append(client)
        return client


class ApiClient(requests.Session):
    """A requests session that prefixes the server URL and carries a bearer token."""

    def __init__(self, base: str, token: str | None):
        super().__init__()
        self.base = base
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    def request(self, method, url, *args, **kwargs):
        return super().request(method, self.base + url, *args, **kwargs)


@contextlib.contextmanager
def serve_app(app) -> Iterator[LiveServer]:
    """Serve ``app`` over real HTTP on a free loopback port while the block runs."""
    http = make_server("127.0.0.1", 0, app, threaded=True)
    http.daemon_threads = True
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    live = LiveServer(f"http://127.0.0.1:{http.server_port}")
    try:
        yield live
    finally:
        for client in live.clients:
            client.close()  # idle keep-alive connections would hold handler threads
        http.shutdown()
        http.server_close()
        thread.join(5)


@pytest.fixture
def server(app) -> Iterator[LiveServer]:
    """The app served over real HTTP on a free loopback port."""
    with serve_app(app) as live:
        yield live


@pytest.fixture
def bound_db(app):
    """The app's database, connected in this thread for direct setup and inspection."""
    db.database.connect(reuse_if_open=True)
    yield db.database
    if not db.database.is_closed():
        db.database.close()


@dataclass
class Person:
    username: str
    token: str
    api: ApiClient


@pytest.fixture
def make_user(server, bound_db):
    """Create a user (no password) with a one-hour API token and a client acting as them."""
    from appliance.auth import identities
    from appliance.domain.context import SYSTEM, Context

    ctx = Context(SYSTEM, "test-setup")

    def make(username: str, system_role: str | None = None) -> Person:
        user = identities.create_user(ctx, username, None, system_role)
        _, secret = identities.issue_token(ctx, ttl_seconds=3600, user=user)
        return Person(username, secret, server.client(secret))

    return make


@pytest.fixture
def alice(make_user) -> Person:
    return make_user("alice")


@pytest.fixture
def project(alice) -> dict:
    response = alice.api.post("/api/v1/projects", json={"name": "fraud-models"})
    assert response.status_code == 201, response.text
    return response.json()
