#!/usr/bin/env python3
"""Verify an Animus Datalab audit chain export offline: Python's standard library + gpg.

    python3 verify_audit_export.py EXPORT.tar --trust-fingerprint FPR

This file imports nothing from the appliance and can be copied alone to an auditor's
machine. It checks, and stops at the first failure with the reason:

1. the tar holds exactly MANIFEST.json, MANIFEST.json.asc, events.ndjson, signing-key.asc;
2. MANIFEST.json carries a good detached GPG signature by the key whose fingerprint you
   trust — given on the command line, never taken from the export;
3. the other files have the sha256 and size the manifest lists;
4. the genesis hash is the one derived from the installation id;
5. events.ndjson holds every event from seq 1 to the manifest's last seq, each line
   canonical JSON, each linking to the previous event's hash, and the last hash is the
   signed head hash.

Exit status: 0 verified, 1 verification failed, 2 usage or environment error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

FORMAT = "animus-audit-export/1"
NAMES = {"MANIFEST.json", "MANIFEST.json.asc", "events.ndjson", "signing-key.asc"}
_SMALL_LIMIT = 16 << 20


class Failed(Exception):
    """The export does not verify."""


def canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def genesis_hash(installation_id: str) -> str:
    return hashlib.sha256(f"animus-audit-genesis:{installation_id}".encode()).hexdigest()


def event_hash(prev_hash: str, canonical_text: str) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical_text.encode("utf-8")).hexdigest()


def _read(archive: tarfile.TarFile) -> tuple[dict[str, bytes], str, tuple[str, int]]:
    """Small files in memory; events.ndjson extracted to a temporary file (path, digest)."""
    small: dict[str, bytes] = {}
    events_path, events_digest = "", ("", -1)
    seen: set[str] = set()
    for member in archive:
        if member.name not in NAMES or not member.isreg():
            raise Failed(f"unexpected member {member.name!r}")
        if member.name in seen:
            raise Failed(f"{member.name!r} appears twice")
        seen.add(member.name)
        stream = archive.extractfile(member)
        if member.name == "events.ndjson":
            handle, events_path = tempfile.mkstemp(prefix="animus-events-")
            digest, size = hashlib.sha256(), 0
            with os.fdopen(handle, "wb") as out:
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            events_digest = (digest.hexdigest(), size)
        else:
            if member.size > _SMALL_LIMIT:
                raise Failed(f"{member.name!r} is implausibly large")
            small[member.name] = stream.read()
    missing = NAMES - seen
    if missing:
        raise Failed(f"missing {', '.join(sorted(missing))}")
    return small, events_path, events_digest


def _check_signature(small: dict[str, bytes], trusted: str) -> None:
    if shutil.which("gpg") is None:
        raise RuntimeError("gpg is not installed")
    with tempfile.TemporaryDirectory(prefix="animus-verify-") as home:
        os.chmod(home, 0o700)
        for name in ("MANIFEST.json", "MANIFEST.json.asc", "signing-key.asc"):
            with open(os.path.join(home, name), "wb") as out:
                out.write(small[name])
        gpg = ["gpg", "--batch", "--no-tty", "--homedir", home]
        subprocess.run(
            [*gpg, "--import", os.path.join(home, "signing-key.asc")],
            capture_output=True,
            check=False,
        )
        result = subprocess.run(
            [
                *gpg,
                "--status-fd",
                "1",
                "--verify",
                os.path.join(home, "MANIFEST.json.asc"),
                os.path.join(home, "MANIFEST.json"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if shutil.which("gpgconf"):
            subprocess.run(
                ["gpgconf", "--homedir", home, "--kill", "gpg-agent"],
                capture_output=True,
                check=False,
            )
    signer = None
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[:2] == ["[GNUPG:]", "VALIDSIG"]:
            signer = parts[-1] if len(parts) >= 12 else parts[2]
    if result.returncode != 0 or signer is None:
        raise Failed("MANIFEST.json has no good signature")
    if signer.upper() != trusted:
        raise Failed(f"MANIFEST.json is signed by {signer}, not by the trusted key {trusted}")


def _check_chain(manifest: dict, events_path: str) -> int:
    expected_genesis = genesis_hash(manifest["installation_id"])
    if manifest["genesis_hash"] != expected_genesis:
        raise Failed("the genesis hash does not derive from the installation id")
    prev, seq = expected_genesis, 0
    with open(events_path, encoding="utf-8", newline="\n") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.endswith("\n"):
                raise Failed(f"line {number} does not end with a newline")
            text = line[:-1]
            try:
                event = json.loads(text)
            except ValueError:
                raise Failed(f"line {number} is not JSON") from None
            if not isinstance(event, dict) or canonical(event) != text:
                raise Failed(f"line {number} is not canonical JSON")
            if event.get("seq") != seq + 1:
                raise Failed(f"seq {seq + 1} is missing (line {number} has {event.get('seq')})")
            if event.get("prev_hash") != prev:
                raise Failed(f"seq {event['seq']} does not link to the previous event")
            prev, seq = event_hash(prev, text), event["seq"]
    if seq != manifest["last_seq"]:
        raise Failed(f"the export ends at seq {seq}, the manifest says {manifest['last_seq']}")
    if prev != manifest["head_hash"]:
        raise Failed("the last event's hash is not the signed head hash")
    return seq


def verify(path: str, trusted_fingerprint: str) -> int:
    """Verify the export at ``path``; returns the number of events. Raises Failed."""
    trusted = trusted_fingerprint.replace(" ", "").upper()
    try:
        archive = tarfile.open(path, mode="r:")  # noqa: SIM115 (closed by the `with` below)
    except (tarfile.TarError, OSError) as exc:
        raise Failed(f"not a readable tar: {exc}") from None
    events_path = ""
    try:
        with archive:
            small, events_path, events_digest = _read(archive)
        _check_signature(small, trusted)
        manifest = json.loads(small["MANIFEST.json"])
        if manifest.get("format") != FORMAT:
            raise Failed(f"unknown format {manifest.get('format')!r}")
        listed = manifest["files"]
        if set(listed) != {"events.ndjson", "signing-key.asc"}:
            raise Failed("the manifest lists other files than events.ndjson and signing-key.asc")
        key = small["signing-key.asc"]
        if [hashlib.sha256(key).hexdigest(), len(key)] != [
            listed["signing-key.asc"]["sha256"],
            listed["signing-key.asc"]["size"],
        ]:
            raise Failed("signing-key.asc does not match the manifest")
        if list(events_digest) != [
            listed["events.ndjson"]["sha256"],
            listed["events.ndjson"]["size"],
        ]:
            raise Failed("events.ndjson does not match the manifest")
        return _check_chain(manifest, events_path)
    finally:
        if events_path:
            os.unlink(events_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="the audit export (.tar)")
    parser.add_argument(
        "--trust-fingerprint", required=True, help="fingerprint of the signing key you trust"
    )
    args = parser.parse_args(argv)
    try:
        count = verify(args.export, args.trust_fingerprint)
    except Failed as exc:
        print(f"FAILED: {exc}")
        return 1
    except RuntimeError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    print(f"VERIFIED: {count} events, complete from seq 1 to {count}, signature good")
    return 0


if __name__ == "__main__":
    sys.exit(main())
