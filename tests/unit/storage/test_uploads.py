"""Tar and multipart uploads turned into staged blobs: real archives, real files, no mocks."""

from __future__ import annotations

import base64
import bz2
import gzip
import hashlib
import io
import os
import tarfile

import pytest
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from appliance.errors import UploadError
from appliance.storage.blobs import CHUNK_BYTES, BlobStore
from appliance.storage.uploads import (
    UploadedFile,
    UploadLimits,
    normalize_member_path,
    read_multipart_stream,
    read_tar_stream,
)

LIMITS = UploadLimits(max_total_bytes=64 << 20)


@pytest.fixture
def store(tmp_path):
    return BlobStore(tmp_path / "blobs")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CountingStream:
    """A request-body-like stream that records how much was read from it."""

    def __init__(self, data: bytes, piece: int | None = None):
        self._data = io.BytesIO(data)
        self._piece = piece
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        if self._piece is not None and (size < 0 or size > self._piece):
            size = self._piece
        data = self._data.read(size)
        self.bytes_read += len(data)
        return data


# -- building archives -------------------------------------------------------------------


def file_entry(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special_entry(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def dir_entry(name: str) -> tuple[tarfile.TarInfo, None]:
    return special_entry(name, tarfile.DIRTYPE)


def make_tar(entries, *, compression: str = "", fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}", format=fmt) as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def upload_tar(store: BlobStore, body: bytes, limits: UploadLimits = LIMITS, piece=None):
    """Stage and promote like the API does; return the files and what promote created."""
    with store.stage() as staged:
        files = read_tar_stream(CountingStream(body, piece), staged, limits)
        created = staged.promote()
    return files, created


def assert_refused(store, call, code: str, *fragments: str) -> UploadError:
    """``call(staged)`` fails with ``code``, leaving no temp file and no blob behind."""
    with pytest.raises(UploadError) as caught, store.stage() as staged:
        call(staged)
    error = caught.value
    assert error.code == code, error.message
    for fragment in fragments:
        assert fragment in error.message
    assert os.listdir(store.tmp_dir) == []
    assert [path for path in store.blob_dir.rglob("*") if path.is_file()] == []
    return error


def refuse_tar(store, body: bytes, code: str, *fragments: str, limits=LIMITS) -> UploadError:
    return assert_refused(
        store,
        lambda staged: read_tar_stream(io.BytesIO(body), staged, limits),
        code,
        *fragments,
    )


# -- normalize_member_path -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.txt", "a.txt"),
        ("./a.txt", "a.txt"),
        ("././dir/a.txt", "dir/a.txt"),
        ("dir//sub///a.txt", "dir/sub/a.txt"),
        ("dir/./a.txt", "dir/a.txt"),
        ("dir/sub/", "dir/sub"),
        ("..a/b..", "..a/b.."),
        ("名前/ファイル.csv", "名前/ファイル.csv"),
        ("with space/a b", "with space/a b"),
    ],
)
def test_normalize_member_path_accepts(name, expected):
    assert normalize_member_path(name) == expected


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("/etc/passwd", "unsafe_archive_member"),
        ("//server/share", "unsafe_archive_member"),
        ("..", "unsafe_archive_member"),
        ("../escape", "unsafe_archive_member"),
        ("dir/../../escape", "unsafe_archive_member"),
        ("dir/..", "unsafe_archive_member"),
        ("", "invalid_path"),
        (".", "invalid_path"),
        ("./", "invalid_path"),
        ("a\x00b", "invalid_path"),
        ("dir\\a.txt", "invalid_path"),
        ("..\\escape", "invalid_path"),
        ("line\nbreak", "invalid_path"),
        ("bad\udcffutf8", "invalid_path"),
        ("a" * 256, "invalid_path"),
        ("/".join(["d" * 200] * 6), "invalid_path"),
    ],
)
def test_normalize_member_path_refuses(name, code):
    with pytest.raises(UploadError) as caught:
        normalize_member_path(name)
    assert caught.value.code == code


def test_normalize_member_path_message_names_the_member():
    with pytest.raises(UploadError) as caught:
        normalize_member_path("data/../../secret.txt")
    assert "'data/../../secret.txt'" in caught.value.message


def test_normalize_member_path_honours_max_length():
    assert normalize_member_path("abcd", max_length=4) == "abcd"
    with pytest.raises(UploadError) as caught:
        normalize_member_path("abcde", max_length=4)
    assert caught.value.code == "invalid_path"


