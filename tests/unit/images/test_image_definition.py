"""Image definitions and their committed locks."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import AnimusError
from appliance.images.definition import load_definition
from appliance.images.lock import parse_lock, read_lock, render_lock
from appliance.images.packages import DebianPackage, Wheel, _compatible_platforms

REPO = Path(__file__).resolve().parents[3]
IMAGES = ["runner", "control-plane", "registry", "postgres"]

MINIMAL = """
name = "tiny"
[debian]
packages = ["python3.11"]
[config]
user = "1000:1000"
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "image.toml").write_text(text)
    return tmp_path


@pytest.mark.parametrize("name", IMAGES)
def test_every_committed_lock_matches_its_definition(name: str) -> None:
    """A definition edited without re-locking fails here, not in a late build."""
    definition = load_definition(REPO / "images" / name)
    lock = read_lock(definition)
    assert definition.name == name
    assert lock.debian, "every image is built from pinned Debian packages"
    for package in [*lock.debian, *lock.wheels]:
        assert len(package.sha256) == 64 and package.size > 0


@pytest.mark.parametrize("name", IMAGES)
def test_images_run_as_a_non_root_user(name: str) -> None:
    user = load_definition(REPO / "images" / name).config.user
    assert user.split(":")[0] not in ("0", "root")


def test_runner_has_python_and_a_non_root_user() -> None:
    definition = load_definition(REPO / "images" / "runner")
    names = {p.name for p in read_lock(definition).debian}
    assert {"python3.11", "libpython3.11-stdlib", "libc6"} <= names
    assert definition.links["/usr/bin/python3"] == "python3.11"
    assert any(u.uid >= 1000 for u in definition.users)


def test_root_user_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AnimusError) as caught:
        load_definition(write(tmp_path, MINIMAL.replace("1000:1000", "root")))
    assert caught.value.code == "image_definition_invalid"


def test_unpinned_requirement_is_refused(tmp_path: Path) -> None:
    text = MINIMAL + '[python]\nrequirements = ["flask>=3"]\n'
    with pytest.raises(AnimusError):
        load_definition(write(tmp_path, text.replace("[config]", "[config]")))


def test_files_must_stay_in_the_repository(tmp_path: Path) -> None:
    text = MINIMAL + '[[files]]\nsource = "../secret"\ntarget = "/x"\n'
    with pytest.raises(AnimusError):
        load_definition(write(tmp_path, text))


def test_lock_made_for_other_inputs_is_stale(tmp_path: Path) -> None:
    definition = load_definition(write(tmp_path, MINIMAL))
    definition.lock_path.write_bytes(render_lock("0" * 64, [], []))
    with pytest.raises(AnimusError) as caught:
        read_lock(definition)
    assert caught.value.code == "image_lock_stale"


def test_lock_round_trip_is_stable() -> None:
    deb = DebianPackage("libc6", "2.36", "amd64", "pool/libc6.deb", 10, "a" * 64)
    wheel = Wheel("flask", "3.1.3", "flask-3.1.3-py3-none-any.whl", 5, "b" * 64)
    raw = render_lock("c" * 64, [deb], [wheel])
    lock = parse_lock(raw)
    assert lock.debian == (deb,) and lock.wheels == (wheel,)
    assert render_lock(lock.inputs_sha256, list(lock.debian), list(lock.wheels)) == raw
    assert lock.digest.startswith("sha256:")


def test_manylinux_platform_includes_older_glibc_tags() -> None:
    tags = _compatible_platforms("manylinux_2_36_x86_64")
    assert tags[0] == "manylinux_2_36_x86_64"
    assert {"manylinux_2_28_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
