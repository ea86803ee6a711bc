"""Environment definitions: what `animus env build` accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import AnimusError
from appliance.images.envbuild import load_environment_definition


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "environment.toml"
    path.write_text(text)
    return path


def test_pins_ranges_and_bare_names_are_accepted(tmp_path: Path) -> None:
    definition = load_environment_definition(
        write(
            tmp_path,
            'name = "sk"\npackages = ["scikit-learn==1.9.1", "numpy>=2,<3", "pandas[parquet]"]\n'
            '[hashes]\n"Scikit_Learn" = ["sha256:' + "a" * 64 + '"]\n',
        )
    )
    assert definition.packages == ("scikit-learn==1.9.1", "numpy>=2,<3", "pandas[parquet]")
    assert definition.hashes == {"scikit-learn": ("a" * 64,)}


@pytest.mark.parametrize(
    "package",
    [
        "numpy @ https://example.invalid/numpy.whl",
        "numpy; sys_platform == 'linux'",
        "--index-url=https://example.invalid",
        "-e .",
    ],
)
def test_urls_markers_and_options_are_refused(tmp_path: Path, package: str) -> None:
    with pytest.raises(AnimusError) as caught:
        load_environment_definition(write(tmp_path, f'name = "x"\npackages = ["{package}"]\n'))
    assert caught.value.code == "validation_failed"


def test_empty_package_list_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AnimusError):
        load_environment_definition(write(tmp_path, 'name = "x"\npackages = []\n'))
