"""Turning upload request bodies (tar streams, multipart forms) into staged blobs, safely.

Both readers stream: file contents go from the request straight into ``StagedBlobs`` chunk
by chunk, never whole into memory and never through Werkzeug's spooled temporary files.
What a client controls is checked before it can cost much: member types and paths before
a member's data is read, declared sizes before data is inflated, header and preamble sizes
before they are buffered. The body is read in 1 MiB pieces whatever its consumers ask for
(see ``_BufferedSource``).

On failure these functions raise ``UploadError``; files staged so far stay in the
``StagedBlobs`` until it is discarded, which ``with store.stage() as staged:`` does.
"""

from __future__ import annotations

import gzip
import io
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from multipart import MultipartError, MultipartSegment, ParserLimitReached, PushMultipartParser
from werkzeug.http import parse_options_header

from appliance.errors import UploadError
from appliance.storage.blobs import CHUNK_BYTES, StagedBlobs, StagedFile

#: Longest single path component, in UTF-8 bytes: what common filesystems accept, so a
#: dataset can always be materialized as files in a run container.
MAX_COMPONENT_BYTES = 255
#: Largest tar header extension (pax record block, GNU long name) accepted. Real ones are
#: a few hundred bytes; tarfile would otherwise read whatever size a header declares.
MAX_TAR_HEADER_EXTENSION_BYTES = 1 << 20
#: Zero padding accepted after a tar's end-of-archive marker (blocking factors pad it).
MAX_TAR_TRAILER_BYTES = 16 << 20
#: Longest part header line, and most bytes of preamble or epilogue read, in a multipart body.
MAX_MULTIPART_HEADER_BYTES = 64 << 10
#: Form fields without a filename are skipped, but not without end.
MAX_MULTIPART_FIELDS = 1000
#: Bytes handed to the multipart decoder at a time. Its cost is per call more than per
#: byte: through gunicorn, 1 MiB pieces measured 330-470 MB/s, 64 KiB pieces 180-230.
MULTIPART_FEED_BYTES = CHUNK_BYTES
#: Reads at least this large bypass the source buffer and land in the caller's buffer.
_DIRECT_READ_BYTES = 64 << 10
#: Pieces asked of a gzip stream: it allocates what is asked, so keep that reusable.
_GZIP_PIECE_BYTES = 64 << 10

_SHOWN_NAME_CHARS = 200
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)
# The most tarfile may ask of the stream in one read: a header extension, or one chunk.
_MAX_TAR_READ = max(MAX_TAR_HEADER_EXTENSION_BYTES, CHUNK_BYTES)
_CONTROL_CHARS_RE = re.compile(r"[\x00-\x1f\x7f]")
# RFC 2046 §5.1.1: 1 to 70 of these characters, not ending in a space.
_BOUNDARY_RE = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_UNSUPPORTED_COMPRESSION = {
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}


