"""The bundle's committed inputs stay in step with their sources."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from appliance.bundle.build import load_bundle_definition
from appliance.bundle.cli import parse_size
from appliance.bundle.requirements import project_dependencies, read_requirements_lock

ROOT = Path(__file__).resolve().parents[3]


def test_requirements_lock_pins_every_project_dependency():
    locked = {
        w.name: w.version for w in read_requirements_lock(ROOT / "bundle" / "requirements.lock")
    }
    for requirement in project_dependencies(ROOT):
        name, _, version = requirement.partition("==")
        assert locked.get(name.lower()) == version, (
            f"{requirement} is not in bundle/requirements.lock: run animus bundle lock"
        )


def test_bundle_definition_names_existing_sources_and_images():
    definition = load_bundle_definition(ROOT)
    for source in definition.files.values():
        assert (ROOT / source).is_file(), source
    for image in definition.images:
        assert (ROOT / "images" / image / "image.toml").is_file(), image


@pytest.mark.parametrize(
    ("text", "size"), [("650M", 650 << 20), ("4G", 4 << 30), ("4GiB", 4 << 30), ("1000", 1000)]
)
def test_split_sizes(text, size):
    assert parse_size(text) == size


def test_a_split_size_must_be_a_positive_size():
    for text in ("0", "big", "-1M"):
        with pytest.raises(click.BadParameter):
            parse_size(text)
