"""The verifier's hashing and listing: exact digests at every read boundary, results in
order from any number of threads, errors surfaced, and the same refusals as before."""

from __future__ import annotations

import ctypes
import datetime as dt
import hashlib
import io
import mmap
import os
import socket
import time

import pytest

from tests.unit.bundle.test_verifier_rules import verify

READ = verify.READ_SIZE


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _manifest(files: dict[str, bytes]):
    now = dt.datetime.now(dt.timezone.utc)  # noqa: UP017 - as the verifier itself
    return verify.Manifest(
        raw=b"{}",
        version="1.0.0",
        created=now,
        expires=now + dt.timedelta(days=1),
        min_upgrade_from=None,
        files={p: (hashlib.sha256(d).hexdigest(), len(d)) for p, d in files.items()},
        images=[],
    )


@pytest.mark.parametrize("size", [0, 1, 2047, 2048, 4096, READ - 1, READ, READ + 1, 3 * READ + 5])
def test_a_file_hashes_to_hashlib_at_every_read_boundary(tmp_path, size):
    data = os.urandom(size)
    path = _write(tmp_path / "f", data)
    assert verify._hash_file(path) == (hashlib.sha256(data).hexdigest(), size)


MAP = verify.MAP_FROM
SLICE = verify.MAP_SLICE


@pytest.mark.parametrize("size", [MAP - 1, MAP, MAP + 1, 2 * SLICE + 7, 3 * SLICE])
def test_large_files_hash_through_the_mapping_to_hashlib(tmp_path, size, monkeypatch):
    data = os.urandom(size)
    path = _write(tmp_path / "layer", data)
    mapped = []
    real = verify._hash_mapped
    monkeypatch.setattr(
        verify, "_hash_mapped", lambda fd, n, stop: mapped.append(n) or real(fd, n, stop)
    )
    assert verify._hash_file(path) == (hashlib.sha256(data).hexdigest(), size)
    assert mapped == ([size] if size >= MAP else [])


def test_one_buffer_serves_many_files_without_leaking_bytes_between_them(tmp_path):
    big = _write(tmp_path / "big", os.urandom(READ + 100))
    small = _write(tmp_path / "small", b"abc")
    with verify._read_buffer() as mapped, memoryview(mapped) as buffer:
        verify._hash_file(big, buffer)
        digest, size = verify._hash_file(small, buffer)
    assert (digest, size) == (hashlib.sha256(b"abc").hexdigest(), 3)


def test_the_read_buffer_is_page_aligned():
    with verify._read_buffer() as mapped:
        assert len(mapped) == READ
        start = ctypes.c_char.from_buffer(mapped)
        address = ctypes.addressof(start)
        del start  # release the export before the buffer is closed
        assert address % mmap.PAGESIZE == 0


@pytest.mark.parametrize("workers", [1, 2, 3, 8, 64])
def test_hash_files_returns_results_in_the_order_given(tmp_path, workers):
    datas = [os.urandom(n) for n in [0, 5, READ * 2 + 3, 70_000, 1, READ, 4096] * 5]
    paths = [str(_write(tmp_path / f"d{i % 4}" / f"f{i}", d)) for i, d in enumerate(datas)]
    results = verify.hash_files(paths, workers=workers)
    assert results == [(hashlib.sha256(d).hexdigest(), len(d)) for d in datas]


def test_hash_files_of_nothing_is_nothing():
    assert verify.hash_files([], workers=4) == []


def test_an_unreadable_file_raises_from_hash_files(tmp_path):
    good = [str(_write(tmp_path / f"f{i}", b"x" * 5000)) for i in range(20)]
    with pytest.raises(FileNotFoundError):
        verify.hash_files([*good[:10], str(tmp_path / "gone"), *good[10:]], workers=3)


def test_progress_is_reported_unless_quiet(tmp_path, capsys):
    paths = [str(_write(tmp_path / f"f{i}", os.urandom(300_000))) for i in range(8)]
    verify.hash_files(paths, workers=2, total=8 * 300_000, quiet=False)
    assert "hashed" in capsys.readouterr().err
    verify.hash_files(paths, workers=2, total=8 * 300_000, quiet=True)
    assert capsys.readouterr().err == ""


def test_a_large_file_that_shrank_is_an_error_not_a_crash(tmp_path):
    # Mapping pages past the end and touching them would end the process with SIGBUS.
    path = _write(tmp_path / "layer", os.urandom(MAP + SLICE))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.truncate(path, MAP)  # as if someone cut the file after it was opened
        with pytest.raises(verify._Resized):
            verify._hash_mapped(fd, MAP + SLICE)
    finally:
        os.close(fd)


