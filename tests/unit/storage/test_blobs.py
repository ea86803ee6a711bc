"""BlobStore and StagedBlobs on real files in a temporary directory."""

from __future__ import annotations

import hashlib
import io
import itertools
import mmap
import os
import stat

import pytest

from appliance.errors import AnimusError, NotFound, UploadError
from appliance.storage.blobs import CHUNK_BYTES, BlobStore, StagedFile, _StreamingWriter


@pytest.fixture
def store(tmp_path):
    return BlobStore(tmp_path / "blobs")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def temp_files(store: BlobStore) -> list[str]:
    return sorted(os.listdir(store.tmp_dir))


def blob_files(store: BlobStore) -> list[str]:
    return sorted(path.name for path in store.blob_dir.rglob("*") if path.is_file())


class ShortReads:
    """A socket-like source: ``read`` only, handing over at most ``piece`` bytes a call."""

    def __init__(self, data: bytes, piece: int):
        self._data = io.BytesIO(data)
        self._piece = piece

    def read(self, size: int) -> bytes:
        return self._data.read(min(size, self._piece))


def test_init_creates_layout(tmp_path):
    store = BlobStore(tmp_path / "data" / "blobs")
    assert (tmp_path / "data" / "blobs" / "sha256").is_dir()
    assert (tmp_path / "data" / "blobs" / "tmp").is_dir()
    assert store.root == tmp_path / "data" / "blobs"


def test_add_stream_then_promote_stores_content_under_its_digest(store):
    data = b"hello blob\n"
    with store.stage() as staged:
        staged_file = staged.add_stream(io.BytesIO(data).read, max_bytes=100)
        assert staged_file == StagedFile(sha256=sha(data), size=len(data))
        assert not store.exists(sha(data))
        assert staged.promote() == [sha(data)]
    path = store.path_for(sha(data))
    assert path == store.root / "sha256" / sha(data)[:2] / sha(data)
    assert store.exists(sha(data))
    with store.open(sha(data)) as blob:
        assert blob.read() == data
    assert temp_files(store) == []


def test_promoted_blobs_are_read_only(store):
    with store.stage() as staged:
        digest = staged.add_bytes_iter([b"abc", b"def"], max_bytes=10).sha256
        staged.promote()
    assert stat.S_IMODE(store.path_for(digest).stat().st_mode) == 0o444


def test_identical_content_is_stored_once(store):
    data = b"same bytes"
    with store.stage() as staged:
        first = staged.add_stream(io.BytesIO(data).read, max_bytes=100)
        second = staged.add_bytes_iter([b"same ", b"bytes"], max_bytes=100)
        assert first == second
        assert staged.promote() == [sha(data)]
    assert blob_files(store) == [sha(data)]
    assert temp_files(store) == []


def test_promote_returns_only_digests_that_did_not_exist(store):
    with store.stage() as staged:
        staged.add_bytes_iter([b"old"], max_bytes=10)
        staged.promote()
    with store.stage() as staged:
        staged.add_bytes_iter([b"old"], max_bytes=10)
        staged.add_bytes_iter([b"new"], max_bytes=10)
        assert staged.promote() == [sha(b"new")]
    assert blob_files(store) == sorted([sha(b"old"), sha(b"new")])
    assert temp_files(store) == []


def test_empty_file_is_a_blob(store):
    with store.stage() as staged:
        assert staged.add_bytes_iter([], max_bytes=0) == StagedFile(sha(b""), 0)
        assert staged.promote() == [sha(b"")]
    assert store.path_for(sha(b"")).read_bytes() == b""


def test_leaving_the_block_discards_unpromoted_files(store):
    with store.stage() as staged:
        staged.add_bytes_iter([b"never promoted"], max_bytes=100)
        assert len(temp_files(store)) == 1
    assert temp_files(store) == []
    assert blob_files(store) == []


def test_leaving_the_block_on_an_exception_discards(store):
    with pytest.raises(RuntimeError), store.stage() as staged:
        staged.add_bytes_iter([b"x" * 10], max_bytes=100)
        raise RuntimeError("caller failed")
    assert temp_files(store) == []
    assert blob_files(store) == []


def test_discard_removes_staged_files_and_promote_then_has_nothing(store):
    with store.stage() as staged:
        staged.add_bytes_iter([b"a"], max_bytes=10)
        staged.discard()
        assert temp_files(store) == []
        assert staged.promote() == []
    assert blob_files(store) == []


@pytest.mark.parametrize("source", ["bytes_iter", "read", "readinto"])
def test_too_large_aborts_and_leaves_no_temp_file(store, source):
    data = b"y" * (3 * CHUNK_BYTES)
    with store.stage() as staged:
        with pytest.raises(UploadError) as caught:
            if source == "bytes_iter":
                staged.add_bytes_iter([data], max_bytes=len(data) - 1)
            elif source == "read":
                staged.add_stream(ShortReads(data, 4096).read, max_bytes=len(data) - 1)
            else:
                staged.add_stream(io.BytesIO(data).read, max_bytes=len(data) - 1)
        assert caught.value.code == "upload_too_large"
        assert caught.value.status == 413
        assert temp_files(store) == []
        assert staged.promote() == []
    assert blob_files(store) == []