@dataclass(frozen=True)
class UploadedFile:
    """One file of an upload: its dataset path, digest and size."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class UploadLimits:
    """What one upload may contain; checked before data is read wherever possible."""

    max_total_bytes: int
    max_files: int = 100_000
    max_file_bytes: int | None = None
    max_path_length: int = 1024


def normalize_member_path(name: str, *, max_length: int = 1024) -> str:
    """Return ``name`` as a clean relative POSIX path, or raise ``UploadError``.

    Leading ``./``, repeated and trailing slashes and ``.`` components are dropped. Names
    that try to leave the dataset (absolute, any ``..`` component) raise code
    ``unsafe_archive_member``; malformed ones (empty, NUL or other control characters,
    backslashes, not UTF-8, longer than ``max_length`` UTF-8 bytes or with a component
    longer than 255 bytes) raise ``invalid_path``. The message names the offending member.
    """
    if not isinstance(name, str) or not name:
        raise UploadError("a member has an empty name", code="invalid_path")
    shown = _shown(name)
    if "\x00" in name:
        raise UploadError(f"member {shown} contains a NUL character", code="invalid_path")
    if name.startswith("/"):
        raise UploadError(
            f"member {shown} has an absolute path; only relative paths are allowed",
            code="unsafe_archive_member",
        )
    if "\\" in name:
        # Refused rather than guessed at: on Windows it separates, on POSIX it does not.
        raise UploadError(
            f"member {shown} contains a backslash; use '/' to separate directories",
            code="invalid_path",
        )
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UploadError(
            f"member {shown} contains a '..' component; paths may not leave the upload",
            code="unsafe_archive_member",
        )
    if not parts:
        raise UploadError(f"member {shown} does not name a file", code="invalid_path")
    if _CONTROL_CHARS_RE.search(name):
        raise UploadError(f"member {shown} contains a control character", code="invalid_path")
    path = "/".join(parts)
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        # tarfile keeps undecodable bytes as surrogates; such a path fits no JSON manifest.
        raise UploadError(f"member {shown} is not valid UTF-8", code="invalid_path") from None
    if len(encoded) > max_length:
        raise UploadError(f"member {shown} is longer than {max_length} bytes", code="invalid_path")
    if any(len(part.encode("utf-8")) > MAX_COMPONENT_BYTES for part in parts):
        raise UploadError(
            f"member {shown} has a path component longer than {MAX_COMPONENT_BYTES} bytes",
            code="invalid_path",
        )
    return path


def read_tar_stream(
    stream: BinaryIO, staged: StagedBlobs, limits: UploadLimits
) -> list[UploadedFile]:
    """Stage every regular file of a tar stream (plain or gzip); return them sorted by path.

    ``stream`` is read once, front to back (a request body will do). Directories are
    skipped; symlinks, hard links, devices, FIFOs and other special members, absolute
    paths and ``..`` are refused (``unsafe_archive_member``) before any of their data is
    read, and so is a member whose declared size would break ``limits``
    (``upload_too_large``), which stops decompression bombs. Also raised: ``duplicate_path``,
    ``too_many_files``, ``empty_upload``, and ``malformed_archive`` for truncated or
    corrupt input, concatenated archives and compression other than gzip.
    """
    body = _BufferedSource(stream)
    head = body.peek(6)
    if not head:
        raise UploadError("the upload is empty", code="empty_upload")
    for magic, compression in _UNSUPPORTED_COMPRESSION.items():
        if head.startswith(magic):
            raise UploadError(
                f"{compression}-compressed archives are not supported; send a plain or "
                "gzip-compressed tar",
                code="malformed_archive",
            )
    if head.startswith(b"\x1f\x8b"):
        # GzipFile inflates at most what is asked of it, so memory stays bounded however
        # well the data compresses; it also checks the CRC and length in the trailer.
        inflated = gzip.GzipFile(fileobj=body, mode="rb")  # type: ignore[arg-type]
        reader = _ForwardReader(inflated, piece_bytes=_GZIP_PIECE_BYTES)
    else:
        reader = _ForwardReader(body)
    collector = _Collector(limits)
    try:
        _read_tar_members(reader, staged, collector, limits)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise UploadError(_describe_tar_error(exc), code="malformed_archive") from None
    return collector.finish()


def read_multipart_stream(
    stream: BinaryIO, content_type_header: str, staged: StagedBlobs, limits: UploadLimits
) -> list[UploadedFile]:
    """Stage every file part of a ``multipart/form-data`` body; return them sorted by path.

    A part with a filename is a file, and its filename (normalized with
    ``normalize_member_path``) is its path in the dataset; parts without one are read and
    ignored. A missing or invalid boundary, a truncated body or oversized part headers
    raise ``malformed_multipart``; the rules of ``read_tar_stream`` on paths, duplicates,
    sizes, counts and empty uploads apply as well.
    """
    boundary = _multipart_boundary(content_type_header)
    events = _multipart_events(_BufferedSource(stream), boundary)
    collector = _Collector(limits)
    fields = 0
    for segment in events:
        if not isinstance(segment, MultipartSegment):  # the parser starts every part so
            raise _malformed_multipart("unexpected data outside a part")
        # Browsers send a file input left empty as a part with filename="" and no data.
        filename = _filename(segment)
        if filename:
            path = collector.admit(filename)
            staged_file = collector.stage(
                path, lambda budget: staged.add_bytes_iter(_part_data(events), max_bytes=budget)
            )
            collector.record(path, staged_file)
            continue
        fields += 1
        if fields > MAX_MULTIPART_FIELDS:
            raise UploadError(
                f"more than {MAX_MULTIPART_FIELDS} form fields without a filename",
                code="malformed_multipart",
            )
        for chunk in _part_data(events):
            collector.consume_ignored(len(chunk))
    return collector.finish()


class _Collector:
    """The rules shared by both upload formats: paths, duplicates, counts and sizes."""

    def __init__(self, limits: UploadLimits):
        self.limits = limits
        self.files: dict[str, StagedFile] = {}
        self.directories: set[str] = set()
        self.total_bytes = 0

    def admit(self, name: str, declared_size: int | None = None) -> str:
        """Check a new file before its data is read; return its normalized path."""
        path = normalize_member_path(name, max_length=self.limits.max_path_length)
        if path in self.files:
            raise UploadError(f"path {_shown(path)} occurs more than once", code="duplicate_path")
        if len(self.files) >= self.limits.max_files:
            raise UploadError(
                f"the upload has more than {self.limits.max_files} files",
                code="too_many_files",
            )
        if declared_size is not None:
            budget, limit_text = self._budget()
            if declared_size > budget:
                raise UploadError(
                    f"member {_shown(path)} declares {declared_size} bytes, more than {limit_text}",
                    code="upload_too_large",
                )
        return path

    def stage(self, path: str, receive: Callable[[int], StagedFile]) -> StagedFile:
        """Run ``receive(max_bytes)`` with this file's byte budget, naming it on overflow."""
        budget, limit_text = self._budget()
        try:
            return receive(budget)
        except UploadError as exc:
            if exc.code != "upload_too_large":
                raise
            raise UploadError(
                f"file {_shown(path)} is larger than {limit_text}", code="upload_too_large"
            ) from None

    def record(self, path: str, staged_file: StagedFile) -> None:
        self.files[path] = staged_file
        self.total_bytes += staged_file.size

    def consume_ignored(self, size: int) -> None:
        """Count bytes that are read but not kept against the total, so they stay bounded."""
        self.total_bytes += size
        if self.total_bytes > self.limits.max_total_bytes:
            raise UploadError(
                f"the upload is larger than {self.limits.max_total_bytes} bytes in total",
                code="upload_too_large",
            )

    def note_directory(self, name: str) -> None:
        if not name.startswith("/") and all(part in ("", ".") for part in name.split("/")):
            return  # the top directory itself, as in ``tar -cf - .``
        self.directories.add(normalize_member_path(name, max_length=self.limits.max_path_length))

    def finish(self) -> list[UploadedFile]:
        """Check the upload as a whole and list its files sorted by path."""
        if not self.files:
            raise UploadError("the upload contains no files", code="empty_upload")
        # A path cannot be a file and a directory at once; the dataset could not be
        # materialized as files.
        for path in self.files:
            if path in self.directories:
                raise UploadError(
                    f"path {_shown(path)} is both a file and a directory", code="duplicate_path"
                )
            parent, _, _ = path.rpartition("/")
            while parent:
                if parent in self.files:
                    raise UploadError(
                        f"path {_shown(parent)} is both a file and a directory",
                        code="duplicate_path",
                    )
                parent, _, _ = parent.rpartition("/")
        return [
            UploadedFile(path=path, sha256=staged_file.sha256, size=staged_file.size)
            for path, staged_file in sorted(self.files.items())
        ]

    def _budget(self) -> tuple[int, str]:
        remaining = self.limits.max_total_bytes - self.total_bytes
        total_text = f"the limit of {self.limits.max_total_bytes} bytes for the whole upload"
        per_file = self.limits.max_file_bytes
        if per_file is not None and per_file < remaining:
            return per_file, f"the limit of {per_file} bytes per file"
        return max(remaining, 0), total_text


