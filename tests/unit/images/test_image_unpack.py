"""Unpacking untrusted layers: every unsafe entry kind is refused; whiteouts are honoured."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from appliance.errors import AnimusError
from appliance.images.unpack import unpack_layer

LAYER = "sha256:" + "ab" * 32


def make_layer(path: Path, entries: list[tuple]) -> Path:
    """Write a tar with ENTRIES: (name, kind, extra) where kind is file/dir/sym/lnk/chr/blk/fifo."""
    with tarfile.open(path, "w") as tar:
        for name, kind, *extra in entries:
            info = tarfile.TarInfo(name)
            data = b""
            if kind == "file":
                data = extra[0] if extra else b"x"
                info.size = len(data)
                info.mode = extra[1] if len(extra) > 1 else 0o644
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, extra[0]
            elif kind == "lnk":
                info.type, info.linkname = tarfile.LNKTYPE, extra[0]
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            elif kind == "blk":
                info.type, info.devmajor, info.devminor = tarfile.BLKTYPE, 8, 0
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    return rootfs


def refused(tmp_path: Path, root: Path, entries: list[tuple]) -> AnimusError:
    layer = make_layer(tmp_path / "layer.tar", entries)
    with pytest.raises(AnimusError) as caught:
        unpack_layer(layer, root, layer=LAYER)
    assert caught.value.code == "unsafe_layer_entry"
    assert caught.value.details["layer"] == LAYER
    return caught.value


def test_parent_traversal_is_refused(tmp_path: Path, root: Path) -> None:
    error = refused(tmp_path, root, [("etc/../../evil", "file")])
    assert "'..'" in error.message
    assert not (tmp_path / "evil").exists()


def test_absolute_path_is_refused(tmp_path: Path, root: Path) -> None:
    error = refused(tmp_path, root, [("/etc/passwd", "file")])
    assert error.details["reason"] == "absolute path"


def test_symlink_climbing_out_of_the_root_is_refused(tmp_path: Path, root: Path) -> None:
    error = refused(tmp_path, root, [("usr/lib/escape", "sym", "../../../etc")])
    assert "outside the root" in error.message


def test_absolute_symlink_target_is_kept_because_it_resolves_inside_the_container(
    tmp_path: Path, root: Path
) -> None:
    unpack_layer(make_layer(tmp_path / "l.tar", [("bin/sh", "sym", "/usr/bin/dash")]), root,
                 layer=LAYER)  # fmt: skip
    assert os.readlink(root / "bin/sh") == "/usr/bin/dash"


def test_writing_through_a_symlink_is_refused(tmp_path: Path, root: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    error = refused(
        tmp_path, root, [("link", "sym", str(outside)), ("link/planted", "file", b"pwned")]
    )
    assert "symbolic link" in error.details["reason"]
    assert not (outside / "planted").exists()


def test_symlink_planted_in_an_earlier_layer_is_not_followed(tmp_path: Path, root: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    unpack_layer(make_layer(tmp_path / "1.tar", [("etc", "sym", str(outside))]), root, layer=LAYER)
    refused(tmp_path, root, [("etc/passwd", "file", b"root::0:0")])
    assert list(outside.iterdir()) == []


def test_hard_link_out_of_the_root_is_refused(tmp_path: Path, root: Path) -> None:
    error = refused(tmp_path, root, [("shadow", "lnk", "../../../etc/shadow")])
    assert "'..'" in error.message


def test_hard_link_to_absolute_path_is_refused(tmp_path: Path, root: Path) -> None:
    refused(tmp_path, root, [("shadow", "lnk", "/etc/shadow")])


@pytest.mark.parametrize("kind", ["chr", "blk"])
def test_device_nodes_are_refused(tmp_path: Path, root: Path, kind: str) -> None:
    error = refused(tmp_path, root, [("dev/mem", kind)])
    assert error.details["reason"] == "device node"


def test_fifo_is_refused(tmp_path: Path, root: Path) -> None:
    assert refused(tmp_path, root, [("run/pipe", "fifo")]).details["reason"] == "special file"


def test_hard_link_inside_the_root_is_unpacked(tmp_path: Path, root: Path) -> None:
    layer = make_layer(tmp_path / "l.tar", [("a", "file", b"same"), ("b", "lnk", "a")])
    unpack_layer(layer, root, layer=LAYER)
    assert os.stat(root / "a").st_ino == os.stat(root / "b").st_ino


def test_setuid_bits_are_stripped(tmp_path: Path, root: Path) -> None:
    layer = make_layer(tmp_path / "l.tar", [("usr/bin/su", "file", b"x", 0o4755)])
    unpack_layer(layer, root, layer=LAYER)
    assert (root / "usr/bin/su").stat().st_mode & 0o7777 == 0o755


def test_whiteout_removes_a_lower_file(tmp_path: Path, root: Path) -> None:
    unpack_layer(make_layer(tmp_path / "1.tar", [("etc/a", "file"), ("etc/b", "file")]), root,
                 layer=LAYER)  # fmt: skip
    unpack_layer(make_layer(tmp_path / "2.tar", [("etc/.wh.a", "file")]), root, layer=LAYER)
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["b"]


def test_opaque_whiteout_hides_lower_content_but_keeps_its_own_layer(
    tmp_path: Path, root: Path
) -> None:
    lower = [("opt/app/old1", "file"), ("opt/app/sub/old2", "file")]
    unpack_layer(make_layer(tmp_path / "1.tar", lower), root, layer=LAYER)
    # The new file sorts before the marker: whiteouts must still only hit lower layers.
    upper = [("opt/app/.new", "file", b"new"), ("opt/app/.wh..wh..opq", "file")]
    unpack_layer(make_layer(tmp_path / "2.tar", upper), root, layer=LAYER)
    assert sorted(p.name for p in (root / "opt/app").iterdir()) == [".new"]


def test_whiteout_climbing_out_is_refused(tmp_path: Path, root: Path) -> None:
    refused(tmp_path, root, [("../.wh.victim", "file")])


def test_a_later_layer_replaces_a_directory_with_a_file(tmp_path: Path, root: Path) -> None:
    unpack_layer(make_layer(tmp_path / "1.tar", [("x/y", "file")]), root, layer=LAYER)
    unpack_layer(make_layer(tmp_path / "2.tar", [("x", "file", b"now a file")]), root, layer=LAYER)
    assert (root / "x").read_bytes() == b"now a file"
