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
import errno
import fcntl
import hashlib
import mmap
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
#: Buffers in rotation per upload: one being filled and hashed, others being written.
_BUFFERS = 3
#: Without direct I/O, written data is pushed to disk and out of the page cache in windows
#: of this size.
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
                    fsync_path(directory)
                if new_shards:
                    fsync_path(store.blob_dir)
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
        if self._writer_thread is not None:
            self._writer_thread.shutdown(wait=True)
            self._writer_thread = None
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
            self._buffers = [_aligned_buffer()]
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
        # This thread fills and hashes buffer n while a writer thread writes buffer n-1
        # (and n-2): SHA-256, recv/readinto and write all release the GIL, so on two cores
        # the file goes at about the speed of the slower side rather than of both in turn.
        # Measured against also moving hashing to its own thread: no faster, one more
        # thread and twice the GIL hand-offs.
        if len(self._buffers) < _BUFFERS:
            self._buffers += [_aligned_buffer() for _ in range(_BUFFERS - 1)]
        if self._writer_thread is None:
            self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="blob-writer")
        writer_thread = self._writer_thread
        writes: list[Future[None] | None] = [None] * _BUFFERS
        writer = _StreamingWriter(fd)
        turn = 0
        count = size
        try:
            while count:
                data = self._buffers[turn][:count]
                writes[turn] = writer_thread.submit(writer.write, data)
                hasher.update(data)
                if count < CHUNK_BYTES:
                    break  # a short fill is the end of the stream
                turn = (turn + 1) % _BUFFERS
                # The buffer about to be refilled must have been written.
                pending = writes[turn]
                if pending is not None:
                    pending.result()
                want = min(CHUNK_BYTES, max_bytes + 1 - size)
                count = fill(self._buffers[turn][:want])
                size += count
                if size > max_bytes:
                    raise _too_large(max_bytes)
        finally:
            # Never leave a write running after this returns: the fd is about to be closed
            # and the buffers reused. Write errors are raised below, or give way to the
            # error already on its way out.
            for pending in writes:
                if pending is not None:
                    with contextlib.suppress(BaseException):
                        pending.result()
        for pending in writes:
            if pending is not None:
                pending.result()
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
    """Appends a large file in whole buffers, bypassing the page cache where it can.

    The file is switched to ``O_DIRECT``: buffers go from memory to disk without being
    copied into the page cache. In the API server that copy cost the writer thread 1.4-4.4
    CPU s per GiB (new pages faulted in for every MiB, on two cores shared with the
    request thread); direct writes cost 0.2-0.3, leave ``fsync`` at promote little to do,
    and a large upload no longer evicts everything else from the cache. Direct I/O needs
    aligned buffers (the pages from ``mmap``), offsets and lengths; the last, partial
    buffer and filesystems that refuse direct I/O (older tmpfs, some FUSE or network
    mounts) get ordinary writes instead. Those are handed to ``posix_fadvise(DONTNEED)``
    a window behind, which starts their writeback early and recycles the same few cache
    pages (fsync of 1 GiB at promote: 0.4-0.7 s without, 0.01-0.05 s with).
    """

    def __init__(self, fd: int):
        self._fd = fd
        self._direct = False
        self._written = 0
        self._advised = 0
        if _O_DIRECT:
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | _O_DIRECT)
                self._direct = True

    def write(self, data: memoryview) -> None:
        """Append ``data``; called from the writer thread only, one buffer at a time."""
        if self._direct and len(data) % _DIRECT_ALIGNMENT:
            self._stop_direct()
        view = data
        while view:
            try:
                count = os.write(self._fd, view)
            except OSError as exc:
                # EINVAL: this filesystem or this (short-written) offset wants no direct
                # I/O after all. Nothing was written; the same bytes go again, buffered.
                if exc.errno != errno.EINVAL or not self._direct:
                    raise
                self._stop_direct()
                continue
            view = view[count:]
        self._written += len(data)
        window = WRITEBACK_WINDOW_BYTES
        if not self._direct and self._written - self._advised >= 2 * window:
            if _fadvise is not None:
                with contextlib.suppress(OSError):
                    _fadvise(self._fd, self._advised, window, os.POSIX_FADV_DONTNEED)
            self._advised += window

    def _stop_direct(self) -> None:
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_O_DIRECT)
        self._direct = False


_O_DIRECT = getattr(os, "O_DIRECT", 0)
# Covers the logical block size of any disk (512 or 4096 bytes); CHUNK_BYTES is a multiple.
_DIRECT_ALIGNMENT = 4096
_fadvise = getattr(os, "posix_fadvise", None)


def _aligned_buffer() -> memoryview:
    # Anonymous mmap: page-aligned, as direct I/O wants (a bytearray need not be).
    return memoryview(mmap.mmap(-1, CHUNK_BYTES))


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_path(path: Path) -> None:
    """fsync PATH (a file or a directory: a rename or a new entry is durable after it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_files(paths: list[Path]) -> None:
    if len(paths) == 1:
        fsync_path(paths[0])
        return
    with ThreadPoolExecutor(max_workers=min(_FSYNC_WORKERS, len(paths))) as pool:
        # list() so the first failure is raised here.
        list(pool.map(fsync_path, paths))


def _too_large(max_bytes: int) -> UploadError:
    return UploadError(
        f"file is larger than the limit of {max_bytes} bytes", code="upload_too_large"
    )


__all__ = ["CHUNK_BYTES", "BlobStore", "StagedBlobs", "StagedFile"]
