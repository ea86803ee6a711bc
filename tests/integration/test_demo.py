"""The README's first command keeps working: the demo walks the full ML cycle."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import free_port


@pytest.mark.slow
def test_demo_walks_the_full_ml_cycle(tmp_path):
    env = {
        **os.environ,
        "ANIMUS_DATA_DIR": str(tmp_path / "demo"),
        "ANIMUS_BLOB_FSYNC": "0",
        "ANIMUS_LOG_LEVEL": "WARNING",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "demo",
            "--port",
            str(free_port()),
            "--registry-port",
            str(free_port()),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = result.stdout
    assert result.returncode == 0, output[-3000:] + result.stderr[-3000:]
    assert "reproduced: identical" in output
    assert "    OK " in output and "signed by" in output
    final = [line for line in output.splitlines() if line.strip().startswith("OK ")][-1]
    assert "events, head" in final
