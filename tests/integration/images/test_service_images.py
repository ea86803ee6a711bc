"""The control-plane, registry and postgres images build from their locks and start under
runc with the sandbox defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.images.build import build_image
from appliance.images.definition import load_definition
from appliance.images.layout import Layout
from appliance.images.unpack import unpack_image

REPO_ROOT = Path(__file__).resolve().parents[3]

CASES = [
    ("control-plane", None, ["--version"], "gunicorn (version 27.0.1)"),
    (
        "control-plane",
        ["/usr/bin/python3"],
        ["-c", "import flask, peewee, psycopg2, jsonschema, appliance; print('imports ok')"],
        "imports ok",
    ),
    ("registry", None, ["--version"], "2.8"),
    ("postgres", None, ["--version"], "postgres (PostgreSQL) 15."),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, Path] = {}

    def get(name: str) -> tuple[Layout, Path]:
        if name not in cache:
            output = tmp_path_factory.mktemp(f"layout-{name}")
            build_image(load_definition(REPO_ROOT / "images" / name), output)
            cache[name] = output
        layout = Layout(cache[name])
        rootfs = unpack_image(layout, layout.image(), cache[name].parent / f"rootfs-{name}")
        return layout, rootfs

    return get


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "entrypoint", "args", "expected"),
    CASES,
    ids=["control-plane-gunicorn", "control-plane-imports", "registry", "postgres"],
)
def test_service_image_starts_under_runc(
    built, run_container, name: str, entrypoint, args: list[str], expected: str
) -> None:
    layout, rootfs = built(name)
    proc = run_container(rootfs, layout.image().config, args, entrypoint=entrypoint)
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stdout + proc.stderr
