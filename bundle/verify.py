#!/usr/bin/env python3
"""Verify an Animus Datalab offline bundle before anything in it runs.

This file ships at the root of every bundle. It imports nothing outside Python's standard
library and trusts nothing inside the bundle: the release key comes from the host's GnuPG
keyring, from ``--keyring FILE`` or is pinned with ``--trust-fingerprint``. The host's own
``gpg`` checks every signature.

    python3 verify.py                                 # the unpacked bundle this file is in
    python3 verify.py DIR --trust-fingerprint FPR     # an unpacked bundle
    python3 verify.py animus-1.2.0.tar --target DIR   # outer signature, safe unpack, all files

A ``.tar`` is checked in this order: the detached signature ``animus-V.tar.sig`` over the
whole file (or over its parts, put together in the order ``animus-V.tar.parts.json`` lists),
then the signed ``MANIFEST.json`` inside, then every member's name, type and size against
the manifest before a byte is written, then every file's size and SHA-256 in parallel.

Exit 0 only for a good bundle; every refusal has its own exit status (see ``REFUSALS``
and docs/bundle.md). On success it prints the bundle version, the SHA-256 of
``MANIFEST.json`` and the signer's fingerprint.
"""

from __future__ import annotations

import contextlib

# Imported at the top: what the hashing threads need. The rest (argparse, re, json,
# pathlib, subprocess, …) is imported where it is used, once the threads started: those
# imports then overlap the hashing instead of delaying it (dataclasses, 14 ms of imports,
# is not used at all). Every millisecond before the first byte is hashed costs 0.1 % of
# the throughput of a 2 GiB bundle.
import hashlib
import io
import mmap
import os
import stat
import sys
import threading
from collections import namedtuple  # collections comes with threading

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import argparse
    import datetime as dt
    import subprocess
    import tarfile  # imported where a .tar is read: a directory is verified without it
    import tempfile
    from pathlib import Path, PurePosixPath

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_SIGNATURE_NAME = "MANIFEST.json.asc"
MANIFEST_FORMAT = "animus-bundle-manifest/1"
PARTS_FORMAT = "animus-bundle-parts/1"
#: A manifest or its signature larger than this is not one of ours; refuse before reading it.
MAX_MANIFEST_BYTES = 64 << 20
CHUNK = 1 << 20
#: Bytes per read while hashing: one reused buffer per thread, so every byte is copied once
#: from the page cache into memory the core has cached and hashed there. (hashlib lets go of
#: the GIL only for buffers over 2 KiB.)
READ_SIZE = 1 << 20
# Files this large are hashed through mappings of the page cache instead of read into a
# buffer, MAP_SLICE bytes at a time.
MAP_FROM = 8 << 20
MAP_SLICE = 8 << 20
# Files smaller than this cost more in system calls and GIL hand-overs than in hashing: the
# checking thread hashes them itself while the threads hash the larger ones, instead of
# the threads fighting over the GIL for them at the end.
SMALL_FILE = 64 << 10

#: Every refusal: code → (exit status, what it means). docs/bundle.md shows this table.
REFUSALS: dict[str, tuple[int, str]] = {
    "error": (1, "the verifier could not run to the end (I/O error, unreadable input)"),
    "usage": (2, "bad command line"),
    "gpg_unavailable": (3, "the host has no working gpg"),
    "signature_missing": (10, "a detached signature is missing"),
    "signature_bad": (11, "a signature does not match the signed bytes"),
    "key_unknown": (12, "the signing key is not in the trusted keyring"),
    "key_untrusted": (13, "the signing key is not the trust anchor, or is expired or revoked"),
    "manifest_invalid": (20, "MANIFEST.json is not a valid manifest"),
    "file_missing": (21, "a file the manifest lists is missing"),
    "file_extra": (22, "a file the manifest does not list is present"),
    "size_mismatch": (23, "a file's size differs from the manifest"),
    "hash_mismatch": (24, "a file's SHA-256 differs from the manifest"),
    "unsafe_member": (30, "an unsafe path, link, device node or member type"),
    "size_exceeds_manifest": (31, "archive members larger than the manifest allows"),
    "parts_mismatch": (32, "the parts of a split bundle do not belong together"),
    "downgrade": (40, "the bundle is older than the installed version"),
    "upgrade_unsupported": (41, "the installed version is older than the bundle upgrades from"),
    "expired": (42, "the bundle is past its expiry time"),
}


class Refusal(Exception):
    """The bundle is refused; CODE picks the exit status from ``REFUSALS``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def exit_status(self) -> int:
        """The process exit status for this refusal."""
        return REFUSALS[self.code][0]


class Verified(namedtuple("Verified", "version manifest_sha256 signer_fingerprint files bytes")):
    """What a good bundle proved: the installer records this as its first audit event."""

    __slots__ = ()

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "status": "ok",
            "version": self.version,
            "manifest_sha256": self.manifest_sha256,
            "signer_fingerprint": self.signer_fingerprint,
            "files": self.files,
            "bytes": self.bytes,
        }


def _now() -> dt.datetime:
    import datetime as dt

    # Not dt.UTC: this file also runs on hosts whose python3 is older than 3.11.
    return dt.datetime.now(dt.timezone.utc)  # noqa: UP017


def _say(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


# --- versions -----------------------------------------------------------------------------

_VERSION_PATTERN = r"^(\d+(?:\.\d+)*)(?:(a|b|rc)(\d+))?$"
_PRE_ORDER = {"a": 0, "b": 1, "rc": 2}


def parse_version(text: str) -> tuple:
    """A sortable key for a release version: ``1.2.0`` and ``1.2.0rc1`` (a < b < rc < final).

    Trailing ``.0`` parts do not count (``1.2`` == ``1.2.0``).
    """
    import re

    match = re.match(_VERSION_PATTERN, text.strip())
    if not match:
        raise ValueError(f"not a release version: {text!r}")
    release = [int(part) for part in match[1].split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    pre = (_PRE_ORDER[match[2]], int(match[3])) if match[2] else (3, 0)
    return (tuple(release), pre)


# --- gpg ----------------------------------------------------------------------------------


class TrustAnchor(
    namedtuple("TrustAnchor", "fingerprints keyring gnupghome", defaults=((), None, None))
):
    """Where the release key comes from: pinned fingerprints (a tuple) and/or a keyring
    file, else the host keyring's own trust (only fully or ultimately trusted keys)."""

    __slots__ = ()