# -- tar ------------------------------------------------------------------------------


def _read_tar_members(
    reader: _ForwardReader, staged: StagedBlobs, collector: _Collector, limits: UploadLimits
) -> None:
    # TarFile on a forward-only reader rather than tarfile's stream mode ("r|*"), which
    # (1) reads a pax or GNU long-name header of whatever size it declares into memory -
    # a 510 KB gzip upload took 1 GiB of RSS - where _ForwardReader refuses the read;
    # (2) copies its buffer on every read: 2.9 CPU s per GiB against 1.3 here, where
    # member data goes straight from the request into the staging buffers (_MemberReader).
    archive = tarfile.TarFile(fileobj=reader, mode="r", encoding="utf-8")
    # Directories do not count as files, but cannot be unlimited either.
    max_entries = 2 * limits.max_files + 1000
    entries = 0
    while True:
        member = archive.next()
        if member is None:
            break
        # TarFile keeps every member it has seen; this loop never looks back.
        archive.members.clear()
        entries += 1
        if entries > max_entries:
            raise UploadError(
                f"the archive has more than {max_entries} entries", code="too_many_files"
            )
        _refuse_unsafe_member(member)
        if member.isdir():
            collector.note_directory(member.name)
            continue
        path = collector.admit(member.name, declared_size=member.size)
        if member.sparse is not None:
            # Rare (GNU tar --sparse); tarfile knows how to fill the holes.
            member_file = archive.extractfile(member)
            assert member_file is not None
            read = member_file.read
        else:
            reader.seek(member.offset_data)
            read = _MemberReader(reader, member.size, path).read
        staged_file = collector.stage(
            path, lambda budget, read=read: staged.add_stream(read, max_bytes=budget)
        )
        if staged_file.size != member.size:
            raise UploadError(
                f"member {_shown(path)} holds {staged_file.size} bytes but declares {member.size}",
                code="malformed_archive",
            )
        collector.record(path, staged_file)
    # tarfile ends its listing quietly on a missing, short or invalid header after the
    # first member; only a zero block is a real end of archive.
    if reader.hit_end:
        raise UploadError(
            "the archive is truncated: it ends without an end-of-archive marker",
            code="malformed_archive",
        )
    if reader.last_block != _ZERO_BLOCK:
        raise UploadError(
            "the archive has an invalid header after its last valid member",
            code="malformed_archive",
        )
    _check_tar_trailer(reader)