def test_a_large_file_that_grew_while_hashed_is_named(tmp_path, monkeypatch):
    path = _write(tmp_path / "layer", os.urandom(MAP))
    real = verify._hash_mapped

    def grow_then_hash(fd, length, stop=None):
        with open(path, "ab") as more:
            more.write(b"appended")
        return real(fd, length, stop)

    monkeypatch.setattr(verify, "_hash_mapped", grow_then_hash)
    with pytest.raises(OSError, match="layer changed size while it was hashed"):
        verify._hash_file(path)


def test_a_large_file_stops_hashing_at_the_next_slice_once_told(tmp_path):
    path = _write(tmp_path / "layer", os.urandom(MAP + SLICE))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(verify._Stopped):
            verify._hash_mapped(fd, MAP + SLICE, stop=[True])
    finally:
        os.close(fd)


def test_stopped_threads_end_and_leave_the_files_they_did_not_take(tmp_path, monkeypatch):
    paths = [str(_write(tmp_path / f"f{i}", b"x")) for i in range(200)]
    taken = []
    real = verify._hash_file

    def slow(path, buffer=None, stop=None):  # 10 ms a file: two threads need a second
        taken.append(path)
        time.sleep(0.01)
        return real(path, buffer, stop)

    monkeypatch.setattr(verify, "_hash_file", slow)
    hashing = verify.Hashing(paths, workers=2)
    hashing.stop()
    assert not any(thread.is_alive() for thread in hashing._threads)
    assert len(taken) < 50  # of 200


def test_default_workers_is_the_usable_cores_plus_two():
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    assert verify.usable_cores() == (expected or os.cpu_count() or 1)
    assert verify.default_workers() == min(32, verify.usable_cores() + 2)


def _tree(root):
    files = {
        "MANIFEST.json": b"{}",
        "a.txt": b"a",
        "images/x/blobs/sha256/" + "0" * 64: os.urandom(READ + 7),
        "offline-wheels/w-1.0-py3-none-any.whl": os.urandom(3000),
        "docs/deep/er/page.md": b"# page\n",
    }
    for rel, data in files.items():
        _write(root / rel, data)
    (root / "empty-folder").mkdir()
    return {k: v for k, v in files.items() if k != "MANIFEST.json"}


def test_listing_finds_every_file_by_posix_path_and_names_the_extra_ones(tmp_path):
    files = _tree(tmp_path)
    _write(tmp_path / "docs" / "stray.md", b"?")
    found, extra = verify._listing(tmp_path, _manifest(files).files)
    assert set(found) == {*files, "MANIFEST.json", "docs/stray.md"}
    assert all(found[p].st_size == len(d) for p, d in files.items())
    assert extra == ["docs/stray.md"]


def test_listing_refuses_a_symbolic_link_even_to_a_folder(tmp_path):
    files = _tree(tmp_path)
    os.symlink(tmp_path / "docs", tmp_path / "images" / "link")
    with pytest.raises(verify.Refusal) as refused:
        verify._listing(tmp_path, _manifest(files).files)
    assert refused.value.code == "unsafe_member" and "images/link" in refused.value.message


def test_listing_refuses_a_fifo_and_a_socket(tmp_path):
    files = _tree(tmp_path)
    os.mkfifo(tmp_path / "docs" / "pipe")
    with pytest.raises(verify.Refusal) as refused:
        verify._listing(tmp_path, _manifest(files).files)
    assert refused.value.code == "unsafe_member" and "docs/pipe" in refused.value.message
    (tmp_path / "docs" / "pipe").unlink()
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "s"))
        with pytest.raises(verify.Refusal) as refused:
            verify._listing(tmp_path, _manifest(files).files)
        assert refused.value.code == "unsafe_member"
    finally:
        sock.close()


def test_verify_files_accepts_a_good_tree(tmp_path):
    files = _tree(tmp_path)
    verify.verify_files(tmp_path, _manifest(files), workers=3, quiet=True)


LAYER = "images/x/blobs/sha256/" + "0" * 64  # hashed by the threads
WHEEL = "offline-wheels/w-1.0-py3-none-any.whl"  # small: hashed by the checking thread