def _normal_fingerprint(value: str) -> str:
    fpr = value.replace(" ", "").upper()
    if fpr.startswith("0X"):
        fpr = fpr[2:]
    import re

    if not re.fullmatch(r"[0-9A-F]{40}|[0-9A-F]{64}", fpr):
        raise ValueError(f"not a full key fingerprint: {value!r}")
    return fpr


class SignatureChecker:
    """Checks detached signatures with the host's gpg against one trust anchor."""

    def __init__(self, anchor: TrustAnchor):
        import shutil

        self.anchor = anchor
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.home = os.fspath(anchor.gnupghome or os.environ.get("GNUPGHOME") or "") or None
        self.gpg = shutil.which("gpg")  # run by its path: no search of PATH per call
        if self.gpg is None:
            raise Refusal("gpg_unavailable", "gpg was not found on PATH; install gnupg")
        if anchor.keyring is not None:
            # A throwaway home holding only the given keys: nothing else can vouch.
            import tempfile  # here, not at the top: most runs never need it

            self._tmp = tempfile.TemporaryDirectory(prefix="animus-verify-gpg-")
            self.home = self._tmp.name
            os.chmod(self.home, 0o700)
            proc = self._gpg(["--import", str(anchor.keyring)])
            if proc.returncode != 0 and "IMPORT_OK" not in proc.stdout:
                raise Refusal("key_unknown", f"no public key could be read from {anchor.keyring}")

    def close(self) -> None:
        """Remove the throwaway keyring, if one was made."""
        if self._tmp is not None:
            import subprocess

            subprocess.run(
                ["gpgconf", "--homedir", self.home, "--kill", "all"],
                capture_output=True,
                check=False,
            )
            self._tmp.cleanup()
            self._tmp = None

    def _gpg(self, args: list[str], stdin=None) -> subprocess.CompletedProcess:
        import subprocess

        command = [self.gpg, "--batch", "--no-tty", "--status-fd", "1"]
        if self.home is not None:
            command += ["--homedir", self.home]
        try:
            return subprocess.run(
                command + args,
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
            )
        except OSError as exc:
            raise Refusal("gpg_unavailable", f"gpg could not be started: {exc}") from exc

    def verify(self, signature: str | Path, data: str | Path | None, what: str, stream=None) -> str:
        """Check SIGNATURE over DATA (a file, or STREAM fed to gpg's stdin) and return the
        signer's primary key fingerprint; refuse a bad signature or an untrusted key."""
        name = os.path.basename(signature)
        if not os.path.isfile(signature):
            raise Refusal("signature_missing", f"{what}: signature {name} is missing")
        if stream is not None:
            proc = self._gpg_stream(signature, stream)
        else:
            proc = self._gpg(["--verify", str(signature), str(data)])
        status = [
            line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("[GNUPG:] ")
        ]
        keywords = {fields[0]: fields[1:] for fields in status if fields}
        if "BADSIG" in keywords:
            raise Refusal("signature_bad", f"{what}: BAD signature (the signed bytes were changed)")
        if "NO_PUBKEY" in keywords or ("ERRSIG" in keywords and keywords["ERRSIG"][-1:] == ["9"]):
            key = (keywords.get("NO_PUBKEY") or keywords["ERRSIG"])[0]
            raise Refusal(
                "key_unknown",
                f"{what}: signed by key {key}, which is not in the trusted keyring",
            )
        if "VALIDSIG" not in keywords:
            if "NODATA" in keywords or "ERRSIG" in keywords:
                raise Refusal("signature_bad", f"{what}: {name} is not a valid signature")
            raise Refusal("signature_bad", f"{what}: gpg did not report a good signature")
        if "EXPKEYSIG" in keywords or "REVKEYSIG" in keywords:
            state = "expired" if "EXPKEYSIG" in keywords else "revoked"
            raise Refusal("key_untrusted", f"{what}: the signing key is {state}")
        if "EXPSIG" in keywords:
            raise Refusal("signature_bad", f"{what}: the signature has expired")
        validsig = keywords["VALIDSIG"]
        signing_fpr = validsig[0].upper()
        primary_fpr = validsig[9].upper() if len(validsig) > 9 else signing_fpr
        self._check_trust(keywords, {signing_fpr, primary_fpr}, what)
        return primary_fpr

    def _gpg_stream(self, signature: Path, stream) -> subprocess.CompletedProcess:
        command = [self.gpg, "--batch", "--no-tty", "--status-fd", "1"]
        if self.home is not None:
            command += ["--homedir", self.home]
        command += ["--verify", str(signature), "-"]
        import subprocess
        import tempfile

        with tempfile.TemporaryFile("w+") as out:
            try:
                fd = stream.fileno()  # one file: gpg reads it itself, no copy through a pipe
            except OSError:  # io.UnsupportedOperation: parts put together here
                fd = None
            if fd is not None:
                os.lseek(fd, stream.tell(), os.SEEK_SET)
                proc = subprocess.Popen(command, stdin=fd, stdout=out, stderr=subprocess.DEVNULL)
                returncode = proc.wait()
                out.seek(0)
                return subprocess.CompletedProcess(command, returncode, out.read(), "")
            proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.DEVNULL
            )
            try:
                while chunk := stream.read(CHUNK):
                    proc.stdin.write(chunk)
            except BrokenPipeError:
                pass  # gpg stopped reading: its status output says why
            finally:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
            returncode = proc.wait()
            out.seek(0)
            return subprocess.CompletedProcess(command, returncode, out.read(), "")

    def _check_trust(self, keywords: dict, signer: set[str], what: str) -> None:
        pinned = {_normal_fingerprint(f) for f in self.anchor.fingerprints}
        if pinned:
            if not pinned & signer:
                raise Refusal(
                    "key_untrusted",
                    f"{what}: signed by {max(signer)}, which is not the trusted fingerprint "
                    f"({', '.join(sorted(pinned))})",
                )
            return
        if self.anchor.keyring is not None:
            return  # only the given keyring's keys can verify in the throwaway home
        if "TRUST_ULTIMATE" not in keywords and "TRUST_FULLY" not in keywords:
            raise Refusal(
                "key_untrusted",
                f"{what}: signed by {max(signer)}, which the host keyring does not trust "
                "(give --trust-fingerprint, or set the key's owner trust)",
            )