def test_too_large_stops_reading_as_soon_as_the_limit_is_passed(store):
    endless = itertools.repeat(b"z" * 1000)
    with store.stage() as staged, pytest.raises(UploadError) as caught:
        staged.add_bytes_iter(endless, max_bytes=10_000)
    assert caught.value.code == "upload_too_large"
    assert temp_files(store) == []


def test_a_failing_source_leaves_no_temp_file(store):
    def chunks():
        yield b"x" * CHUNK_BYTES
        yield b"x" * CHUNK_BYTES
        raise ConnectionResetError("client went away")

    with store.stage() as staged:
        with pytest.raises(ConnectionResetError):
            staged.add_bytes_iter(chunks(), max_bytes=10 * CHUNK_BYTES)
        assert temp_files(store) == []


@pytest.mark.parametrize(
    "make_read",
    [
        pytest.param(lambda data: io.BytesIO(data).read, id="readinto-source"),
        pytest.param(lambda data: ShortReads(data, 100_003).read, id="short-reads"),
        pytest.param(lambda data: ShortReads(data, 10 * CHUNK_BYTES).read, id="read-only"),
    ],
)
def test_multi_chunk_files_hash_and_store_correctly(store, make_read):
    data = os.urandom(CHUNK_BYTES) * 3 + os.urandom(12_345)
    with store.stage() as staged:
        staged_file = staged.add_stream(make_read(data), max_bytes=len(data))
        # a second file in the same staging reuses the background writer
        other = staged.add_stream(make_read(data[::-1]), max_bytes=len(data))
        staged.promote()
    assert staged_file == StagedFile(sha(data), len(data))
    assert other == StagedFile(sha(data[::-1]), len(data))
    assert store.path_for(sha(data)).read_bytes() == data
    assert store.path_for(sha(data[::-1])).read_bytes() == data[::-1]


def test_large_file_through_the_pipeline(store):
    # Past two writeback windows, so the page-cache advice runs too.
    data = os.urandom(CHUNK_BYTES) * 20 + b"odd tail"
    with store.stage() as staged:
        staged_file = staged.add_stream(io.BytesIO(data).read, max_bytes=len(data))
        staged.promote()
    assert staged_file == StagedFile(sha(data), len(data))
    assert store.path_for(sha(data)).read_bytes() == data


def test_writer_falls_back_to_buffered_writes_when_direct_io_refuses(tmp_path):
    # A buffer at an odd address is refused by O_DIRECT (EINVAL): the same bytes must be
    # written again, buffered, exactly once. Where the filesystem has no direct I/O at
    # all, every write is buffered and the result is the same.
    backing = mmap.mmap(-1, 3 * CHUNK_BYTES)
    backing[:] = os.urandom(3 * CHUNK_BYTES)
    aligned = memoryview(backing)[:CHUNK_BYTES]
    odd = memoryview(backing)[1 : 1 + CHUNK_BYTES]
    tail = memoryview(backing)[2 * CHUNK_BYTES : 2 * CHUNK_BYTES + 1000]
    path = tmp_path / "file"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        writer = _StreamingWriter(fd)
        for data in (aligned, odd, aligned, tail):
            writer.write(data)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(aligned) + bytes(odd) + bytes(aligned) + bytes(tail)


def test_without_fsync_promote_works_the_same(tmp_path):
    store = BlobStore(tmp_path / "blobs", fsync=False)
    with store.stage() as staged:
        staged.add_bytes_iter([b"quick"], max_bytes=10)
        assert staged.promote() == [sha(b"quick")]
    assert store.exists(sha(b"quick"))


@pytest.mark.parametrize(
    "digest",
    [
        "",
        "abc",
        "A" * 64,
        "g" * 64,
        "a" * 63,
        "a" * 65,
        "../" + "a" * 61,
        "a" * 64 + "\n",
        "sha256:" + "a" * 64,
        None,
    ],
)
def test_invalid_digests_are_refused(store, digest):
    for call in (store.path_for, store.exists, store.open):
        with pytest.raises(AnimusError) as caught:
            call(digest)
        assert caught.value.code == "invalid_digest"
    with pytest.raises(AnimusError) as caught:
        store.remove_if_unreferenced([digest], lambda _digest: False)
    assert caught.value.code == "invalid_digest"


def test_open_missing_blob_raises_not_found(store):
    with pytest.raises(NotFound) as caught:
        store.open("0" * 64)
    assert caught.value.status == 404
    assert str(store.root) not in caught.value.message


def test_remove_if_unreferenced_keeps_referenced_blobs(store):
    with store.stage() as staged:
        staged.add_bytes_iter([b"kept"], max_bytes=10)
        staged.add_bytes_iter([b"dropped"], max_bytes=10)
        created = staged.promote()
    referenced = {sha(b"kept")}
    store.remove_if_unreferenced(created, referenced.__contains__)
    assert store.exists(sha(b"kept"))
    assert not store.exists(sha(b"dropped"))
    # Already gone is fine: undoing twice must not fail.
    store.remove_if_unreferenced(created, referenced.__contains__)
