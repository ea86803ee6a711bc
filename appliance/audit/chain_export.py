"""The signed export of the whole audit chain (DESIGN §6), for auditors to verify offline.

    MANIFEST.json        what the export holds: installation id, genesis hash, the seq range,
                         the head hash, and the sha256 and size of every other file
    MANIFEST.json.asc    detached GPG signature over MANIFEST.json's exact bytes
    events.ndjson        every event from seq 1 to the head, one per line, each the stored
                         canonical text exactly as it was hashed
    signing-key.asc      the signing public key (trust comes from its fingerprint, given to
                         the verifier from outside the export)

``appliance/audit/verify_audit_export.py`` checks an export with Python's standard library
and ``gpg`` only. The event recording the export and the export itself are made in one
transaction: the export contains the event that records it, and when the export cannot be
made (no signing key, gpg fails) the transaction rolls back, so there is never an export
event without an export. Writers wait on the chain head while an export is written.

Exporting never creates the signing key: that is an explicit, audited step
(``create_signing_key``).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from appliance import db
from appliance.audit import chain, signing
from appliance.audit import log as audit
from appliance.audit.actions import Action
from appliance.audit.export_package import Signer, current_signing_key
from appliance.audit.signing import SigningKey, SigningUnavailable
from appliance.domain.context import Context
from appliance.domain.records import AuditEvent

FORMAT = "animus-audit-export/1"
MANIFEST = "MANIFEST.json"
SIGNATURE = "MANIFEST.json.asc"
EVENTS = "events.ndjson"
KEY_FILE = "signing-key.asc"
VERIFIER = Path(__file__).with_name("verify_audit_export.py")
_BATCH = 5000


def _json_bytes(value: object) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


NO_KEY = (
    'this installation has no signing key yet: create it with "Create the signing key" '
    "on the Export page (audited), or configure ANIMUS_SIGNING_GNUPG_HOME and "
    "ANIMUS_SIGNING_KEY"
)


def signing_key_if_made(signer: Signer) -> SigningKey | None:
    """The key exports are signed with, or None before it is created. Never creates it."""
    return signing.existing_signing_key(
        signer.gnupg_home, signer.configured_fingerprint, audit.installation_id()
    )


def create_signing_key(ctx: Context, signer: Signer) -> SigningKey:
    """Create the installation's signing key if there is none (audited when created)."""
    return current_signing_key(ctx, signer)


def export_chain(ctx: Context, signer: Signer, tmp_dir: Path) -> tuple[str, BinaryIO]:
    """Record the export and write the signed export of the chain up to that event, in one
    transaction: if the export cannot be made, neither is its event.

    Returns ``(file name, file)``; the file is positioned at its start and removed on close.
    Raises ``SigningUnavailable`` when there is no signing key yet (see ``NO_KEY``).
    """
    key = signing_key_if_made(signer)
    if key is None:
        raise SigningUnavailable(NO_KEY)
    with db.write_transaction():
        event = audit.record(
            ctx,
            Action.AUDIT_EXPORTED,
            object_type="audit_chain",
            object_id="audit_events",
            payload={"signing_fingerprint": key.fingerprint},
        )
        return _write_export(key, signer, event.seq, tmp_dir)


def _write_export(
    key: SigningKey, signer: Signer, head_seq: int, tmp_dir: Path
) -> tuple[str, BinaryIO]:
    events = tempfile.TemporaryFile(dir=tmp_dir)  # noqa: SIM115 (closed below)
    package: BinaryIO | None = None
    try:
        digest, size, last, head_hash = (
            hashlib.sha256(),
            0,
            0,
            chain.genesis_hash(audit.installation_id()),
        )
        while last < head_seq:
            rows = list(
                AuditEvent.select(AuditEvent.seq, AuditEvent.canonical, AuditEvent.hash)
                .where((AuditEvent.seq > last) & (AuditEvent.seq <= head_seq))
                .order_by(AuditEvent.seq)
                .limit(_BATCH)
                .tuples()
            )
            if not rows:
                break
            for seq, canonical, event_hash in rows:
                line = (canonical + "\n").encode("utf-8")
                events.write(line)
                digest.update(line)
                size += len(line)
                last, head_hash = seq, event_hash
        created = datetime.now(UTC)
        manifest = _json_bytes(
            {
                "format": FORMAT,
                "created_at": created.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "installation_id": audit.installation_id(),
                "genesis_hash": chain.genesis_hash(audit.installation_id()),
                "first_seq": 1 if last else 0,
                "last_seq": last,
                "head_hash": head_hash,
                "signing_fingerprint": key.fingerprint,
                "files": {
                    EVENTS: {"sha256": digest.hexdigest(), "size": size},
                    KEY_FILE: {
                        "sha256": hashlib.sha256(key.public_key.encode("ascii")).hexdigest(),
                        "size": len(key.public_key.encode("ascii")),
                    },
                },
            }
        )
        signature = signing.detach_sign(signer.gnupg_home, key.fingerprint, manifest)
        package = tempfile.TemporaryFile(dir=tmp_dir)  # noqa: SIM115 (handed to the caller)
        mtime = int(created.timestamp())
        with tarfile.open(fileobj=package, mode="w", format=tarfile.PAX_FORMAT) as archive:
            _add(archive, MANIFEST, io.BytesIO(manifest), len(manifest), mtime)
            _add(archive, SIGNATURE, io.BytesIO(signature), len(signature), mtime)
            events.seek(0)
            _add(archive, EVENTS, events, size, mtime)
            public = key.public_key.encode("ascii")
            _add(archive, KEY_FILE, io.BytesIO(public), len(public), mtime)
        package.seek(0)
    except BaseException:
        if package is not None:
            package.close()
        raise
    finally:
        events.close()
    name = f"animus-audit-{created.strftime('%Y%m%dT%H%M%SZ')}-seq{last}.tar"
    return name, package


def _add(archive: tarfile.TarFile, name: str, stream: BinaryIO, size: int, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    archive.addfile(info, stream)


__all__ = [
    "FORMAT",
    "NO_KEY",
    "VERIFIER",
    "Signer",
    "create_signing_key",
    "export_chain",
    "signing_key_if_made",
]