# --- the manifest -------------------------------------------------------------------------


def safe_relative_path(name: str) -> PurePosixPath | None:
    """NAME as a relative path inside the tree, or None if it is absolute, climbs with
    ``..``, or holds characters a bundle never uses (backslash, NUL, empty parts)."""
    from pathlib import PurePosixPath

    if not name or "\\" in name or "\x00" in name or name.startswith("/"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return PurePosixPath(*parts)


def _is_canonical(name: str) -> bool:
    """NAME is a relative path in its one spelling: what ``safe_relative_path`` accepts and
    would write the same way (no empty, ``.`` or ``..`` parts), checked without a path
    object per manifest entry."""
    if not name or "\\" in name or "\x00" in name:
        return False
    return not any(part in ("", ".", "..") for part in name.split("/"))


class Manifest(namedtuple("Manifest", "raw version created expires min_upgrade_from files images")):
    """A parsed, signature-checked MANIFEST.json: its bytes, version, created and expires
    (aware datetimes), min_upgrade_from (or None), files (path → (sha256 hex, size)) and
    images (the manifest's image entries)."""

    __slots__ = ()

    @property
    def sha256(self) -> str:
        """SHA-256 of the manifest bytes as signed."""
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def total_size(self) -> int:
        """Bytes of every listed file."""
        return sum(size for _, size in self.files.values())


def _time(value: object, field: str) -> dt.datetime:
    import datetime as dt

    if not isinstance(value, str):
        raise Refusal("manifest_invalid", f"manifest field {field} is not a time")
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise Refusal("manifest_invalid", f"manifest field {field} is not RFC 3339") from exc
    if parsed.tzinfo is None:
        raise Refusal("manifest_invalid", f"manifest field {field} has no time zone")
    return parsed


def parse_manifest(raw: bytes) -> Manifest:
    """Parse and check the shape of a manifest (its signature is checked separately)."""
    import json
    import re

    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Refusal("manifest_invalid", f"MANIFEST.json is not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise Refusal("manifest_invalid", f"MANIFEST.json is not {MANIFEST_FORMAT}")
    version = data.get("version")
    try:
        parse_version(version if isinstance(version, str) else "")
        if data.get("min_upgrade_from") is not None:
            parse_version(data["min_upgrade_from"])
    except ValueError as exc:
        raise Refusal("manifest_invalid", f"manifest: {exc}") from exc
    files: dict[str, tuple[str, int]] = {}
    sha256_hex = re.compile(r"[0-9a-f]{64}").fullmatch
    for entry in data.get("files") or []:
        path = entry.get("path") if isinstance(entry, dict) else None
        canonical = isinstance(path, str) and _is_canonical(path)
        sha, size = (entry.get("sha256"), entry.get("size")) if isinstance(entry, dict) else (0, 0)
        if not canonical or path in (MANIFEST_NAME, MANIFEST_SIGNATURE_NAME):
            raise Refusal("manifest_invalid", f"manifest lists an invalid path {path!r}")
        if not (isinstance(sha, str) and sha256_hex(sha)):
            raise Refusal("manifest_invalid", f"manifest: {path} has no valid sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise Refusal("manifest_invalid", f"manifest: {path} has no valid size")
        if path in files:
            raise Refusal("manifest_invalid", f"manifest lists {path} twice")
        files[path] = (sha, size)
    images = data.get("images") or []
    for image in images:
        _check_image_entry(image, files)
    return Manifest(
        raw=raw,
        version=version,
        created=_time(data.get("created"), "created"),
        expires=_time(data.get("expires"), "expires"),
        min_upgrade_from=data.get("min_upgrade_from"),
        files=files,
        images=images,
    )


def _check_image_entry(image: object, files: dict[str, tuple[str, int]]) -> None:
    """An image's digest must name a manifest blob of its OCI layout that hashes to it."""
    import re

    if not isinstance(image, dict):
        raise Refusal("manifest_invalid", "manifest: an image entry is not an object")
    digest, layout = image.get("digest"), image.get("path")
    if not (isinstance(digest, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", digest)):
        raise Refusal("manifest_invalid", f"manifest: image {image.get('name')} has no digest")
    blob = f"{layout}/blobs/sha256/{digest[7:]}"
    if files.get(blob, ("",))[0] != digest[7:] or f"{layout}/index.json" not in files:
        raise Refusal(
            "manifest_invalid",
            f"manifest: image {image.get('name')} digest {digest} is not a blob of its layout",
        )


def check_policy(
    manifest: Manifest,
    installed: str | None,
    allow_downgrade: bool,
    now: dt.datetime,
) -> None:
    """Refuse an expired bundle, a downgrade and an unsupported upgrade path."""
    if now >= manifest.expires:
        raise Refusal(
            "expired",
            f"bundle {manifest.version} expired at {manifest.expires.isoformat()}; "
            "ask for a current bundle",
        )
    if installed is None:
        return
    try:
        installed_key = parse_version(installed)
    except ValueError as exc:
        raise Refusal("error", f"installed version: {exc}") from exc
    if parse_version(manifest.version) < installed_key and not allow_downgrade:
        raise Refusal(
            "downgrade",
            f"bundle {manifest.version} is older than the installed {installed.strip()} "
            "(--allow-downgrade to install it anyway)",
        )
    if manifest.min_upgrade_from and installed_key < parse_version(manifest.min_upgrade_from):
        raise Refusal(
            "upgrade_unsupported",
            f"bundle {manifest.version} upgrades from {manifest.min_upgrade_from} or newer; "
            f"installed is {installed.strip()}: upgrade in steps",
        )


# --- an unpacked directory ----------------------------------------------------------------


def _advise_sequential(fd: int) -> None:
    """Tell the kernel the file is read once from start to end (more read-ahead when the
    page cache is cold; nothing to gain or lose when it is warm)."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def _read_buffer() -> mmap.mmap:
    """A reusable read buffer on its own pages. Page-aligned matters: the kernel copies from
    the page cache into it at memory speed, where a buffer at an odd offset inside a page
    (as malloc places a bytearray) measured up to four times slower to fill."""
    return mmap.mmap(-1, READ_SIZE)


class _Stopped(Exception):
    """Ends a hashing thread that was told to stop."""


class _Resized(Exception):
    """A mapped file changed size while it was hashed."""


def _hash_file(
    path: str | Path, buffer: memoryview | None = None, stop: list | None = None
) -> tuple[str, int]:
    """SHA-256 hex and size of PATH, read with ``readv`` into BUFFER (one thread's reusable
    buffer; a new one if none is given), or through a mapping when it is large. A large
    file's hashing ends early (``_Stopped``) once STOP, a shared list, is not empty."""
    if buffer is None:
        with _read_buffer() as mapped, memoryview(mapped) as view:
            return _hash_file(path, view, stop)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        length = os.fstat(fd).st_size
        if length >= MAP_FROM:
            try:
                return _hash_mapped(fd, length, stop), length
            except _Resized:
                raise OSError(f"{path} changed size while it was hashed") from None
        if length > len(buffer):
            _advise_sequential(fd)
        digest = hashlib.sha256()
        size = 0
        while count := os.readv(fd, (buffer,)):
            # Over 2 KiB, update() lets go of the GIL: the threads hash on every core.
            if count < len(buffer):  # a short read of a regular file: its end
                digest.update(buffer[:count])
                size += count
                break
            digest.update(buffer)
            size += count
    finally:
        os.close(fd)
    return digest.hexdigest(), size


def _hash_mapped(fd: int, length: int, stop: list | None = None) -> str:
    """SHA-256 hex of a large file hashed straight from the page cache through read-only
    mappings: no copy into a buffer (about a tenth less CPU than reading). Each slice is
    mapped on its own with its pages faulted in up front (MAP_POPULATE): mmap() holds the
    GIL while it populates (8 ms for a 300 MiB file at once, stalling every other thread),
    a slice's worth takes a quarter of a millisecond; update() then hashes it without.

    Touching a mapped page past the end of a file that shrank meanwhile kills the process
    (SIGBUS): a slice is mapped only while the file still reaches past it (mmap checks), so
    only a cut during one slice's hashing is left to that; a file whose size changed is
    ``_Resized``."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    digest = hashlib.sha256()
    for start in range(0, length, MAP_SLICE):
        if stop:
            raise _Stopped
        size = min(MAP_SLICE, length - start)
        try:
            mapped = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ, offset=start)
        except ValueError:  # mmap's own check: the file no longer reaches this far
            raise _Resized from None
        with mapped, memoryview(mapped) as view:
            digest.update(view)
    if os.fstat(fd).st_size != length:
        raise _Resized
    return digest.hexdigest()


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers() -> int:
    """Hashing threads: cores + 2, so that a thread waiting for the disk (cold page cache)
    leaves no core idle; from a warm page cache it costs nothing measurable."""
    return min(32, usable_cores() + 2)


class Hashing:
    """SHA-256 hex and size of every path, hashed by WORKERS threads that start at once:
    the calling thread goes on with other work and collects the digests with ``wait()``.

    Each thread takes the next path from a shared list and reads it into its own buffer:
    no task objects per file, and no thread waits while another still has files to take.
    Give the largest files first, so that one large file does not start last and leave the
    other threads idle. The first error (an unreadable file) stops every thread and
    ``wait()`` raises it; ``stop()`` ends the threads early.
    """

    def __init__(self, paths: list[str], workers: int | None = None):
        self._results: list[tuple[str, int]] = [("", 0)] * len(paths)
        self._jobs = enumerate(paths)  # next() on it is atomic under the GIL
        count = min(workers or default_workers(), len(paths))
        self._progress = [0] * count
        self._failures: list[BaseException] = []
        self._stop: list[bool] = []  # not empty: every thread ends at its next check
        self._threads = [threading.Thread(target=self._work, args=(n,)) for n in range(count)]
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    def _work(self, slot: int) -> None:
        try:
            with _read_buffer() as mapped, memoryview(mapped) as buffer:
                for index, path in self._jobs:
                    if self._stop:
                        return
                    self._results[index] = _hash_file(path, buffer, self._stop)
                    self._progress[slot] += self._results[index][1]
        except _Stopped:
            return
        except BaseException as exc:  # handed to the waiting thread, raised there
            self._failures.append(exc)
            self._stop.append(True)

    def wait(self, total: int = 0, quiet: bool = True) -> list[tuple[str, int]]:
        """The digests and sizes in the order of the paths given; progress on stderr
        against TOTAL bytes unless QUIET."""
        last_report = 0
        for thread in self._threads:
            alive = True
            while alive:
                thread.join(None if quiet or not total else 0.05)
                alive = thread.is_alive()
                done = sum(self._progress)
                step = done - last_report
                if not quiet and total and step > 0 and (step >= total // 10 or done == total):
                    last_report = done
                    _say(f"  hashed {done / (1 << 20):.0f} / {total / (1 << 20):.0f} MiB")
        if self._failures:
            raise self._failures[0]
        return self._results

    def stop(self) -> None:
        """End the threads (a large file at its next slice) and wait for them."""
        self._stop.append(True)
        for thread in self._threads:
            thread.join()


def hash_files(
    paths: list[str], workers: int | None = None, total: int = 0, quiet: bool = True
) -> list[tuple[str, int]]:
    """SHA-256 hex and size of every path, in the order given (see ``Hashing``)."""
    return Hashing(paths, workers).wait(total, quiet)


def _tree(root: str) -> tuple[dict[str, os.stat_result], Refusal | None]:
    """Every regular file under ROOT by relative POSIX path, and the refusal the first
    link, device or fifo in the tree earns (returned: the caller raises it in its turn)."""
    found: dict[str, os.stat_result] = {}
    pending = [(root, "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError:
            continue  # as os.walk: an unreadable folder lists nothing, so its files are missing
        subdirs = []
        for entry in entries:
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                subdirs.append((entry.path, rel + "/"))
                continue
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                return found, Refusal(
                    "unsafe_member", f"{rel} is a symbolic link; a bundle holds none"
                )
            if not stat.S_ISREG(info.st_mode):
                return found, Refusal(
                    "unsafe_member", f"{rel} is not a regular file (device or fifo)"
                )
            found[rel] = info
        pending.extend(reversed(subdirs))
    return found, None


def _listing(
    root: str | Path, files: dict[str, tuple[str, int]]
) -> tuple[dict[str, os.stat_result], list[str]]:
    """Every regular file under ROOT and the ones FILES does not list; refuse links,
    devices and the like."""
    found, problem = _tree(os.fspath(root))
    if problem is not None:
        raise problem
    extra = sorted(set(found) - set(files) - {MANIFEST_NAME, MANIFEST_SIGNATURE_NAME})
    return found, extra


def _few(paths: list[str]) -> str:
    shown = ", ".join(paths[:5])
    return shown + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


class TreeHashing:
    """An unpacked bundle's files, listed and hashed on threads from the moment this is
    made, while the calling thread checks the manifest's signature and policy. Nothing is
    decided on a file before the manifest is trusted: ``check`` first raises what the
    listing found, then compares the tree with the manifest, and only then the digests.
    Files in HASHED (SHA-256 and size of files hashed as they were unpacked) are not read
    again; small files are hashed by ``check`` itself, after the tree matched the manifest.
    ``stop()`` ends the threads (always call it: a refusal needs no more digests)."""

    def __init__(
        self,
        root: str | Path,
        workers: int | None = None,
        hashed: dict[str, tuple[str, int]] | None = None,
    ):
        self._root = root = os.fspath(root)
        self._found, self._problem = _tree(root)
        self._hashed = dict(hashed or {})
        skip = {MANIFEST_NAME, MANIFEST_SIGNATURE_NAME, *self._hashed}
        todo = [] if self._problem else [p for p in self._found if p not in skip]
        self._small = [p for p in todo if self._found[p].st_size < SMALL_FILE]
        self._order = [p for p in todo if self._found[p].st_size >= SMALL_FILE]
        self._order.sort(key=lambda p: self._found[p].st_size, reverse=True)
        self._hashing = Hashing([os.path.join(root, p) for p in self._order], workers)

    def check(self, manifest: Manifest, quiet: bool = True) -> None:
        """Refuse links and devices, missing, extra, resized or changed files."""
        if self._problem is not None:
            raise self._problem
        found = self._found
        missing = sorted(set(manifest.files) - set(found))
        if missing:
            raise Refusal("file_missing", f"{len(missing)} listed file(s) missing: {_few(missing)}")
        extra = sorted(set(found) - set(manifest.files) - {MANIFEST_NAME, MANIFEST_SIGNATURE_NAME})
        if extra:
            raise Refusal("file_extra", f"{len(extra)} file(s) not in the manifest: {_few(extra)}")
        resized = [p for p, (_, size) in manifest.files.items() if found[p].st_size != size]
        if resized:
            first = resized[0]
            raise Refusal(
                "size_mismatch",
                f"{len(resized)} file(s) differ in size from the manifest: "
                f"{_few(sorted(resized))} ({first}: {found[first].st_size} bytes, manifest "
                f"says {manifest.files[first][1]})",
            )
        results = dict(self._hashed)
        with _read_buffer() as mapped, memoryview(mapped) as buffer:
            for path in self._small:
                results[path] = _hash_file(os.path.join(self._root, path), buffer)
        total = sum(found[p].st_size for p in self._order)
        results.update(zip(self._order, self._hashing.wait(total, quiet), strict=True))
        changed = [p for p in manifest.files if results[p] != manifest.files[p]]
        if changed:
            raise Refusal(
                "hash_mismatch",
                f"{len(changed)} file(s) do not match their SHA-256: {_few(sorted(changed))}",
            )

    def stop(self) -> None:
        """End the hashing threads."""
        self._hashing.stop()


def verify_files(
    root: str | Path,
    manifest: Manifest,
    workers: int | None = None,
    quiet: bool = False,
    hashed: dict[str, tuple[str, int]] | None = None,
) -> None:
    """Refuse links, devices, missing, extra, resized or changed files; hash in parallel
    threads the files whose SHA-256 and size HASHED does not already hold."""
    tree = TreeHashing(root, workers, hashed)
    try:
        tree.check(manifest, quiet)
    finally:
        tree.stop()


def _read_small(path: str | Path, what: str) -> bytes:
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size > MAX_MANIFEST_BYTES:
            raise Refusal(
                "size_exceeds_manifest", f"{what} is larger than {MAX_MANIFEST_BYTES} bytes"
            )
        return handle.read()


def verify_directory(
    root: str | Path,
    checker: SignatureChecker,
    installed: str | None = None,
    allow_downgrade: bool = False,
    now: dt.datetime | None = None,
    workers: int | None = None,
    quiet: bool = False,
    hashed: dict[str, tuple[str, int]] | None = None,
    tree: TreeHashing | None = None,
) -> Verified:
    """Verify the unpacked bundle at ROOT: manifest signature, policy, then every file
    (HASHED: SHA-256 and size of files this process wrote and hashed as it wrote them).
    TREE: ROOT's files already being hashed (``TreeHashing``); else they start here, and
    are hashed while the signature is checked."""
    manifest_path = os.path.join(root, MANIFEST_NAME)
    if not os.path.isfile(manifest_path) or os.path.islink(manifest_path):
        raise Refusal("file_missing", f"{MANIFEST_NAME} is missing from {root}")
    tree = tree or TreeHashing(root, workers, hashed)
    try:
        _say("checking the manifest signature", quiet)
        signature = os.path.join(root, MANIFEST_SIGNATURE_NAME)
        signer = checker.verify(signature, manifest_path, MANIFEST_NAME)
        manifest = parse_manifest(_read_small(manifest_path, MANIFEST_NAME))
        check_policy(manifest, installed, allow_downgrade, now or _now())
        size = manifest.total_size / (1 << 20)
        _say(f"checking {len(manifest.files)} files ({size:.0f} MiB)", quiet)
        tree.check(manifest, quiet)
    finally:
        tree.stop()
    return Verified(
        manifest.version, manifest.sha256, signer, len(manifest.files), manifest.total_size
    )


# --- a .tar, whole or in parts ------------------------------------------------------------


class ConcatenatedFiles(io.RawIOBase):
    """Several files read as one seekable stream (the parts of a split bundle)."""

    def __init__(self, paths: list[Path]):
        super().__init__()
        self._files = [open(p, "rb") for p in paths]  # noqa: SIM115 - closed in close()
        self._starts: list[int] = []
        offset = 0
        for handle in self._files:
            self._starts.append(offset)
            offset += os.fstat(handle.fileno()).st_size
        self._size = offset
        self._pos = 0

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        """The file descriptor of a stream of one file (the offset is set by each read)."""
        if len(self._files) != 1:
            raise io.UnsupportedOperation("a stream of several parts has no file descriptor")
        return self._files[0].fileno()

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        # Fill the whole buffer across part boundaries: tarfile treats a short read as EOF.
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view) and self._pos < self._size:
            index = max(i for i, start in enumerate(self._starts) if start <= self._pos)
            handle = self._files[index]
            handle.seek(self._pos - self._starts[index])
            n = handle.readinto(view[filled:])
            if not n:
                break  # the part shrank since it was measured
            filled += n
            self._pos += n
        return filled

    def close(self) -> None:
        for handle in self._files:
            handle.close()
        super().close()


def _parts_of(index_path: Path) -> tuple[list[Path], Path]:
    """Check the parts listed by a ``.parts.json`` index; return them and the bundle's name."""
    import json
    from pathlib import PurePosixPath

    try:
        index = json.loads(_read_small(index_path, index_path.name))
        assert index["format"] == PARTS_FORMAT
        listed = [(p["name"], int(p["size"]), p["sha256"]) for p in index["parts"]]
        bundle_name = index["bundle"]
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise Refusal("parts_mismatch", f"{index_path.name} is not a parts index") from exc
    directory = index_path.parent
    paths = []
    for name, size, sha in listed:
        if safe_relative_path(name) != PurePosixPath(name) or "/" in name:
            raise Refusal("parts_mismatch", f"{index_path.name} names an unsafe part {name!r}")
        path = directory / name
        if not path.is_file():
            raise Refusal("parts_mismatch", f"part {name} is missing")
        if path.stat().st_size != size or _hash_file(path)[0] != sha:
            raise Refusal(
                "parts_mismatch",
                f"part {name} does not belong to this bundle (its size or SHA-256 differs "
                f"from {index_path.name}); parts of different bundles were mixed",
            )
        paths.append(path)
    stray = sorted(
        p.name
        for p in directory.glob(f"{bundle_name}.part-*")
        if p.name not in {name for name, _, _ in listed}
    )
    if stray:
        raise Refusal(
            "parts_mismatch", f"parts not in {index_path.name} are present: {_few(stray)}"
        )
    return paths, directory / bundle_name


def _member_problem(member: tarfile.TarInfo, rel: PurePosixPath) -> str | None:
    import tarfile
    from pathlib import PurePosixPath

    if member.issym():
        target = PurePosixPath(member.linkname)
        inside = safe_relative_path(str(rel.parent / target)) if not target.is_absolute() else None
        if inside is None:
            return f"{member.name} is a symbolic link leaving the tree (-> {member.linkname})"
        return f"{member.name} is a symbolic link; a bundle holds none"
    if member.ischr() or member.isblk():
        return f"{member.name} is a device node"
    if member.isfifo():
        return f"{member.name} is a fifo"
    if member.type == tarfile.GNUTYPE_SPARSE or getattr(member, "sparse", None):
        return f"{member.name} is a sparse file"
    if not (member.isreg() or member.isdir() or member.islnk()):
        return f"{member.name} has an unsupported member type {member.type!r}"
    return None


def _plan_unpack(
    members: list[tarfile.TarInfo],
) -> tuple[str, dict[str, tarfile.TarInfo], list[tarfile.TarInfo]]:
    """Check every member's name and type; return the top folder, the files by relative
    path and the directories. Nothing has been written yet."""
    from pathlib import PurePosixPath

    files: dict[str, tarfile.TarInfo] = {}
    directories: list[tarfile.TarInfo] = []
    top: str | None = None
    for member in members:
        rel = safe_relative_path(member.name)
        if rel is None:
            raise Refusal("unsafe_member", f"unsafe member name {member.name!r} (absolute or ..)")
        top = top or rel.parts[0]
        if rel.parts[0] != top:
            raise Refusal("unsafe_member", f"{member.name} is outside the bundle's folder {top}/")
        problem = _member_problem(member, rel)
        if problem:
            raise Refusal("unsafe_member", problem)
        inner = PurePosixPath(*rel.parts[1:]).as_posix() if len(rel.parts) > 1 else ""
        if member.isdir():
            directories.append(member)
            continue
        if not inner:
            raise Refusal("unsafe_member", f"{member.name} is a file in place of the folder")
        if member.islnk():
            source = safe_relative_path(member.linkname)
            if source is None or source.parts[0] != top:
                raise Refusal(
                    "unsafe_member",
                    f"{member.name} is a hard link out of the tree (-> {member.linkname})",
                )
            linked = PurePosixPath(*source.parts[1:]).as_posix()
            if linked not in files or not files[linked].isreg():
                raise Refusal(
                    "unsafe_member", f"{member.name} is a hard link to no earlier file in the tree"
                )
        if inner in files:
            raise Refusal("unsafe_member", f"{member.name} appears twice in the archive")
        files[inner] = member
    if top is None:
        raise Refusal("file_missing", "the archive is empty")
    return top, files, directories


class _SideHasher:
    """A second thread that hashes a chunk while the calling thread writes it to disk:
    unpacking reads every byte once, and hashing adds no time of its own."""

    def __init__(self) -> None:
        self._mapped = _read_buffer()
        self.buffer = memoryview(self._mapped)  #: where the calling thread reads chunks
        self._job: tuple | None = None
        self._error: BaseException | None = None
        self._begin = threading.Semaphore(0)
        self._end = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._begin.acquire()
            if self._job is None:
                return
            digest, data = self._job
            try:
                digest.update(data)
            except BaseException as exc:  # handed to the calling thread, raised there
                self._error = exc
            self._end.release()

    def update(self, digest, data: memoryview, write) -> None:
        """DIGEST.update(DATA) on the side thread while WRITE(DATA) runs on this one."""
        if len(data) < (64 << 10):
            digest.update(data)  # not worth a hand-over
            write(data)
            return
        self._job = (digest, data)
        self._begin.release()
        try:
            write(data)
        finally:
            self._end.acquire()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> _SideHasher:
        return self

    def __exit__(self, *exc_info) -> None:
        self._job = None  # stop the side thread
        self._begin.release()
        self._thread.join()
        self.buffer.release()
        self._mapped.close()


def _data_member(member: tarfile.TarInfo, files: dict) -> tarfile.TarInfo:
    """The member whose bytes unpacking MEMBER writes: a hard link is unpacked as a copy of
    the earlier file it names (``_plan_unpack`` checked that there is one), so its size is
    that file's, not the 0 its own header says."""
    if not member.islnk():
        return member
    from pathlib import PurePosixPath

    source = safe_relative_path(member.linkname)
    return files[PurePosixPath(*source.parts[1:]).as_posix()]


def _extract_member(
    stream: ConcatenatedFiles,
    member: tarfile.TarInfo,
    target: Path,
    files: dict,
    buffer: memoryview,
    hasher: _SideHasher,
) -> tuple[str, int]:
    """Write MEMBER's bytes (read straight from the archive: a regular member's data is one
    run of bytes) to the new file TARGET; return the SHA-256 hex and size of what was written."""
    import tarfile

    member = _data_member(member, files)
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    fd = os.open(target, flags, 0o755 if member.mode & 0o111 else 0o644)
    digest = hashlib.sha256()
    written = 0
    with os.fdopen(fd, "wb") as out:
        stream.seek(member.offset_data)
        while written < member.size:
            count = stream.readinto(buffer[: min(len(buffer), member.size - written)])
            if not count:
                raise tarfile.ReadError("unexpected end of data")
            hasher.update(digest, buffer[:count], out.write)
            written += count
    return digest.hexdigest(), written


def verify_tar(
    tar_path: Path,
    target: Path,
    checker: SignatureChecker,
    installed: str | None = None,
    allow_downgrade: bool = False,
    now: dt.datetime | None = None,
    workers: int | None = None,
    quiet: bool = False,
) -> Verified:
    """Verify a bundle .tar (or the ``.parts.json`` of a split one) and unpack it into
    TARGET (absent or empty): outer signature, member checks against the signed manifest,
    every file. A refused bundle leaves TARGET as it found it."""
    import tarfile  # here, not at the top: a directory is verified without it

    existed = target.exists()
    if existed and (not target.is_dir() or any(target.iterdir())):
        raise Refusal("usage", f"target {target} is not an empty directory")
    try:
        return _unpack_and_verify(
            tar_path, target, checker, installed, allow_downgrade, now, workers, quiet
        )
    except (Refusal, OSError, tarfile.TarError):
        import shutil

        if target.is_dir():
            for child in target.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            if not existed:
                target.rmdir()
        raise


def _unpack_and_verify(
    tar_path: Path,
    target: Path,
    checker: SignatureChecker,
    installed: str | None = None,
    allow_downgrade: bool = False,
    now: dt.datetime | None = None,
    workers: int | None = None,
    quiet: bool = False,
) -> Verified:
    import tarfile

    if tar_path.name.endswith(".parts.json"):
        parts, bundle = _parts_of(tar_path)
        _say(f"{len(parts)} parts belong together", quiet)
        stream = ConcatenatedFiles(parts)
        signature = bundle.with_name(bundle.name + ".sig")
    else:
        if not tar_path.is_file():
            raise Refusal("file_missing", f"{tar_path} does not exist")
        stream = ConcatenatedFiles([tar_path])
        signature = tar_path.with_name(tar_path.name + ".sig")
        bundle = tar_path
    with stream:
        _say(f"checking the signature of {bundle.name} with the host's gpg", quiet)
        signer = checker.verify(signature, None, bundle.name, stream=stream)
        stream.seek(0)
        try:
            archive = tarfile.open(fileobj=stream, mode="r:")  # noqa: SIM115 - closed below
            members = archive.getmembers()
        except tarfile.TarError as exc:
            raise Refusal("unsafe_member", f"{bundle.name} is not a readable tar: {exc}") from exc
        with archive, _SideHasher() as hasher:
            buffer = hasher.buffer
            _top, files, _dirs = _plan_unpack(members)
            target.mkdir(parents=True, exist_ok=True)
            for name in (MANIFEST_NAME, MANIFEST_SIGNATURE_NAME):
                if name not in files:
                    if name == MANIFEST_SIGNATURE_NAME:
                        raise Refusal("signature_missing", f"{name} is missing from the bundle")
                    raise Refusal("file_missing", f"{name} is missing from the bundle")
                if _data_member(files[name], files).size > MAX_MANIFEST_BYTES:
                    raise Refusal("size_exceeds_manifest", f"{name} is implausibly large")
                _extract_member(stream, files[name], target / name, files, buffer, hasher)
            _say("checking the manifest signature", quiet)
            checker.verify(target / MANIFEST_SIGNATURE_NAME, target / MANIFEST_NAME, MANIFEST_NAME)
            manifest = parse_manifest((target / MANIFEST_NAME).read_bytes())
            check_policy(manifest, installed, allow_downgrade, now or _now())
            _check_members_against(manifest, files)
            _say(f"unpacking {len(files)} files into {target}", quiet)
            total = manifest.total_size
            written = last_report = 0
            hashed: dict[str, tuple[str, int]] = {}
            for inner, member in files.items():
                if inner in (MANIFEST_NAME, MANIFEST_SIGNATURE_NAME):
                    continue
                hashed[inner] = _extract_member(
                    stream, member, target / inner, files, buffer, hasher
                )
                written += _data_member(member, files).size
                if not quiet and total and written - last_report >= total // 10:
                    last_report = written
                    _say(f"  unpacked {written / (1 << 20):.0f} / {total / (1 << 20):.0f} MiB")
    # Every file was hashed as it was written, into a new file (O_EXCL) of a folder that was
    # empty: the check below compares those digests instead of reading everything again.
    result = verify_directory(
        target, checker, installed, allow_downgrade, now, workers, quiet, hashed=hashed
    )
    if result.signer_fingerprint != signer:
        raise Refusal("key_untrusted", "the bundle and its manifest are signed by different keys")
    return result


def _check_members_against(manifest: Manifest, files: dict[str, tarfile.TarInfo]) -> None:
    """Before any file is written: no member the manifest does not list, none larger than
    the manifest says, and no more bytes in all than the manifest holds. A hard link counts
    with the size of the file it copies: many links to one large file are a bomb too."""
    extra = sorted(set(files) - set(manifest.files) - {MANIFEST_NAME, MANIFEST_SIGNATURE_NAME})
    if extra:
        raise Refusal("file_extra", f"{len(extra)} member(s) not in the manifest: {_few(extra)}")
    total = 0
    for inner, member in files.items():
        if inner in (MANIFEST_NAME, MANIFEST_SIGNATURE_NAME):
            continue
        allowed = manifest.files[inner][1]
        size = _data_member(member, files).size
        if size > allowed:
            raise Refusal(
                "size_exceeds_manifest",
                f"member {inner} would unpack to {size} bytes; the manifest allows "
                f"{allowed} (refused before unpacking)",
            )
        total += size
    if total > manifest.total_size:
        raise Refusal(
            "size_exceeds_manifest",
            f"the archive would unpack to {total} bytes; the manifest allows {manifest.total_size}",
        )


# --- command line -------------------------------------------------------------------------


def _installed_version(args: argparse.Namespace) -> str | None:
    source = args.installed_version_file
    if source is None and args.install_dir is not None:
        source = os.path.join(args.install_dir, "VERSION")
        if not os.path.exists(source):
            return None  # nothing installed there yet: a first installation
    if source is None:
        return None
    try:
        with open(source, encoding="utf-8") as handle:
            return handle.read().splitlines()[0].strip()
    except (OSError, IndexError, UnicodeDecodeError) as exc:
        raise Refusal("error", f"cannot read the installed version from {source}") from exc


def _exit_table() -> str:
    return "\n".join(
        f"  {status:>3}  {code:<22} {text}" for code, (status, text) in REFUSALS.items()
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python3 verify.py``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="verify.py",
        description="Verify an Animus Datalab bundle (directory, .tar or .tar.parts.json).",
        epilog="exit status: 0 good bundle, else\n" + _exit_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "bundle",
        nargs="?",
        help="unpacked bundle directory, animus-V.tar or animus-V.tar.parts.json "
        "(default: the directory this file is in)",
    )
    parser.add_argument(
        "--trust-fingerprint",
        action="append",
        default=[],
        metavar="FPR",
        help="accept only signatures by this key (repeatable); the key itself comes from the "
        "keyring",
    )
    parser.add_argument(
        "--keyring", help="public key file(s) to verify with instead of the host keyring"
    )
    parser.add_argument("--gnupghome", help="GnuPG home of the host keyring (default: $GNUPGHOME)")
    parser.add_argument("--target", help="where a .tar is unpacked (must be empty)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--installed-version-file", help="file holding the version now installed")
    group.add_argument("--install-dir", help="installation whose VERSION file to read")
    parser.add_argument("--allow-downgrade", action="store_true")
    parser.add_argument("--workers", type=int, help="hashing threads (default: cores + 2)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def _input_errors() -> tuple[type[Exception], ...]:
    """I/O errors, and tarfile's once a .tar was read (tarfile is imported only for one)."""
    tarfile = sys.modules.get("tarfile")
    return (OSError, tarfile.TarError) if tarfile is not None else (OSError,)


def _print_json(value: dict) -> None:
    import json

    print(json.dumps(value, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    """Run the verifier; return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    checker = tree = None
    # An unpacked bundle's files are hashed on threads from the start, while the command
    # line, the signature and the manifest are checked; verify_directory looks at the
    # digests last. install.sh names the bundle first: then the threads start even before
    # argparse is loaded.
    try:
        if argv and not argv[0].startswith("-") and os.path.isdir(argv[0]):
            tree = TreeHashing(argv[0])
        args = build_parser().parse_args(argv)
        bundle = args.bundle or os.path.dirname(os.path.realpath(__file__))
        if tree is not None and args.workers is not None:
            tree.stop()  # started with the default number of threads
            tree = None
        if tree is None and os.path.isdir(bundle):
            tree = TreeHashing(bundle, args.workers)
        try:
            anchor = TrustAnchor(
                tuple(_normal_fingerprint(f) for f in args.trust_fingerprint),
                args.keyring,
                args.gnupghome,
            )
        except ValueError as exc:
            raise Refusal("usage", str(exc)) from exc
        if args.keyring is not None and not os.path.isfile(args.keyring):
            raise Refusal("usage", f"keyring {args.keyring} does not exist")
        installed = _installed_version(args)
        checker = SignatureChecker(anchor)
        common = dict(
            installed=installed,
            allow_downgrade=args.allow_downgrade,
            workers=args.workers,
            quiet=args.quiet,
        )
        if tree is not None:
            result = verify_directory(bundle, checker, tree=tree, **common)
        else:
            from pathlib import Path

            path = Path(bundle)
            stem = path.name.removesuffix(".parts.json").removesuffix(".tar")
            target = Path(args.target) if args.target else path.parent / stem
            result = verify_tar(path, target, checker, **common)
    except Refusal as refusal:
        status = refusal.exit_status
        print(f"verify.py: REFUSED ({refusal.code}): {refusal.message}", file=sys.stderr)
        if args.json:
            _print_json(
                {
                    "status": "refused",
                    "code": refusal.code,
                    "exit": status,
                    "message": refusal.message,
                }
            )
        return status
    except _input_errors() as exc:
        print(f"verify.py: REFUSED (error): {exc}", file=sys.stderr)
        return REFUSALS["error"][0]
    finally:
        if tree is not None:
            tree.stop()
        if checker is not None:
            checker.close()
    if args.json:
        _print_json(result.as_dict())
    else:
        print(f"verified: animus {result.version}")
        print(f"manifest sha256: {result.manifest_sha256}")
        print(f"signer fingerprint: {result.signer_fingerprint}")
        print(f"files: {result.files} ({result.bytes} bytes)")
    return 0


if __name__ == "__main__":
    status = main()
    # Everything is written and closed: leave without the interpreter's teardown (freeing
    # every module takes longer than a small bundle's whole check).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
