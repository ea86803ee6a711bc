#!/usr/bin/env python3
"""Verify an Animus Datalab model export package offline: Python's standard library + gpg.

    python3 verify_export.py PACKAGE.tar --trust-fingerprint FPR [--public-key KEY.asc]

This file imports nothing from the appliance and can be copied alone to an auditor's
machine. It checks, and stops at the first failure with the reason:

1. the tar holds only regular files with safe, unique names;
2. MANIFEST.json carries a good detached GPG signature (MANIFEST.json.asc) by the key whose
   fingerprint you trust — given on the command line, never taken from the package;
3. every other file is listed in the manifest with its exact sha256 and size, and nothing
   is missing or extra;
4. each audit event line is canonical JSON whose chain hash is the one recorded, and events
   adjacent in the chain link to each other;
5. the execution snapshot and the artifact are the ones model_version.json names.

Exit status: 0 verified, 1 verification failed, 2 usage or environment error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

FORMAT = "animus-model-export/1"
MANIFEST = "MANIFEST.json"
SIGNATURE = "MANIFEST.json.asc"
KEY_FILE = "signing-key.asc"
_SMALL_LIMIT = 64 << 20  # files other than the artifact are read into memory
_CHUNK = 1 << 20


class Failed(Exception):
    """The package does not verify."""


def canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def event_hash(prev_hash: str, canonical_text: str) -> str:
    """The audit chain's hash: SHA-256(prev_hash as ASCII hex || canonical UTF-8 text)."""
    return hashlib.sha256(prev_hash.encode("ascii") + canonical_text.encode("utf-8")).hexdigest()


def _safe_name(name: str) -> bool:
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        return False
    normal = posixpath.normpath(name)
    return normal == name and not normal.startswith("..") and "/../" not in f"/{normal}/"


def read_package(path: str) -> tuple[dict[str, tuple[str, int]], dict[str, bytes]]:
    """``({name: (sha256, size)}, {name: content of the small files})``."""
    digests: dict[str, tuple[str, int]] = {}
    small: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                name = member.name
                if not member.isreg():
                    raise Failed(f"{name!r} is not a regular file")
                if not _safe_name(name):
                    raise Failed(f"unsafe member name {name!r}")
                if name in digests:
                    raise Failed(f"{name!r} appears twice")
                stream = archive.extractfile(member)
                digest, size, kept = hashlib.sha256(), 0, []
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    if not name.startswith("artifact/") and size <= _SMALL_LIMIT:
                        kept.append(chunk)
                if size != member.size:
                    raise Failed(f"{name!r} is truncated")
                digests[name] = (digest.hexdigest(), size)
                if not name.startswith("artifact/") and size <= _SMALL_LIMIT:
                    small[name] = b"".join(kept)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise Failed(f"not a readable tar archive: {exc}") from None
    return digests, small


def _normal_fingerprint(text: str) -> str:
    return re.sub(r"\s", "", text).upper()


def verify_signature(manifest: bytes, signature: bytes, public_key: bytes, trusted: str) -> str:
    """Check the detached signature with gpg in a throwaway home; return the signer's fpr."""
    gpg = shutil.which("gpg")
    if gpg is None:
        raise OSError("gpg is not installed")
    home = tempfile.mkdtemp(prefix="verify-export-")
    try:
        os.chmod(home, 0o700)
        for name, data in (("m", manifest), ("m.asc", signature), ("key.asc", public_key)):
            with open(os.path.join(home, name), "wb") as handle:
                handle.write(data)
        base = [gpg, "--batch", "--no-tty", "--homedir", home]
        imported = subprocess.run(
            [*base, "--import", os.path.join(home, "key.asc")], capture_output=True, timeout=60
        )
        if imported.returncode != 0:
            raise Failed("the signing public key cannot be imported")
        checked = subprocess.run(
            [
                *base,
                "--status-fd",
                "1",
                "--verify",
                os.path.join(home, "m.asc"),
                os.path.join(home, "m"),
            ],
            capture_output=True,
            timeout=60,
        )
        status = checked.stdout.decode(errors="replace").splitlines()
        valid = [line.split() for line in status if line.startswith("[GNUPG:] VALIDSIG ")]
        bad = any(
            line.startswith(("[GNUPG:] BADSIG", "[GNUPG:] ERRSIG", "[GNUPG:] EXPKEYSIG"))
            for line in status
        )
        if checked.returncode != 0 or bad or len(valid) != 1:
            raise Failed("MANIFEST.json does not carry a good signature")
        signer, primary = valid[0][2], valid[0][-1]
        if _normal_fingerprint(trusted) not in (signer, primary):
            raise Failed(f"MANIFEST.json is signed by {primary}, not by the trusted key")
        return primary
    finally:
        if shutil.which("gpgconf"):
            subprocess.run(
                ["gpgconf", "--homedir", home, "--kill", "all"], capture_output=True, timeout=30
            )
        shutil.rmtree(home, ignore_errors=True)