@pytest.mark.parametrize(
    ("damage", "code", "rel"),
    [
        ("flip", "hash_mismatch", LAYER),
        ("flip", "hash_mismatch", WHEEL),
        ("grow", "size_mismatch", LAYER),
        ("remove", "file_missing", LAYER),
        ("add", "file_extra", LAYER),
    ],
)
def test_verify_files_refuses_damage(tmp_path, damage, code, rel):
    files = _tree(tmp_path)
    assert len(files[WHEEL]) < verify.SMALL_FILE <= len(files[LAYER])
    manifest = _manifest(files)
    victim = tmp_path / rel
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[min(READ, len(data) - 4) + 3] ^= 1  # a large file: past the first read
        victim.write_bytes(bytes(data))
    elif damage == "grow":
        victim.write_bytes(bytes(data) + b"!")
    elif damage == "remove":
        victim.unlink()
    else:
        _write(tmp_path / "offline-wheels" / "extra.whl", b"x")
    with pytest.raises(verify.Refusal) as refused:
        verify.verify_files(tmp_path, manifest, workers=2, quiet=True)
    assert refused.value.code == code
    if code == "hash_mismatch":
        assert refused.value.message.endswith(rel)


# --- a .tar: unpacked and hashed in one pass --------------------------------------------


class _TrustingChecker:
    """Stands in for gpg (the signature checks have their own integration tests)."""

    fingerprint = "F" * 40

    def verify(self, signature, data, what, stream=None):
        return self.fingerprint


def _bundle_tar(tmp_path, files: dict[str, bytes], lie_about: str | None = None, link=None):
    import json
    import tarfile

    now = dt.datetime.now(dt.timezone.utc)  # noqa: UP017 - as the verifier itself
    entries = []
    for path, data in sorted(files.items()):
        digest = hashlib.sha256(data).hexdigest()
        if path == lie_about:
            digest = hashlib.sha256(data[::-1] + b"x").hexdigest()
        entries.append({"path": path, "sha256": digest, "size": len(data)})
    if link:  # (path, path of the earlier file it is a hard link to)
        source = files[link[1]]
        entries.append(
            {"path": link[0], "sha256": hashlib.sha256(source).hexdigest(), "size": len(source)}
        )
    manifest = json.dumps(
        {
            "format": verify.MANIFEST_FORMAT,
            "version": "1.0.0",
            "created": now.isoformat(),
            "expires": (now + dt.timedelta(days=1)).isoformat(),
            "files": entries,
        }
    ).encode()
    tar_path = tmp_path / "animus-1.0.0.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as archive:
        members = {"MANIFEST.json": manifest, "MANIFEST.json.asc": b"sig", **files}
        for name, data in members.items():
            info = tarfile.TarInfo(f"animus-1.0.0/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(f"animus-1.0.0/{link[0]}")
            info.type = tarfile.LNKTYPE
            info.linkname = f"animus-1.0.0/{link[1]}"
            archive.addfile(info)
    return tar_path


def _bundle_files():
    return {
        "images/layer": os.urandom(3 * READ + 11),  # several reads, hashed on the side thread
        "offline-wheels/w.whl": os.urandom(200_000),
        "docs/a.md": b"# a\n",
        "empty": b"",
    }


def test_a_tar_is_unpacked_and_every_file_hashed_as_written(tmp_path):
    files = _bundle_files()
    tar_path = _bundle_tar(tmp_path, files, link=("docs/copy.whl", "offline-wheels/w.whl"))
    target = tmp_path / "out"
    result = verify.verify_tar(tar_path, target, _TrustingChecker(), quiet=True)
    assert (result.files, result.signer_fingerprint) == (5, _TrustingChecker.fingerprint)
    for path, data in files.items():
        assert (target / path).read_bytes() == data
    assert (target / "docs/copy.whl").read_bytes() == files["offline-wheels/w.whl"]


@pytest.mark.parametrize("liar", ["images/layer", "docs/a.md"])
def test_a_tar_member_that_does_not_match_its_digest_is_refused_and_removed(tmp_path, liar):
    tar_path = _bundle_tar(tmp_path, _bundle_files(), lie_about=liar)
    target = tmp_path / "out"
    with pytest.raises(verify.Refusal) as refused:
        verify.verify_tar(tar_path, target, _TrustingChecker(), quiet=True)
    assert refused.value.code == "hash_mismatch" and refused.value.message.endswith(liar)
    assert not target.exists()


def test_a_truncated_tar_is_an_error_and_leaves_nothing(tmp_path):
    import tarfile

    tar_path = _bundle_tar(tmp_path, _bundle_files())
    data = tar_path.read_bytes()
    layer = data.index(b"animus-1.0.0/images/layer")
    tar_path.write_bytes(data[: layer + 512 + 2 * READ])  # inside the layer's data
    target = tmp_path / "out"
    with pytest.raises((verify.Refusal, tarfile.TarError)):
        verify.verify_tar(tar_path, target, _TrustingChecker(), quiet=True)
    assert not target.exists()
