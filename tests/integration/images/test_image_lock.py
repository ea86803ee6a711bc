"""`animus image lock` against the real package sources (apt lists, PyPI), then a build."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

from click.testing import CliRunner

from appliance.images.cli import image_group
from appliance.images.layout import Layout

DEFINITION = """
name = "tiny"
[debian]
packages = ["zlib1g"]
[python]
requirements = ["six==1.16.0"]
[[users]]
name = "app"
uid = 2000
home = "/home/app"
[config]
user = "2000:2000"
entrypoint = ["/bin/true"]
"""


def test_lock_pins_debian_and_wheels_then_build_installs_them(tmp_path: Path) -> None:
    images = tmp_path / "repo" / "images" / "tiny"
    images.mkdir(parents=True)
    (images / "image.toml").write_text(DEFINITION)
    runner = CliRunner()

    locked = runner.invoke(image_group, ["lock", str(images)])
    assert locked.exit_code == 0, locked.output
    lock = json.loads((images / "image.lock.json").read_text())
    assert [p["name"] for p in lock["debian"]] == sorted(p["name"] for p in lock["debian"])
    assert "zlib1g" in {p["name"] for p in lock["debian"]}
    assert lock["wheels"] == [
        {
            "filename": "six-1.16.0-py2.py3-none-any.whl",
            "name": "six",
            "sha256": "8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254",
            "size": 11053,
            "version": "1.16.0",
        }
    ]

    built = runner.invoke(image_group, ["build", str(images), "--output", str(tmp_path / "o")])
    assert built.exit_code == 0, built.output
    image = Layout(tmp_path / "o").image()
    wheel_layer = image.manifest["layers"][1]["digest"]
    raw = gzip.decompress(Layout(tmp_path / "o").read_blob(wheel_layer))
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        names = set(tar.getnames())
    assert "usr/local/lib/python3.11/dist-packages/six.py" in names
    assert "usr/local/lib/python3.11/dist-packages/six-1.16.0.dist-info/RECORD" in names
