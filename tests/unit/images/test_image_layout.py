"""OCI layouts: canonical documents, content addressing, tamper detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.errors import AnimusError
from appliance.images.build import write_image
from appliance.images.layer import LayerBuilder
from appliance.images.layout import Layout, canonical_json, check_digest, digest_of


def small_image(root: Path):
    builder = LayerBuilder()
    builder.add_file("hello", b"world")
    config = {"architecture": "amd64", "os": "linux", "config": {"User": "1000"},
              "rootfs": {"type": "layers", "diff_ids": []}}  # fmt: skip
    layer = builder.build()
    config["rootfs"]["diff_ids"] = [layer.diff_id]
    return write_image(Layout(root), [layer], config, ref_name="small")


def test_canonical_json_is_sorted_and_compact() -> None:
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == b'{"a":[1,{"c":3,"d":2}],"b":1}'


def test_layout_round_trip(tmp_path: Path) -> None:
    built = small_image(tmp_path)
    layout = Layout(tmp_path)
    image = layout.image()
    assert image.manifest_digest == built.manifest_digest == digest_of(image.manifest_bytes)
    assert json.loads((tmp_path / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert layout.image("small").manifest_digest == built.manifest_digest
    for blob in image.blobs:
        layout.verify_blob(blob["digest"])


def test_tampered_blob_is_named(tmp_path: Path) -> None:
    built = small_image(tmp_path)
    layer_digest = built.layers[0]["digest"]
    path = Layout(tmp_path).blob_path(layer_digest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(AnimusError) as caught:
        Layout(tmp_path).verify_blob(layer_digest)
    assert caught.value.code == "blob_digest_mismatch"
    assert layer_digest in caught.value.message


@pytest.mark.parametrize("bad", ["sha256:abc", "md5:" + "0" * 32, "sha256:" + "G" * 64, ""])
def test_malformed_digests_are_refused(bad: str) -> None:
    with pytest.raises(AnimusError) as caught:
        check_digest(bad)
    assert caught.value.code == "invalid_digest"


def test_unpacked_root_filesystems_are_cached_by_digest(tmp_path: Path) -> None:
    from appliance.images.unpack import unpack_image

    small_image(tmp_path / "layout")
    layout = Layout(tmp_path / "layout")
    first = unpack_image(layout, layout.image(), tmp_path / "cache")
    assert (first / "hello").read_bytes() == b"world"
    assert {"proc", "dev", "sys", "tmp", "scratch"} <= {p.name for p in first.iterdir()}
    (first / "marker").write_text("kept")  # a second unpack must reuse, not redo
    assert unpack_image(layout, layout.image(), tmp_path / "cache") == first
    assert (first / "marker").exists()


def test_unpack_refuses_a_layer_altered_in_the_store(tmp_path: Path) -> None:
    from appliance.images.unpack import unpack_image

    built = small_image(tmp_path / "layout")
    layout = Layout(tmp_path / "layout")
    path = layout.blob_path(built.layers[0]["digest"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(AnimusError) as caught:
        unpack_image(layout, layout.image(), tmp_path / "cache")
    assert caught.value.code == "blob_digest_mismatch"
    assert not any((tmp_path / "cache").iterdir())
