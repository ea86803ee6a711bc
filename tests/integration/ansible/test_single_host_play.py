"""The single-host play, run for real against this machine into a temporary prefix.

The release directory is built the way an unpacked bundle looks (``ansible/``, ``images/``
with the runner image's OCI layout, ``MANIFEST.json``) with its ``venv`` being this
checkout's virtualenv. The play starts the real registry, API (gunicorn), scheduler and
runc Data Plane agent under animusctl (start-stop-daemon: this machine has no systemd),
on free loopback ports, and is run twice: the second run must change nothing. Then a
second release is installed over it, as an upgrade.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.integration.ansible.playbook import ANSIBLE_DIR, run_playbook
from tests.integration.conftest import free_port

VERSION = "0.1.0"
UPGRADE_VERSION = "0.2.0"
SERVICES = ("registry", "api", "scheduler", "dataplane")


def make_release(prefix: Path, runner_layout: Path, version: str = VERSION) -> tuple[Path, Path]:
    """PREFIX/releases/VERSION as install.sh leaves it, and the verifier's JSON result."""
    release = prefix / "releases" / version
    (release / "images").mkdir(parents=True)
    (release / "ansible").symlink_to(ANSIBLE_DIR)
    (release / "venv").symlink_to(Path(sys.prefix))
    shutil.copytree(runner_layout, release / "images" / "runner", copy_function=os.link)
    manifest = json.dumps({"product": "animus-datalab", "version": version}).encode()
    (release / "MANIFEST.json").write_bytes(manifest)
    verification = prefix.parent / f"verification-{version}.json"
    verification.write_text(
        json.dumps(
            {
                "status": "ok",
                "version": version,
                "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
                "signer_fingerprint": "A" * 40,
                "files": 1,
                "bytes": len(manifest),
            }
        )
    )
    return release, verification


def animusctl(prefix: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(prefix / "bin" / "animusctl"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def installation(tmp_path, runner_image):
    prefix = tmp_path / "opt-animus"
    release, verification = make_release(prefix, Path(runner_image.layout))
    port, registry_port = free_port(), free_port()
    extra_vars = {
        "animus_prefix": str(prefix),
        "animus_release_dir": str(release),
        "animus_version": VERSION,
        "animus_verification_file": str(verification),
        "animus_port": str(port),
        "animus_registry_port": str(registry_port),
    }
    try:
        yield prefix, release, extra_vars
    finally:
        if (prefix / "bin" / "animusctl").exists():
            animusctl(prefix, "stop")


@pytest.mark.slow
def test_single_host_play_installs_reruns_without_change_and_upgrades(installation, runner_image):
    prefix, release, extra_vars = installation
    ansible_playbook = release / "venv" / "bin" / "ansible-playbook"
    playbook_dir = release / "ansible"

    started = time.monotonic()
    first = run_playbook(playbook_dir, "single-host", extra_vars, ansible_playbook=ansible_playbook)
    first_seconds = time.monotonic() - started
    assert first.returncode == 0, first.output[-6000:]
    assert first.recap()["localhost"]["changed"] > 0

    # The layout of the installation contract.
    assert os.readlink(prefix / "current") == f"releases/{VERSION}"
    assert (prefix / "VERSION").read_text().strip() == VERSION
    settings = dict(
        line.split("=", 1)
        for line in (prefix / "etc" / "animus.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert settings["ANIMUS_DATA_DIR"] == str(prefix / "data")
    assert settings["ANIMUS_DATABASE_URL"] == f"sqlite:///{prefix / 'data' / 'animus.db'}"
    assert stat.S_IMODE((prefix / "etc" / "animus.env").stat().st_mode) == 0o640
    token = prefix / "etc" / "dataplane.token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(token.read_text().strip()) > 20

    # Every service runs under animusctl, with its pidfile and its log.
    status = animusctl(prefix, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    for service in SERVICES:
        assert f"{service}: running (pid " in status.stdout
        pid = int((prefix / "run" / f"{service}.pid").read_text())
        os.kill(pid, 0)
        assert (prefix / "log" / f"{service}.log").exists()

    # The API answers, and it runs the release's code with the installation's data.
    base = f"http://127.0.0.1:{extra_vars['animus_port']}"
    ready = requests.get(f"{base}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"
    assert (prefix / "data" / "animus.db").exists()

    # The runner image is in the registry by the digest of its layout.
    registry = f"http://127.0.0.1:{extra_vars['animus_registry_port']}"
    held = requests.head(
        f"{registry}/v2/animus/runner/manifests/{runner_image.manifest_digest}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        timeout=10,
    )
    assert held.status_code == 200
    assert (prefix / "registry" / "storage").is_dir()  # beside data/, not in it

    # The installation's first audit event is the bundle verification, and the chain holds.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANIMUS_")}
    env.update(settings)
    verify = subprocess.run(
        [str(release / "venv" / "bin" / "animus"), "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    pids = {s: (prefix / "run" / f"{s}.pid").read_text() for s in SERVICES}

    started = time.monotonic()
    second = run_playbook(
        playbook_dir, "single-host", extra_vars, ansible_playbook=ansible_playbook
    )
    second_seconds = time.monotonic() - started
    assert second.returncode == 0, second.output[-6000:]
    recap = second.recap()["localhost"]
    assert recap["changed"] == 0, f"changed on the second run: {second.changed_tasks()}"
    assert recap["failed"] == 0
    # Nothing was restarted either.
    assert pids == {s: (prefix / "run" / f"{s}.pid").read_text() for s in SERVICES}
    print(
        f"first run {first_seconds:.1f} s, second run {second_seconds:.1f} s; second recap: {recap}"
    )

    # An upgrade: a newer release in the same prefix. The play backs up with the running
    # release first, then switches current, keeps the old one as previous and restarts.
    upgrade_release, upgrade_verification = make_release(
        prefix, Path(runner_image.layout), UPGRADE_VERSION
    )
    upgrade_vars = {
        **extra_vars,
        "animus_release_dir": str(upgrade_release),
        "animus_version": UPGRADE_VERSION,
        "animus_verification_file": str(upgrade_verification),
    }
    upgraded = run_playbook(
        upgrade_release / "ansible",
        "single-host",
        upgrade_vars,
        ansible_playbook=upgrade_release / "venv" / "bin" / "ansible-playbook",
    )
    assert upgraded.returncode == 0, upgraded.output[-6000:]
    assert os.readlink(prefix / "current") == f"releases/{UPGRADE_VERSION}"
    assert os.readlink(prefix / "previous") == f"releases/{VERSION}"
    assert (prefix / "VERSION").read_text().strip() == UPGRADE_VERSION
    (backup,) = (prefix / "backups").iterdir()
    assert backup.name.startswith(f"{VERSION}-before-{UPGRADE_VERSION}-")
    assert (backup / "MANIFEST.json").is_file()
    assert pids != {s: (prefix / "run" / f"{s}.pid").read_text() for s in SERVICES}
    assert requests.get(f"{base}/readyz", timeout=10).status_code == 200
    verify = subprocess.run(
        [str(upgrade_release / "venv" / "bin" / "animus"), "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr

    stopped = animusctl(prefix, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert animusctl(prefix, "status").returncode == 3
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{base}/readyz", timeout=5)