def _json(small: dict[str, bytes], name: str) -> object:
    if name not in small:
        raise Failed(f"{name} is missing")
    try:
        return json.loads(small[name].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Failed(f"{name} is not JSON") from None


def verify_audit_slice(small: dict[str, bytes], project_id: str) -> int:
    """Each line canonical, hashed as recorded; neighbours in the chain linked."""
    hashes = _json(small, "audit/hashes.json")
    text = small.get("audit/events.ndjson", b"").decode("utf-8")
    lines = text.split("\n")
    if lines[-1] != "":
        raise Failed("audit/events.ndjson does not end with a newline")
    lines = lines[:-1]
    if not isinstance(hashes, list) or len(hashes) != len(lines):
        raise Failed("audit/hashes.json does not list one hash per event")
    previous: tuple[int, str] | None = None
    for line, recorded in zip(lines, hashes, strict=True):
        try:
            event = json.loads(line)
        except ValueError:
            raise Failed(f"audit event is not JSON: {line[:80]!r}") from None
        if not isinstance(event, dict) or canonical(event) != line:
            raise Failed(f"audit event {recorded.get('seq')} is not canonical JSON")
        seq = event.get("seq")
        if seq != recorded.get("seq"):
            raise Failed(f"audit event {seq} is listed as {recorded.get('seq')}")
        if event_hash(event.get("prev_hash", ""), line) != recorded.get("hash"):
            raise Failed(f"audit event {seq}: hash does not match its content")
        if event.get("project_id") != project_id:
            raise Failed(f"audit event {seq} belongs to another project")
        if previous is not None:
            if seq <= previous[0]:
                raise Failed(f"audit event {seq} is out of order")
            if seq == previous[0] + 1 and event["prev_hash"] != previous[1]:
                raise Failed(f"audit event {seq} does not link to event {previous[0]}")
        previous = (seq, recorded["hash"])
    return len(lines)


def verify_package(path: str, trusted: str, public_key_file: str | None = None) -> str:
    """Verify the package at ``path``; return a one-line summary or raise Failed."""
    digests, small = read_package(path)
    for name in (MANIFEST, SIGNATURE):
        if name not in small:
            raise Failed(f"{name} is missing")
    if public_key_file:
        with open(public_key_file, "rb") as handle:
            public_key = handle.read()
    elif KEY_FILE in small:
        public_key = small[KEY_FILE]
    else:
        raise Failed(f"{KEY_FILE} is missing; pass --public-key")
    signer = verify_signature(small[MANIFEST], small[SIGNATURE], public_key, trusted)

    manifest = _json(small, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise Failed(f"MANIFEST.json is not an {FORMAT} manifest")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise Failed("MANIFEST.json lists no files")
    present = {name for name in digests if name not in (MANIFEST, SIGNATURE)}
    for name in sorted(set(listed) - present):
        raise Failed(f"{name} is listed in the manifest but missing")
    for name in sorted(present - set(listed)):
        raise Failed(f"{name} is in the package but not in the manifest")
    for name in sorted(listed):
        entry = listed[name]
        if (entry.get("sha256"), entry.get("size")) != digests[name]:
            raise Failed(f"{name}: sha256 or size differs from the manifest")

    described = _json(small, "model_version.json")
    artifact = described.get("artifact", {})
    if artifact.get("file") not in listed or listed[artifact["file"]]["sha256"] != artifact.get(
        "sha256"
    ):
        raise Failed("the artifact is not the one model_version.json names")
    snapshot_digest = described.get("source_run", {}).get("snapshot_digest")
    if snapshot_digest is not None and (
        "sha256:" + digests["execution_snapshot.json"][0] != snapshot_digest
    ):
        raise Failed("execution_snapshot.json is not the source run's snapshot")
    events = verify_audit_slice(small, manifest.get("project_id"))
    return (
        f"OK model version {manifest.get('model_version_id')}: {len(listed)} files, "
        f"{events} audit events, signed by {signer}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", help="the export package (.tar)")
    parser.add_argument(
        "--trust-fingerprint",
        required=True,
        help="fingerprint of the installation signing key, obtained out of band",
    )
    parser.add_argument(
        "--public-key", help="the signing public key to use instead of the package's copy"
    )
    args = parser.parse_args(argv)
    try:
        print(verify_package(args.package, args.trust_fingerprint, args.public_key))
    except Failed as failure:
        print(f"FAILED: {failure}")
        return 1
    except (AttributeError, KeyError, TypeError):
        print("FAILED: the signed manifest or model_version.json is malformed")
        return 1
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