# -- tar: accepted ---------------------------------------------------------------------------


def test_tar_with_nested_directories(store):
    body = make_tar(
        [
            dir_entry("data"),
            dir_entry("data/train"),
            file_entry("data/train/a.csv", b"x,y\n1,2\n"),
            file_entry("data/train/b.csv", b"x,y\n3,4\n"),
            file_entry("README", b"read me"),
            file_entry("data/empty", b""),
        ]
    )
    files, created = upload_tar(store, body)
    assert files == [
        UploadedFile("README", sha(b"read me"), 7),
        UploadedFile("data/empty", sha(b""), 0),
        UploadedFile("data/train/a.csv", sha(b"x,y\n1,2\n"), 8),
        UploadedFile("data/train/b.csv", sha(b"x,y\n3,4\n"), 8),
    ]
    assert sorted(created) == sorted({f.sha256 for f in files})
    for uploaded in files:
        assert store.path_for(uploaded.sha256).stat().st_size == uploaded.size
    assert os.listdir(store.tmp_dir) == []


def test_gzip_tar_with_large_member(store):
    big = os.urandom(CHUNK_BYTES) * 2 + b"tail"
    body = make_tar([file_entry("big.bin", big), file_entry("small", b"s")], compression="gz")
    files, _ = upload_tar(store, body)
    assert files == [
        UploadedFile("big.bin", sha(big), len(big)),
        UploadedFile("small", sha(b"s"), 1),
    ]
    assert store.path_for(sha(big)).read_bytes() == big


def test_tar_from_a_stream_with_short_reads(store):
    payload = os.urandom(3 * CHUNK_BYTES + 17)
    body = make_tar([file_entry("p", payload), file_entry("q", b"q")])
    files, _ = upload_tar(store, body, piece=65_536)
    assert files == [UploadedFile("p", sha(payload), len(payload)), UploadedFile("q", sha(b"q"), 1)]


def test_tar_of_current_directory_gets_relative_paths(store):
    # What `tar -cf - -C dir .` produces.
    body = make_tar([dir_entry("."), dir_entry("./sub"), file_entry("./sub/f", b"f")])
    files, _ = upload_tar(store, body)
    assert [f.path for f in files] == ["sub/f"]


def test_identical_members_are_stored_once(store):
    body = make_tar([file_entry("a", b"same"), file_entry("b", b"same")])
    files, created = upload_tar(store, body)
    assert [f.sha256 for f in files] == [sha(b"same")] * 2
    assert created == [sha(b"same")]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_formats_and_long_names(store, fmt):
    name = "dir/" + "n" * 90 if fmt == tarfile.USTAR_FORMAT else "d/" * 80 + "file"
    files, _ = upload_tar(store, make_tar([file_entry(name, b"long")], fmt=fmt))
    assert files == [UploadedFile(name, sha(b"long"), 4)]


# `tar --sparse --format=gnu -cf - sparse.bin` of a 5 MiB file holding b"hello" at offset
# 3,000,000 and b"tail" at 5,242,000, zeros elsewhere; gzip and base64 to keep it short.
GNU_SPARSE_TAR_GZ_B64 = (
    "H4sIAAAAAAACA+3QbQoCIRSFYZfiCsKrTrOQVmAw0IBkqO0/EYqKmH7ERMT7INyDHwinnEIu02Y/H9VqTLP1vs/m"
    "adqeZXBGjDdtKWPFyKD0Tn3BudSQtVY5pbp07935J+2Ic/6uEblm68bx5b5/bLLnpQ9uDwAA+AuHKcZEDQAAAAAA"
    "AADw82qYIy0AAACs5wKVYM0HACgAAA=="
)


def test_gnu_sparse_member_is_expanded(store):
    expected = bytearray(5 << 20)
    expected[3_000_000:3_000_005] = b"hello"
    expected[5_242_000:5_242_004] = b"tail"
    body = gzip.decompress(base64.b64decode(GNU_SPARSE_TAR_GZ_B64))
    files, _ = upload_tar(store, body)
    assert files == [UploadedFile("sparse.bin", sha(bytes(expected)), len(expected))]


def test_tar_with_zero_padding_to_a_large_record_is_accepted(store):
    body = make_tar([file_entry("a", b"a")]) + bytes(1 << 20)
    files, _ = upload_tar(store, body)
    assert [f.path for f in files] == ["a"]


