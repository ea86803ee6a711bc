"""The shell entry points stay thin and shellcheck-clean (STYLE: shell stays thin)."""

from __future__ import annotations

import shutil
import subprocess

from tests.unit.docs.test_kept_in_step import ROOT

SCRIPTS = ["install.sh", "test.sh", ".ci/run"]


def test_shell_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is needed (apt-get install shellcheck; .ci/run installs it)"
    result = subprocess.run(
        [shellcheck, *SCRIPTS], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout
