"""The database role's upgrade step, run for real by ansible-playbook on this machine: on a
single host it stops the services and backs up; on Kubernetes, whose blob store this host
cannot read, it refuses until a backup taken in the cluster is named — before it stops
anything."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.ansible.playbook import VENV_BIN, ansible_env

TASKS = Path(__file__).resolve().parents[3] / "ansible" / "roles" / "database" / "tasks"


def run_backup_step(tmp_path: Path, **variables: str) -> tuple[subprocess.CompletedProcess, Path]:
    """backup.yml with the variables detect_upgrade.yml would set, against a stand-in
    animusctl and animus that log their calls; returns the result and the log."""
    log = tmp_path / "calls.log"
    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("animusctl", "animus"):
        tool = tools / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\necho "api: stopped"\n')
        tool.chmod(0o755)
    playbook = tmp_path / "play.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "hosts": "localhost",
                    "connection": "local",
                    "gather_facts": False,
                    "vars": {
                        "ansible_python_interpreter": sys.executable,
                        "animus_ctl": str(tools / "animusctl"),
                        "animus_prefix": str(tmp_path),
                        "animus_version": "2.0.0",
                        "animus_settings": {},
                        "database_backup_root": str(tmp_path / "backups"),
                        "database_installed_version": {
                            "content": base64.b64encode(b"1.0.0\n").decode()
                        },
                        "animus_k8s_upgrade_backup": "",
                        **variables,
                    },
                    "tasks": [{"ansible.builtin.include_tasks": str(TASKS / "backup.yml")}],
                }
            ]
        )
    )
    (tmp_path / "current" / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "current" / "venv" / "bin" / "animus").symlink_to(tools / "animus")
    result = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "-i", "localhost,", str(playbook)],
        capture_output=True,
        text=True,
        env=ansible_env(),
        timeout=300,
        check=False,
    )
    return result, log


def test_a_single_host_upgrade_stops_then_backs_up(tmp_path):
    result, log = run_backup_step(tmp_path, animus_deployment="single_host")
    assert result.returncode == 0, result.stdout[-3000:]
    calls = log.read_text().splitlines()
    assert calls[0] == "animusctl stop"
    assert calls[1].startswith(f"animus backup {tmp_path}/backups/1.0.0-before-2.0.0-")


def test_a_kubernetes_upgrade_without_a_cluster_backup_is_refused_before_anything_stops(
    tmp_path,
):
    result, log = run_backup_step(tmp_path, animus_deployment="kubernetes")
    assert result.returncode != 0
    assert "take the backup in the cluster" in result.stdout
    assert "Nothing was changed" in result.stdout
    assert not log.exists(), "something was stopped or run"


@pytest.mark.parametrize("backup", ["pg_dump animus-1.dump + VolumeSnapshot animus-data-1"])
def test_a_kubernetes_upgrade_naming_its_cluster_backup_goes_on(tmp_path, backup):
    result, log = run_backup_step(
        tmp_path, animus_deployment="kubernetes", animus_k8s_upgrade_backup=backup
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"upgrading after the backup {backup}" in result.stdout
    assert not log.exists(), "the installer host's animus backup cannot read the cluster's blobs"
