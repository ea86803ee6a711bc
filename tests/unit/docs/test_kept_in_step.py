"""Files that restate something else must say the same thing as their source."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from appliance.config import settings_markdown

ROOT = Path(__file__).resolve().parents[3]


def test_configuration_reference_is_current():
    assert (ROOT / "docs" / "configuration.md").read_text() == settings_markdown(), (
        "run: animus config docs > docs/configuration.md"
    )


def test_control_plane_image_pins_the_same_dependencies_as_the_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    image = tomllib.loads((ROOT / "images" / "control-plane" / "image.toml").read_text())
    assert image["python"]["requirements"] == project
    lock = json.loads((ROOT / "images" / "control-plane" / "image.lock.json").read_text())
    locked = {w["name"].lower().replace("_", "-"): w["version"] for w in lock["wheels"]}
    for requirement in project:
        name, _, version = requirement.partition("==")
        assert locked.get(name.lower()) == version, (
            f"{requirement} is not in the control-plane lock: run animus image lock "
            "images/control-plane"
        )