# -- tar: refused ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        (special_entry("link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
        (special_entry("link", tarfile.SYMTYPE, "../../outside"), "symbolic link"),
        (special_entry("link", tarfile.LNKTYPE, "data/a"), "hard link"),
        (special_entry("link", tarfile.CHRTYPE), "character device"),
        (special_entry("link", tarfile.BLKTYPE), "block device"),
        (special_entry("link", tarfile.FIFOTYPE), "FIFO"),
        (special_entry("link", b"V"), "unsupported type"),
    ],
)
def test_tar_refuses_special_members(store, entry, fragment):
    body = make_tar([file_entry("data/a", b"a"), entry])
    refuse_tar(store, body, "unsafe_archive_member", "'link'", fragment)


@pytest.mark.parametrize("name", ["/etc/cron.d/evil", "../evil", "data/../../evil"])
def test_tar_refuses_members_escaping_the_upload(store, name):
    body = make_tar([file_entry("ok", b"ok"), file_entry(name, b"evil")])
    refuse_tar(store, body, "unsafe_archive_member", repr(name))


def test_tar_refuses_directory_escaping_the_upload(store):
    body = make_tar([dir_entry("../outside"), file_entry("ok", b"ok")])
    refuse_tar(store, body, "unsafe_archive_member", "'../outside'")


def test_tar_refuses_duplicate_paths(store):
    body = make_tar([file_entry("a/b", b"1"), file_entry("./a//b", b"2")])
    refuse_tar(store, body, "duplicate_path", "'a/b'")


def test_tar_refuses_a_path_that_is_file_and_directory(store):
    body = make_tar([file_entry("a", b"file"), file_entry("a/b", b"below a file")])
    refuse_tar(store, body, "duplicate_path", "'a'")


@pytest.mark.parametrize("compression", ["", "gz"])
def test_tar_refuses_huge_declared_size_before_reading_data(store, compression):
    # A header declaring a terabyte, then 8 MiB of data: refused on the header alone,
    # after at most the one buffer the header arrived in.
    info = tarfile.TarInfo("bomb.bin")
    info.size = 1 << 40
    body = info.tobuf(tarfile.PAX_FORMAT) + os.urandom(8 * CHUNK_BYTES)
    if compression == "gz":
        body = gzip.compress(body, compresslevel=1)
    stream = CountingStream(body)
    assert_refused(
        store,
        lambda staged: read_tar_stream(stream, staged, LIMITS),
        "upload_too_large",
        "'bomb.bin'",
    )
    assert stream.bytes_read <= CHUNK_BYTES


def test_gzip_bomb_is_refused_before_it_is_inflated(store):
    zeros = bytes(32 << 20)
    body = make_tar([file_entry("zeros", zeros)], compression="gz")
    assert len(body) < 100_000
    limits = UploadLimits(max_total_bytes=1 << 20)
    refuse_tar(store, body, "upload_too_large", "'zeros'", limits=limits)


def test_tar_refuses_total_beyond_the_limit(store):
    body = make_tar([file_entry("a", b"a" * 600), file_entry("b", b"b" * 600)])
    refuse_tar(store, body, "upload_too_large", "'b'", limits=UploadLimits(max_total_bytes=1000))


def test_tar_refuses_a_file_beyond_the_per_file_limit(store):
    body = make_tar([file_entry("small", b"s"), file_entry("large", b"L" * 101)])
    limits = UploadLimits(max_total_bytes=10_000, max_file_bytes=100)
    refuse_tar(store, body, "upload_too_large", "'large'", "per file", limits=limits)


def test_tar_refuses_too_many_files(store):
    body = make_tar([file_entry(f"f{i}", b"%d" % i) for i in range(4)])
    limits = UploadLimits(max_total_bytes=10_000, max_files=3)
    refuse_tar(store, body, "too_many_files", limits=limits)


def test_tar_refuses_oversized_header_extension(store):
    # A pax header block that claims 100 MiB of attributes; tarfile would read it whole.
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = 100 << 20
    body = info.tobuf(tarfile.USTAR_FORMAT) + bytes(4 * CHUNK_BYTES)
    refuse_tar(store, body, "malformed_archive", "header extension")