def _refuse_unsafe_member(member: tarfile.TarInfo) -> None:
    if member.isreg() or member.isdir():
        return
    shown = _shown(member.name)
    if member.issym():
        kind = f"a symbolic link (to {_shown(member.linkname)})"
    elif member.islnk():
        kind = f"a hard link (to {_shown(member.linkname)})"
    elif member.ischr():
        kind = "a character device"
    elif member.isblk():
        kind = "a block device"
    elif member.isfifo():
        kind = "a FIFO"
    else:
        kind = f"of unsupported type {member.type!r}"
    raise UploadError(
        f"member {shown} is {kind}; only regular files and directories are allowed",
        code="unsafe_archive_member",
    )


def _check_tar_trailer(reader: _ForwardReader) -> None:
    # Anything but zero padding after the end marker is most likely a second archive
    # appended to the first (tar -A, cat a.tar b.tar); ignoring it would lose files.
    seen = 0
    while chunk := reader.read(64 << 10):
        if chunk.count(0) != len(chunk):
            raise UploadError(
                "the archive has data after its end-of-archive marker; concatenated "
                "archives are not supported",
                code="malformed_archive",
            )
        seen += len(chunk)
        if seen > MAX_TAR_TRAILER_BYTES:
            raise UploadError(
                "the archive has too much padding after its end-of-archive marker",
                code="malformed_archive",
            )


