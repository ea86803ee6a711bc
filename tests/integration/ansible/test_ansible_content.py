"""The Ansible content passes Ansible's own syntax check and ansible-lint's production
profile, for both inventories."""

from __future__ import annotations

import subprocess

import pytest

from tests.integration.ansible.playbook import ANSIBLE_DIR, VENV_BIN, ansible_env, run_playbook


@pytest.mark.parametrize("inventory", ["single-host", "kubernetes"])
def test_the_play_passes_the_syntax_check(inventory):
    result = run_playbook(
        ANSIBLE_DIR,
        inventory,
        {"animus_version": "0.1.0", "animus_verification_file": "/nonexistent.json"},
        "--syntax-check",
    )
    assert result.returncode == 0, result.output


def test_ansible_lint_production_profile_passes():
    proc = subprocess.run(
        [str(VENV_BIN / "ansible-lint"), "--profile", "production", "--offline", "--nocolor"],
        cwd=ANSIBLE_DIR,
        env=ansible_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Profile 'production' was required, and it passed" in proc.stdout + proc.stderr


def test_the_play_refuses_to_run_without_the_installer_variables(tmp_path):
    result = run_playbook(ANSIBLE_DIR, "single-host", {"animus_prefix": str(tmp_path)})
    assert result.returncode != 0
    assert "give -e animus_version=V -e animus_verification_file=FILE" in result.output
    assert not (tmp_path / "etc").exists()