def test_gzip_tar_refuses_oversized_header_extension_without_inflating_it(store):
    # 500 KB on the wire that tarfile's own stream mode would inflate into memory whole.
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = 512 << 20
    body = gzip.compress(info.tobuf(tarfile.USTAR_FORMAT) + bytes(8 << 20))
    stream = CountingStream(body)
    assert_refused(
        store,
        lambda staged: read_tar_stream(stream, staged, LIMITS),
        "malformed_archive",
        "header extension",
    )


def test_truncated_tar_inside_member_data(store):
    body = make_tar([file_entry("a", b"a" * 5000), file_entry("b", os.urandom(20_000))])
    cut = body.index(b"b" + bytes(99)) + 512 + 1000  # into b's data
    refuse_tar(store, body[:cut], "malformed_archive", "truncated")


def test_truncated_tar_at_a_member_boundary(store):
    complete = make_tar([file_entry("a", b"a" * 512), file_entry("b", b"b" * 512)])
    body = complete[: 4 * tarfile.BLOCKSIZE]  # both members, no end-of-archive marker
    refuse_tar(store, body, "malformed_archive", "truncated")


def test_truncated_gzip_tar(store):
    body = make_tar([file_entry("a", os.urandom(50_000))], compression="gz")
    refuse_tar(store, body[: len(body) // 2], "malformed_archive", "truncated")


def test_corrupt_gzip_tar(store):
    body = bytearray(make_tar([file_entry("a", b"hello" * 1000)], compression="gz"))
    body[-6] ^= 0xFF  # the CRC in the trailer
    refuse_tar(store, bytes(body), "malformed_archive", "gzip")


def test_garbage_is_not_an_archive(store):
    refuse_tar(store, os.urandom(10_000), "malformed_archive", "not a valid tar archive")


def test_garbage_header_after_a_member(store):
    body = make_tar([file_entry("a", b"a")])
    body = body[: 2 * tarfile.BLOCKSIZE] + os.urandom(tarfile.BLOCKSIZE) + bytes(1024)
    refuse_tar(store, body, "malformed_archive", "invalid header")


def test_concatenated_archives_are_refused(store):
    body = make_tar([file_entry("a", b"a")]) + make_tar([file_entry("b", b"b")])
    refuse_tar(store, body, "malformed_archive", "concatenated")


def test_bzip2_is_refused_by_name(store):
    body = make_tar([file_entry("a", b"a")], compression="bz2")
    assert body.startswith(b"BZh")
    refuse_tar(store, body, "malformed_archive", "bzip2")
    refuse_tar(store, bz2.compress(b"x"), "malformed_archive", "bzip2")


def test_empty_archive(store):
    refuse_tar(store, make_tar([]), "empty_upload")


def test_archive_with_only_directories_is_empty(store):
    refuse_tar(store, make_tar([dir_entry("a"), dir_entry("a/b")]), "empty_upload")


def test_empty_body(store):
    refuse_tar(store, b"", "empty_upload")
    refuse_tar(store, gzip.compress(b""), "malformed_archive")


# -- multipart ---------------------------------------------------------------------------


BOUNDARY = "----animus-test-boundary-7MA4YWxkTrZu0gW"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def encode_multipart(parts, boundary: str = BOUNDARY) -> bytes:
    """Build a body by hand as RFC 7578 describes: (name, filename or None, data) parts."""
    out = io.BytesIO()
    for name, filename, data in parts:
        out.write(f"--{boundary}\r\n".encode())
        disposition = f'Content-Disposition: form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out.write(disposition.encode() + b"\r\n")
        if filename is not None:
            out.write(b"Content-Type: application/octet-stream\r\n")
        out.write(b"\r\n" + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


def upload_multipart(store, body: bytes, content_type=CONTENT_TYPE, limits=LIMITS, piece=None):
    with store.stage() as staged:
        files = read_multipart_stream(CountingStream(body, piece), content_type, staged, limits)
        created = staged.promote()
    return files, created


def refuse_multipart(store, body, code, *fragments, content_type=CONTENT_TYPE, limits=LIMITS):
    return assert_refused(
        store,
        lambda staged: read_multipart_stream(io.BytesIO(body), content_type, staged, limits),
        code,
        *fragments,
    )


def test_multipart_files_become_uploaded_files(store):
    tricky = b"line\r\n--" + BOUNDARY.encode()[:-1] + b"\r\n\r\nstill data\r\n"
    body = encode_multipart(
        [
            ("note", None, b"a form field, ignored"),
            ("file", "train/a.csv", b"x,y\n1,2\n"),
            ("file", "./b.bin", tricky),
            ("file", "empty.txt", b""),
        ]
    )
    files, created = upload_multipart(store, body)
    assert files == [
        UploadedFile("b.bin", sha(tricky), len(tricky)),
        UploadedFile("empty.txt", sha(b""), 0),
        UploadedFile("train/a.csv", sha(b"x,y\n1,2\n"), 8),
    ]
    assert sorted(created) == sorted(f.sha256 for f in files)
    assert store.path_for(sha(tricky)).read_bytes() == tricky


@pytest.mark.parametrize("piece", [None, 1000, 65_537])
def test_multipart_large_files_across_chunks(store, piece):
    big = os.urandom(2 * CHUNK_BYTES + 333)
    with_newlines = (b"\r\n" * 1000 + b"\r") * 700
    body = encode_multipart([("f", "big", big), ("f", "nl", with_newlines)])
    files, _ = upload_multipart(store, body, piece=piece)
    assert files == [
        UploadedFile("big", sha(big), len(big)),
        UploadedFile("nl", sha(with_newlines), len(with_newlines)),
    ]


class SplitStream:
    """A body that arrives in two reads split at one position, as a socket may deliver it."""

    def __init__(self, data: bytes, at: int):
        self._pieces = [data[:at], data[at:]]

    def read(self, size: int = -1) -> bytes:
        while self._pieces:
            piece = self._pieces.pop(0)
            if piece:
                return piece
        return b""


def test_multipart_split_anywhere_keeps_every_byte(store):
    # Network reads end anywhere; each split position must give back exactly what was sent
    # (a split just before the closing boundary's CRLF once left a stray "\r" on the file).
    parts = [("f", "loans.csv", b"a,b\n1,2\n"), ("note", None, b"x"), ("f", "cr", b"\r\n\r")]
    body = encode_multipart(parts)
    expected = [
        UploadedFile("cr", sha(b"\r\n\r"), 3),
        UploadedFile("loans.csv", sha(b"a,b\n1,2\n"), 8),
    ]
    wrong = []
    for at in range(1, len(body)):
        with store.stage() as staged:
            files = read_multipart_stream(SplitStream(body, at), CONTENT_TYPE, staged, LIMITS)
        if files != expected:
            wrong.append((at, body[at - 4 : at + 4], files))
    assert wrong == []


def test_multipart_one_byte_at_a_time(store):
    body = encode_multipart([("f", "a.bin", b"\r\n--x\r" * 50)])
    files, _ = upload_multipart(store, body, piece=1)
    assert files == [UploadedFile("a.bin", sha(b"\r\n--x\r" * 50), 300)]


def test_multipart_utf8_filename(store):
    body = (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="f"; '
        "filename*=UTF-8''donn%C3%A9es%2F%C3%A9t%C3%A9.csv"
        f"\r\n\r\nabc\r\n--{BOUNDARY}--\r\n"
    ).encode()
    files, _ = upload_multipart(store, body)
    assert [f.path for f in files] == ["données/été.csv"]


def test_multipart_empty_file_input_is_ignored(store):
    # What a browser sends for a file input nobody filled in.
    body = encode_multipart([("empty", "", b""), ("f", "a", b"a")])
    files, _ = upload_multipart(store, body)
    assert [f.path for f in files] == ["a"]


def test_multipart_truncated_body(store):
    body = encode_multipart([("f", "a.bin", os.urandom(50_000)), ("f", "b", b"b")])
    refuse_multipart(store, body[:30_000], "malformed_multipart", "truncated")


def test_multipart_without_closing_boundary(store):
    body = encode_multipart([("f", "a", b"a")])
    refuse_multipart(store, body[: -len(f"--{BOUNDARY}--\r\n")], "malformed_multipart")


def test_multipart_empty_body(store):
    refuse_multipart(store, b"", "malformed_multipart")


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/form-data",
        "multipart/form-data; boundary=",
        "multipart/form-data; boundary=" + "x" * 71,
        'multipart/form-data; boundary="bad\\"quote"',
        "application/x-tar",
        "",
    ],
)
def test_multipart_missing_or_invalid_boundary(store, content_type):
    body = encode_multipart([("f", "a", b"a")])
    refuse_multipart(store, body, "malformed_multipart", content_type=content_type)


def test_multipart_wrong_boundary(store):
    body = encode_multipart([("f", "a", b"a")], boundary="other")
    refuse_multipart(store, body, "malformed_multipart")


@pytest.mark.parametrize(
    ("filename", "code"),
    [
        ("../../etc/passwd", "unsafe_archive_member"),
        ("/etc/passwd", "unsafe_archive_member"),
        ("C:\\\\Users\\\\me\\\\a.txt", "invalid_path"),
        (".", "invalid_path"),
    ],
)
def test_multipart_unsafe_filenames(store, filename, code):
    body = encode_multipart([("f", "fine", b"fine"), ("f", filename, b"evil")])
    refuse_multipart(store, body, code)


def test_multipart_unsafe_filename_is_named(store):
    body = encode_multipart([("f", "../secret", b"evil")])
    refuse_multipart(store, body, "unsafe_archive_member", "'../secret'")


def test_multipart_duplicate_paths(store):
    body = encode_multipart([("f", "a/b", b"1"), ("g", "a//b", b"2")])
    refuse_multipart(store, body, "duplicate_path", "'a/b'")


def test_multipart_too_large(store):
    body = encode_multipart([("f", "a", b"a" * 600), ("f", "b", b"b" * 600)])
    refuse_multipart(
        store, body, "upload_too_large", "'b'", limits=UploadLimits(max_total_bytes=1000)
    )


def test_multipart_file_beyond_per_file_limit(store):
    body = encode_multipart([("f", "big", b"x" * (3 * CHUNK_BYTES))])
    limits = UploadLimits(max_total_bytes=10 * CHUNK_BYTES, max_file_bytes=CHUNK_BYTES)
    refuse_multipart(store, body, "upload_too_large", "'big'", "per file", limits=limits)


def test_multipart_ignored_fields_count_against_the_total(store):
    body = encode_multipart([("junk", None, b"j" * 5000), ("f", "a", b"a")])
    refuse_multipart(store, body, "upload_too_large", limits=UploadLimits(max_total_bytes=1000))


def test_multipart_too_many_files(store):
    body = encode_multipart([("f", f"f{i}", b"x") for i in range(4)])
    limits = UploadLimits(max_total_bytes=10_000, max_files=3)
    refuse_multipart(store, body, "too_many_files", limits=limits)


def test_multipart_without_files(store):
    body = encode_multipart([("a", None, b"field"), ("b", None, b"other")])
    refuse_multipart(store, body, "empty_upload")
    refuse_multipart(store, f"--{BOUNDARY}--\r\n".encode(), "empty_upload")


def test_multipart_endless_part_headers(store):
    body = f"--{BOUNDARY}\r\nX-Filler: ".encode() + b"a" * (4 * CHUNK_BYTES)
    refuse_multipart(store, body, "malformed_multipart", "longer than")


def test_multipart_endless_preamble(store):
    refuse_multipart(store, b"p" * (4 * CHUNK_BYTES), "malformed_multipart", "longer than")


def test_multipart_part_without_content_disposition(store):
    body = f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nabc\r\n--{BOUNDARY}--\r\n"
    refuse_multipart(store, body.encode(), "malformed_multipart")


# -- through a real Werkzeug request -------------------------------------------------------


def werkzeug_request(body: bytes, content_type: str) -> Request:
    environ = EnvironBuilder(method="POST", data=body, content_type=content_type).get_environ()
    return Request(environ)


def test_tar_from_a_werkzeug_request_stream(store):
    big = os.urandom(2 * CHUNK_BYTES + 5)
    request = werkzeug_request(
        make_tar([file_entry("d/big", big), file_entry("d/s", b"s")]), "application/x-tar"
    )
    with store.stage() as staged:
        files = read_tar_stream(request.stream, staged, LIMITS)
        staged.promote()
    assert files == [UploadedFile("d/big", sha(big), len(big)), UploadedFile("d/s", sha(b"s"), 1)]
    assert store.path_for(sha(big)).read_bytes() == big


def test_multipart_from_a_werkzeug_request_stream(store):
    big = os.urandom(2 * CHUNK_BYTES + 5)
    request = werkzeug_request(encode_multipart([("f", "d/big", big)]), CONTENT_TYPE)
    with store.stage() as staged:
        files = read_multipart_stream(request.stream, request.content_type, staged, LIMITS)
        staged.promote()
    assert files == [UploadedFile("d/big", sha(big), len(big))]
