"""An EnvironmentLock with scikit-learn and numpy, built from an offline wheelhouse onto the
runner image, imports both inside runc."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.images.cli import env_group
from appliance.images.packages import _pip_platform_args, cache_dir
from appliance.images.registry import RegistryClient
from appliance.images.unpack import pull_and_unpack

PINS = ["scikit-learn==1.9.1", "numpy==2.4.6"]
PROBE = (
    "import json, numpy, sklearn\n"
    "from sklearn.linear_model import LinearRegression\n"
    "x = numpy.arange(10.0).reshape(-1, 1)\n"
    "model = LinearRegression().fit(x, 3 * x.ravel() + 1)\n"
    "print(json.dumps({'numpy': numpy.__version__, 'sklearn': sklearn.__version__,"
    " 'coef': round(float(model.coef_[0]), 6)}))\n"
)


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """An offline wheelhouse holding the pins and their dependencies, as `animus bundle build`
    would carry across the air gap. Filled once from PyPI into the package cache."""
    path = cache_dir() / "test-wheelhouse"
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--dest",
            str(path),
            *_pip_platform_args("manylinux_2_36_x86_64", "3.11"),
            *PINS,
        ],
        check=True,
    )
    return path


@pytest.mark.slow
def test_environment_with_sklearn_and_numpy_imports_inside_runc(
    pushed_runner: str,
    registry_client: RegistryClient,
    wheelhouse: Path,
    tmp_path: Path,
    run_container,
) -> None:
    definition = tmp_path / "environment.toml"
    definition.write_text(f'name = "sklearn"\npackages = {json.dumps(PINS)}\n')
    args = [
        "build",
        str(definition),
        "--base",
        pushed_runner,
        "--wheelhouse",
        str(wheelhouse),
        "--repository",
        f"{registry_client.registry}/animus/env-sklearn",
        "--json",
    ]
    result = CliRunner().invoke(env_group, args)
    assert result.exit_code == 0, result.output
    lock = json.loads(result.stdout[result.stdout.index("{") :])

    assert re.fullmatch(r"sha256:[0-9a-f]{64}", lock["image_digest"])
    assert lock["image_reference"].endswith("@" + lock["image_digest"])
    versions = {p["name"]: p["version"] for p in lock["packages"]}
    assert versions["numpy"] == "2.4.6" and versions["scikit-learn"] == "1.9.1"
    assert "scipy" in versions  # dependencies are locked too
    assert all(re.fullmatch(r"[0-9a-f]{64}", p["sha256"]) for p in lock["packages"])

    image, rootfs = pull_and_unpack(
        lock["image_reference"], registry_client, cache=tmp_path / "cache"
    )
    proc = run_container(rootfs, image.config, ["-c", PROBE])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"numpy": "2.4.6", "sklearn": "1.9.1", "coef": 3.0}