def _describe_tar_error(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "the archive is truncated: the compressed stream ends early"
    if isinstance(exc, gzip.BadGzipFile | zlib.error):
        return "the archive's gzip compression is corrupt"
    text = str(exc)
    if "unexpected end of data" in text:
        return "the archive is truncated"
    return "the upload is not a valid tar archive"


class _ForwardReader:
    """Makes a read-once stream look seekable to tarfile, which only ever seeks forward.

    ``hit_end`` records whether a read came up short, i.e. the stream ended;
    ``last_block`` is the last header-sized block read.
    """

    def __init__(self, source: _BufferedSource | BinaryIO, *, piece_bytes: int | None = None):
        self._source = source
        self._piece_bytes = piece_bytes
        self._position = 0
        self.hit_end = False
        self.last_block = b""

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET or offset < self._position:
            raise tarfile.ReadError("cannot seek backwards in a stream")
        while self._position < offset:
            if not self.read(min(offset - self._position, CHUNK_BYTES)):
                break
        return self._position

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > _MAX_TAR_READ:
            # Only a header that declares an absurd size makes tarfile ask for this much.
            raise UploadError(
                "the archive has a header extension larger than "
                f"{MAX_TAR_HEADER_EXTENSION_BYTES} bytes",
                code="malformed_archive",
            )
        data = _read_exactly(self._source.read, size)
        self._position += len(data)
        if len(data) < size:
            self.hit_end = True
        if size == tarfile.BLOCKSIZE:
            self.last_block = data
        return data

    def readinto(self, buffer: memoryview) -> int:
        if self._piece_bytes is not None:
            buffer = buffer[: self._piece_bytes]
        count = self._source.readinto(buffer) or 0
        self._position += count
        if not count and len(buffer):
            self.hit_end = True
        return count


class _MemberReader:
    """Exactly ``size`` bytes of one member's data, read straight from the archive stream."""

    def __init__(self, reader: _ForwardReader, size: int, path: str):
        self._reader = reader
        self._remaining = size
        self._path = path

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = self._remaining
        data = self._reader.read(min(size, self._remaining))
        self._account(len(data), wanted=min(size, self._remaining))
        return data

    def readinto(self, buffer: memoryview) -> int:
        wanted = min(len(buffer), self._remaining)
        count = self._reader.readinto(buffer[:wanted]) if wanted else 0
        self._account(count, wanted=wanted)
        return count

    def _account(self, count: int, *, wanted: int) -> None:
        if wanted and not count:
            raise UploadError(
                f"the archive is truncated inside member {_shown(self._path)}",
                code="malformed_archive",
            )
        self._remaining -= count


class _BufferedSource:
    """A request body read in large pieces, whatever sizes its callers ask for.

    Streams differ: Werkzeug's request stream and sockets can fill a buffer we own
    (``readinto``); gunicorn's request body can only return new ``bytes`` and copies all
    it holds on every read, so many small reads cost it dearly. Small reads (tar headers,
    multipart parsing) are served from one reused 1 MiB buffer; large ones bypass it.
    """

    def __init__(self, stream: BinaryIO):
        self._read = stream.read
        self._readinto = getattr(stream, "readinto", None)
        self._buffer = memoryview(bytearray(CHUNK_BYTES))
        self._start = 0
        self._end = 0

    def peek(self, size: int) -> bytes:
        """The first ``size`` bytes of the body (fewer only if it is shorter); call first."""
        assert self._start == 0 and size <= len(self._buffer)
        while self._end < size:
            count = self._fill(self._buffer[self._end :])
            if not count:
                break
            self._end += count
        return bytes(self._buffer[: min(size, self._end)])

    def read_view(self, size: int) -> memoryview:
        """Up to ``size`` bytes as a view that is valid until the next call; empty at the end."""
        if self._start == self._end:
            self._start, self._end = 0, self._fill(self._buffer)
        count = min(size, self._end - self._start)
        view = self._buffer[self._start : self._start + count]
        self._start += count
        return view

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes; fewer does not mean the end, ``b""`` does."""
        return bytes(self.read_view(size if size >= 0 else CHUNK_BYTES))

    def readinto(self, target: memoryview) -> int:
        if self._start == self._end and len(target) >= _DIRECT_READ_BYTES:
            return self._fill(target)
        view = self.read_view(len(target))
        target[: len(view)] = view
        return len(view)

    def _fill(self, target: memoryview) -> int:
        if self._readinto is not None:
            return self._readinto(target) or 0
        data = self._read(len(target))
        target[: len(data)] = data
        return len(data)


def _read_exactly(read: Callable[[int], bytes], size: int) -> bytes:
    """Up to ``size`` bytes, fewer only at the end of the stream (sockets read short)."""
    data = read(size)
    if len(data) >= size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


# -- multipart ----------------------------------------------------------------------------


def _multipart_boundary(content_type_header: str) -> bytes:
    mimetype, options = parse_options_header(content_type_header or "")
    if mimetype != "multipart/form-data":
        raise _malformed_multipart(
            f"expected Content-Type multipart/form-data, got {_shown(mimetype or '')}"
        )
    boundary = options.get("boundary", "")
    if not boundary:
        raise _malformed_multipart("the Content-Type header has no boundary")
    if not _BOUNDARY_RE.fullmatch(boundary):
        raise _malformed_multipart("the multipart boundary is not valid (RFC 2046)")
    return boundary.encode("ascii")


def _multipart_events(
    body: _BufferedSource, boundary: bytes
) -> Iterator[MultipartSegment | bytes | None]:
    """Each part's headers (a ``MultipartSegment``), its data in non-empty chunks, then
    ``None``; read from the body one piece at a time.

    The parser (``multipart``) keeps only a possible partial boundary between pieces, so a
    piece may end anywhere: Werkzeug's decoder, used before, added a stray byte to a file
    when a read ended inside the closing boundary. It skips a preamble without holding it;
    a preamble or an epilogue longer than ``MAX_MULTIPART_HEADER_BYTES`` is refused here,
    so that no client keeps a worker reading bytes that are no upload.
    """
    parser = PushMultipartParser(boundary, max_header_size=MAX_MULTIPART_HEADER_BYTES)
    preamble = 0
    started = False
    try:
        while not parser.closed:
            piece = bytes(body.read_view(MULTIPART_FEED_BYTES))  # b"": the end, checked
            for event in parser.parse(piece):
                started = True
                yield event
            if not started:
                preamble += len(piece)
                if preamble > MAX_MULTIPART_HEADER_BYTES:
                    raise _malformed_multipart(
                        f"preamble longer than {MAX_MULTIPART_HEADER_BYTES} bytes"
                    )
    except ParserLimitReached as exc:
        raise _malformed_multipart(
            f"a part header line longer than {MAX_MULTIPART_HEADER_BYTES} bytes, or too many "
            f"part headers ({exc})"
        ) from None
    except MultipartError as exc:
        raise _malformed_multipart(f"the multipart body is truncated or malformed: {exc}") from None
    epilogue = 0
    while piece := body.read_view(MULTIPART_FEED_BYTES):
        epilogue += len(piece)
        if epilogue > MAX_MULTIPART_HEADER_BYTES:
            raise _malformed_multipart(f"epilogue longer than {MAX_MULTIPART_HEADER_BYTES} bytes")


def _filename(segment: MultipartSegment) -> str:
    """The part's filename as the client wrote it, read with Werkzeug's header parser:
    RFC 2231 ``filename*`` decoded, and a Windows path kept whole (so that it is refused as
    a path, not cut down to its last component)."""
    _disposition, options = parse_options_header(segment.header("Content-Disposition", ""))
    return options.get("filename", "")


def _part_data(events: Iterator[MultipartSegment | bytes | None]) -> Iterator[bytes]:
    """The data of the part whose headers ``events`` just produced, chunk by chunk."""
    for event in events:
        if event is None:
            return
        if isinstance(event, MultipartSegment):
            raise _malformed_multipart("a part starts inside another")
        yield event
    raise _malformed_multipart("the multipart body is truncated")


def _malformed_multipart(message: str) -> UploadError:
    return UploadError(message, code="malformed_multipart")


def _shown(name: str) -> str:
    """A client-supplied name made safe to quote in a message (escaped, bounded)."""
    text = repr(name)
    if len(text) > _SHOWN_NAME_CHARS:
        text = text[: _SHOWN_NAME_CHARS - 4] + "…" + text[-3:]
    return text
