"""Content-addressed blob store: every file is kept once, under the SHA-256 of its bytes.

Layout under ``root`` (``<data_dir>/blobs``)::

    sha256/ab/abcdef…   one read-only file per distinct content
    tmp/                files being received; never read by anyone else

Writers stage incoming files in ``tmp/`` while hashing them, then ``promote()`` moves each
one to its content address with an atomic rename. A blob therefore either exists complete
under its digest or not at all, and identical content is stored once (DESIGN §5).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from appliance.errors import AnimusError, NotFound, UploadError

#: Size of the reused buffers a file is received into, hashed from and written from, and
#: of each request to a source. Large buffers keep per-buffer overhead (Python calls,
#: syscalls, thread hand-offs) small next to hashing, which costs about 0.7 ms per MiB here;
#: large requests matter even more to sources that buffer (gunicorn's request body copies
#: what it holds on every read, so 64 KiB reads cost it 16 copies of each MiB).
CHUNK_BYTES = 1 << 20
#: Buffers in rotation per upload: one being filled, others being hashed and written.
_BUFFERS = 3
#: Written data is pushed to disk and out of the page cache in windows of this size.
WRITEBACK_WINDOW_BYTES = 8 << 20

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_BLOB_MODE = 0o444
# Enough parallel fsyncs for ext4/xfs to fold them into few journal commits.
_FSYNC_WORKERS = 8


@dataclass(frozen=True)
class StagedFile:
    """A file received completely into the staging area: its digest and its length."""

    sha256: str
    size: int


class BlobStore:
    """Blobs on a local directory (or a mounted volume), addressed by lowercase hex SHA-256."""

    def __init__(self, root: Path, *, fsync: bool = True):
        """Open the store at ``root``, creating ``root/sha256`` and ``root/tmp`` if needed.

        ``fsync=False`` skips flushing to disk on promote; only for tests and throwaway data.
        """
        self.root = Path(root)
        self.fsync = fsync
        self.blob_dir = self.root / "sha256"
        self.tmp_dir = self.root / "tmp"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256_hex: str) -> Path:
        """Where the blob with this digest lives (whether or not it exists).

        Raises ``AnimusError(code="invalid_digest")`` unless the digest is 64 lowercase hex
        characters: the digest becomes part of a path, so nothing else may get through.
        """
        if not isinstance(sha256_hex, str) or not _DIGEST_RE.fullmatch(sha256_hex):
            shown = repr(sha256_hex)[:80]
            raise AnimusError(
                f"invalid sha256 digest {shown}: expected 64 lowercase hex characters",
                code="invalid_digest",
            )
        return self.blob_dir / sha256_hex[:2] / sha256_hex

    def exists(self, sha256_hex: str) -> bool:
        """Whether a blob with this digest is stored."""
        return self.path_for(sha256_hex).is_file()

    def open(self, sha256_hex: str) -> BinaryIO:
        """Open a stored blob for reading; raises ``NotFound`` if there is none."""
        path = self.path_for(sha256_hex)
        try:
            return path.open("rb")
        except FileNotFoundError:
            raise NotFound(f"blob sha256:{sha256_hex} not found") from None

    def stage(self) -> StagedBlobs:
        """Start receiving files; use as a context manager so leftovers are always removed."""
        return StagedBlobs(self)

    def remove_if_unreferenced(
        self, digests: Iterable[str], is_referenced: Callable[[str], bool]
    ) -> None:
        """Delete those of ``digests`` that ``is_referenced`` says nothing points to.

        Meant for undoing a ``promote()`` whose database transaction then failed: pass the
        digests ``promote()`` returned, never digests that existed before.
        """
        for digest in digests:
            path = self.path_for(digest)
            if is_referenced(digest):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class StagedBlobs:
    """Files received for one upload, hashed and written under ``tmp/`` until promoted.

    Not thread-safe: one upload feeds one ``StagedBlobs`` from one thread.
    """

    def __init__(self, store: BlobStore):
        self._store = store
        self._staged: list[tuple[Path, StagedFile]] = []
        self._buffers: list[memoryview] = []
        self._hasher_thread: ThreadPoolExecutor | None = None
        self._writer_thread: ThreadPoolExecutor | None = None

    def __enter__(self) -> StagedBlobs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()

    def add_stream(self, read: Callable[[int], bytes], *, max_bytes: int) -> StagedFile:
        """Receive one file from ``read(n)`` (returns ``b""`` at the end) into staging.

        The file is hashed and written in chunks, never held in memory whole. More than
        ``max_bytes`` raises ``UploadError(code="upload_too_large")`` as soon as the excess
        arrives, and the partial file is deleted. If ``read`` is the bound ``read`` method of
        an object that also has ``readinto`` (files, sockets, Werkzeug's request stream),
        ``readinto`` is used instead, filling reused buffers without extra copies: fresh
        1 MiB ``bytes`` objects are mmap()ed and page-faulted by glibc every time, which was
        measured to cost about as much as hashing them.
        """
        owner = getattr(read, "__self__", None)
        readinto = getattr(owner, "readinto", None)
        if getattr(read, "__name__", None) == "read" and callable(readinto):
            return self._receive(_ReadintoFiller(readinto), max_bytes)
        return self._receive(_ChunkFiller(_read_chunks(read)), max_bytes)

    def add_bytes_iter(self, chunks: Iterable[bytes], *, max_bytes: int) -> StagedFile:
        """Receive one file given as an iterable of byte chunks; same rules as ``add_stream``."""
        return self._receive(_ChunkFiller(iter(chunks)), max_bytes)

    def promote(self) -> list[str]:
        """Make every staged file a blob; return the digests of blobs that are new.

        Each file is flushed to disk (unless the store was opened with ``fsync=False``),
        made read-only and renamed to its content address; content already stored is not
        stored again. The returned list is what ``BlobStore.remove_if_unreferenced`` needs
        to undo this promotion if the caller's transaction fails.
        """
        store = self._store
        staged, self._staged = self._staged, []
        created: list[str] = []
        moved = 0
        try:
            if store.fsync and staged:
                _fsync_files([tmp_path for tmp_path, _ in staged])
            new_shards = False
            for tmp_path, staged_file in staged:
                target = store.path_for(staged_file.sha256)
                if target.exists():
                    tmp_path.unlink()
                else:
                    if not target.parent.is_dir():
                        target.parent.mkdir(exist_ok=True)
                        new_shards = True
                    os.replace(tmp_path, target)
                    created.append(staged_file.sha256)
                moved += 1
            if store.fsync:
                # A rename is durable only once the directory holding it is.
                shards = {store.path_for(digest).parent for digest in created}
                for directory in sorted(shards):
                    _fsync_path(directory)
                if new_shards:
                    _fsync_path(store.blob_dir)
        except BaseException:
            # Leave nothing half done: files not yet moved stay staged (to be discarded),
            # and blobs this call created go again, as nothing can reference them yet.
            self._staged = staged[moved:]
            for digest in created:
                with contextlib.suppress(FileNotFoundError):
                    store.path_for(digest).unlink()
            raise
        return created

    def discard(self) -> None:
        """Delete every staged file not yet promoted, and stop the background threads."""
        staged, self._staged = self._staged, []
        for tmp_path, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
        for thread in (self._hasher_thread, self._writer_thread):
            if thread is not None:
                thread.shutdown(wait=True)
        self._hasher_thread = self._writer_thread = None
        self._buffers = []

    def _receive(self, fill: _Filler, max_bytes: int) -> StagedFile:
        fd, name = tempfile.mkstemp(dir=self._store.tmp_dir, prefix="stage-")
        tmp_path = Path(name)
        try:
            digest, size = self._hash_and_write(fd, fill, max_bytes)
            # Read-only before it is visible under its address, so there is no window in
            # which a blob could be changed in place.
            os.fchmod(fd, _BLOB_MODE)
        except BaseException:
            os.close(fd)
            tmp_path.unlink()
            raise
        os.close(fd)
        staged_file = StagedFile(sha256=digest, size=size)
        self._staged.append((tmp_path, staged_file))
        return staged_file

    def _hash_and_write(self, fd: int, fill: _Filler, max_bytes: int) -> tuple[str, int]:
        hasher = hashlib.sha256()
        if not self._buffers:
            self._buffers = [memoryview(bytearray(CHUNK_BYTES))]
        # Never ask for more than one byte past the limit: enough to know it was passed.
        want = min(CHUNK_BYTES, max_bytes + 1)
        size = fill(self._buffers[0][:want])
        if size > max_bytes:
            raise _too_large(max_bytes)
        if size < want:
            # Most files fit one buffer; handing them to threads would cost more than it saves.
            hasher.update(self._buffers[0][:size])
            _write_all(fd, self._buffers[0][:size])
            return hasher.hexdigest(), size
        return self._pipeline(fd, fill, max_bytes, hasher, size)

    def _pipeline(
        self, fd: int, fill: _Filler, max_bytes: int, hasher: hashlib._Hash, size: int
    ) -> tuple[str, int]:
        # Three stages on three threads: this one fills buffer n+1 while one thread hashes
        # and another writes buffer n. All three release the GIL for the heavy part
        # (recv/readinto, SHA-256, write), so on two cores this runs at about the speed of
        # the slowest stage instead of the sum of all three. Each thread is single, so
        # hashing and writing keep the file's order.
        if len(self._buffers) < _BUFFERS:
            self._buffers += [memoryview(bytearray(CHUNK_BYTES)) for _ in range(_BUFFERS - 1)]
            self._hasher_thread = ThreadPoolExecutor(1, thread_name_prefix="blob-hasher")
            self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="blob-writer")
        hasher_thread, writer_thread = self._hasher_thread, self._writer_thread
        assert hasher_thread is not None and writer_thread is not None
        in_flight: list[list[Future[None]]] = [[] for _ in range(_BUFFERS)]
        writer = _StreamingWriter(fd)
        turn = 0
        count = size
        try:
            while count:
                data = self._buffers[turn][:count]
                in_flight[turn] = [
                    hasher_thread.submit(hasher.update, data),
                    writer_thread.submit(writer.write, data),
                ]
                if count < CHUNK_BYTES:
                    break  # a short fill is the end of the stream
                turn = (turn + 1) % _BUFFERS
                # The buffer about to be refilled must be hashed and written first.
                for future in in_flight[turn]:
                    future.result()
                want = min(CHUNK_BYTES, max_bytes + 1 - size)
                count = fill(self._buffers[turn][:want])
                size += count
                if size > max_bytes:
                    raise _too_large(max_bytes)
        finally:
            # Never leave a thread hashing or writing after this returns: the fd is about
            # to be closed and the buffers reused. Their errors are raised below, or give
            # way to the error already on its way out.
            for futures in in_flight:
                for future in futures:
                    with contextlib.suppress(BaseException):
                        future.result()
        for futures in in_flight:
            for future in futures:
                future.result()
        return hasher.hexdigest(), size


class _Filler(Protocol):
    def __call__(self, buffer: memoryview) -> int:
        """Fill ``buffer`` from the source; fewer bytes than its length only at the end."""


class _ReadintoFiller:
    def __init__(self, readinto: Callable[[memoryview], int | None]):
        self._readinto = readinto

    def __call__(self, buffer: memoryview) -> int:
        # Sockets hand over whatever has arrived; filling the buffer keeps chunks large.
        filled = 0
        while filled < len(buffer):
            count = self._readinto(buffer[filled:])
            if not count:
                break
            filled += count
        return filled


class _ChunkFiller:
    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._left = memoryview(b"")

    def __call__(self, buffer: memoryview) -> int:
        filled = 0
        while filled < len(buffer):
            if not self._left:
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._left = memoryview(chunk).cast("B")
                continue
            count = min(len(buffer) - filled, len(self._left))
            buffer[filled : filled + count] = self._left[:count]
            self._left = self._left[count:]
            filled += count
        return filled


def _read_chunks(read: Callable[[int], bytes]) -> Iterator[bytes]:
    while chunk := read(CHUNK_BYTES):
        yield chunk


class _StreamingWriter:
    """Appends a large file, starting its writeback early and keeping it out of the cache.

    Every ``WRITEBACK_WINDOW_BYTES``, the window before the last one is handed to
    ``posix_fadvise(DONTNEED)``: Linux starts writing it back and drops its pages once they
    are clean. Measured on a 1 GiB file here: ``fsync`` at promote went from 0.4-0.7 s to
    0.01 s, and the writes themselves got cheaper because the same few page-cache pages
    are recycled instead of new memory being faulted in for every MiB. The advice is only
    advice: where it does nothing (tmpfs, other systems), the file is written as usual.
    """

    def __init__(self, fd: int):
        self._fd = fd
        self._written = 0
        self._advised = 0

    def write(self, data: memoryview) -> None:
        _write_all(self._fd, data)
        self._written += len(data)
        window = WRITEBACK_WINDOW_BYTES
        if _fadvise is not None and self._written - self._advised >= 2 * window:
            with contextlib.suppress(OSError):
                _fadvise(self._fd, self._advised, window, os.POSIX_FADV_DONTNEED)
            self._advised += window


_fadvise = getattr(os, "posix_fadvise", None)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_files(paths: list[Path]) -> None:
    if len(paths) == 1:
        _fsync_path(paths[0])
        return
    with ThreadPoolExecutor(max_workers=min(_FSYNC_WORKERS, len(paths))) as pool:
        # list() so the first failure is raised here.
        list(pool.map(_fsync_path, paths))


def _too_large(max_bytes: int) -> UploadError:
    return UploadError(
        f"file is larger than the limit of {max_bytes} bytes", code="upload_too_large"
    )


__all__ = ["CHUNK_BYTES", "BlobStore", "StagedBlobs", "StagedFile"]
