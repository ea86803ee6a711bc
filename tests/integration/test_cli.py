"""The `animus` command line against real databases: migrations, users, tokens, verify."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests

from appliance import db


def animus(config, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "ANIMUS_DATA_DIR": str(config.data_dir),
        "ANIMUS_DATABASE_URL": config.database_url,
        "ANIMUS_LOG_LEVEL": "WARNING",
    }
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_downgrade_and_upgrade_round_trip(config):
    newest = len(db.available_migrations())
    assert (
        animus(config, "db", "status").stdout.strip()
        == f"schema version {newest} (newest {newest})"
    )
    down = animus(config, "db", "downgrade", "1")
    assert down.returncode == 0, down.stderr
    assert "reverting 0002 idempotency" in down.stdout
    status = animus(config, "db", "status")
    assert status.returncode == 1 and "schema version 1" in status.stdout
    refused = animus(config, "audit", "verify")
    assert refused.returncode == 1 and "animus db upgrade" in refused.stderr
    never = animus(config, "db", "downgrade", "0")
    assert never.returncode == 1 and "audit log" in never.stderr
    up = animus(config, "db", "upgrade")
    assert up.returncode == 0 and f"schema at version {newest}" in up.stdout


def test_bootstrap_user_token_and_verify(config, server):
    created = animus(
        config,
        "admin",
        "create-user",
        "root",
        "--system-admin",
        "--password-stdin",
        stdin="a long enough password\n",
    )
    assert created.returncode == 0, created.stderr
    duplicate = animus(
        config, "admin", "create-user", "root", "--password-stdin", stdin="a long enough password\n"
    )
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr
    issued = animus(config, "token", "create", "--user", "root", "--ttl", "2h")
    assert issued.returncode == 0
    token = issued.stdout.strip()
    assert token.startswith("anm_") and "\n" not in token  # prints only the token
    me = requests.get(
        server.url + "/api/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert me.json()["actor"] == "user:root" and me.json()["system_role"] == "admin"
    bad_ttl = animus(config, "token", "create", "--user", "root", "--ttl", "soon")
    assert bad_ttl.returncode == 2 and "--ttl" in bad_ttl.stderr
    nobody = animus(config, "token", "create", "--user", "nobody")
    assert nobody.returncode == 1 and "no user 'nobody'" in nobody.stderr
    verified = animus(config, "audit", "verify")
    assert verified.returncode == 0 and verified.stdout.startswith("OK 2 events, head ")
    assert "Traceback" not in verified.stderr


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_bad_configuration_is_a_clear_error(config):
    env = {
        **os.environ,
        "ANIMUS_DATABASE_URL": "mysql://x",
        "ANIMUS_DATA_DIR": str(config.data_dir),
    }
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "ANIMUS_DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_explains_every_command():
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "--help"], capture_output=True, text=True, timeout=60
    )
    for command in ("serve", "db", "admin", "token", "audit", "config"):
        assert command in result.stdout
