"""Layers are deterministic: same entries, same bytes, whatever the host or insertion order."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from appliance.errors import AnimusError
from appliance.images.layer import FIXED_MTIME, LayerBuilder, open_deb_data


def sample(order: list[int]) -> LayerBuilder:
    adds = [
        lambda b: b.add_file("usr/bin/tool", b"#!/bin/sh\n", 0o755),
        lambda b: b.add_symlink("usr/bin/alias", "tool"),
        lambda b: b.add_dir("home/animus", 0o750, 10001, 10001),
        lambda b: b.add_file("etc/motd", b"hello\n"),
    ]
    builder = LayerBuilder()
    for index in order:
        adds[index](builder)
    return builder


def test_same_entries_in_any_order_give_identical_blobs() -> None:
    first, second = sample([0, 1, 2, 3]).build(), sample([3, 2, 1, 0]).build()
    assert first.data == second.data
    assert first.digest == second.digest and first.diff_id == second.diff_id


def test_entries_are_sorted_with_parents_and_normalized_metadata() -> None:
    layer = sample([3, 0, 1, 2]).build()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.data))) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert {"usr", "usr/bin", "etc", "home"} <= set(names)
    for member in members:
        assert member.mtime == FIXED_MTIME
        assert member.uname == member.gname == ""
    owners = {m.name: (m.uid, m.gid) for m in members}
    assert owners["home/animus"] == (10001, 10001)
    assert owners["usr/bin/tool"] == (0, 0)


def test_gzip_header_has_no_time_or_name() -> None:
    data = sample([0]).build().data
    assert data[4:8] == b"\0\0\0\0"  # MTIME
    assert data[3] & 0x08 == 0  # FNAME flag


def test_later_addition_replaces_earlier() -> None:
    builder = LayerBuilder()
    builder.add_file("etc/x", b"one")
    builder.add_file("etc/x", b"two")
    with tarfile.open(fileobj=io.BytesIO(builder.tar_bytes())) as tar:
        assert tar.extractfile("etc/x").read() == b"two"


def test_tree_from_the_host_ignores_umask_and_bytecode(tmp_path: Path) -> None:
    (tmp_path / "pkg/__pycache__").mkdir(parents=True)
    (tmp_path / "pkg/mod.py").write_text("x = 1\n")
    (tmp_path / "pkg/__pycache__/mod.cpython-311.pyc").write_bytes(b"junk")
    (tmp_path / "pkg/mod.py").chmod(0o600)
    builder = LayerBuilder()
    builder.add_tree(tmp_path / "pkg", "/opt/pkg")
    assert builder.paths() == ["opt", "opt/pkg", "opt/pkg/mod.py"]
    with tarfile.open(fileobj=io.BytesIO(builder.tar_bytes())) as tar:
        assert tar.getmember("opt/pkg/mod.py").mode == 0o644


def test_path_with_dotdot_is_refused() -> None:
    with pytest.raises(AnimusError) as caught:
        LayerBuilder().add_file("../etc/passwd", b"")
    assert caught.value.code == "unsafe_layer_entry"


def _deb(path: Path, members: dict[str, bytes]) -> Path:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 1234567890
            info.uname = "builder"
            tar.addfile(info, io.BytesIO(content))
    payload = data.getvalue()

    def member(name: str, body: bytes) -> bytes:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        return header + body + (b"\n" if len(body) % 2 else b"")

    path.write_bytes(
        b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("data.tar.gz", payload)
    )
    return path


def test_deb_data_is_added_with_host_metadata_dropped(tmp_path: Path) -> None:
    deb = _deb(tmp_path / "p.deb", {"./usr/share/p/file": b"content"})
    builder = LayerBuilder()
    with open_deb_data(deb) as data:
        builder.add_tar(data, origin="p")
    with tarfile.open(fileobj=io.BytesIO(builder.tar_bytes())) as tar:
        member = tar.getmember("usr/share/p/file")
        assert (member.mtime, member.uname) == (FIXED_MTIME, "")
        assert tar.extractfile(member).read() == b"content"
