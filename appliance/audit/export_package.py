"""The signed, self-describing export package of a ModelVersion (a tar).

    MANIFEST.json             sha256 and size of every other file, and what the package is
    MANIFEST.json.asc         detached GPG signature over MANIFEST.json's exact bytes
    artifact/<path>           the model artifact, as the source Run produced it
    model_version.json        the model, the version, its metrics and decision
    lineage.json              the version's lineage graph
    execution_snapshot.json   the source Run's frozen execution snapshot, as hashed
    audit/events.ndjson       the audit events about the model, the version, the source Run
                              and its inputs: each line the stored canonical text as hashed
    audit/hashes.json         ``[{seq, hash}]`` of those events in the chain
    signing-key.asc           the signing public key (trust comes from its fingerprint,
                              given to the verifier from outside the package)

Entries are regular files in name order with fixed owner and mode, so the package says
nothing the manifest does not cover. ``appliance/audit/verify_export.py`` checks it offline.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from appliance import db
from appliance.audit import log as audit
from appliance.audit import signing
from appliance.audit.actions import Action
from appliance.domain import lineage
from appliance.domain.context import Context
from appliance.domain.records import (
    AuditEvent,
    DatasetVersion,
    ExecutionSnapshot,
    Model,
    ModelVersion,
    Project,
    Run,
    canonical_json,
    new_id,
)
from appliance.errors import AnimusError
from appliance.storage.blobs import BlobStore

FORMAT = "animus-model-export/1"
MANIFEST = "MANIFEST.json"
SIGNATURE = "MANIFEST.json.asc"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Signer:
    """Where the signing key lives and which one to use (empty: the generated one)."""

    gnupg_home: Path
    configured_fingerprint: str = ""


def current_signing_key(ctx: Context, signer: Signer) -> signing.SigningKey:
    """The signing key, generated (and the generation audited) the first time it is needed."""
    key = signing.signing_key(
        signer.gnupg_home, signer.configured_fingerprint, audit.installation_id()
    )
    if key.generated:
        with db.write_transaction():
            audit.record(
                ctx,
                Action.SIGNING_KEY_GENERATED,
                object_type="signing_key",
                object_id=key.fingerprint,
                payload={"fingerprint": key.fingerprint, "algorithm": key.algorithm},
            )
    return key


def _json_bytes(value: object) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def audit_slice(version: ModelVersion) -> list[AuditEvent]:
    """Events about the model, the version, the source Run, its artifact and its inputs."""
    run = Run.get_by_id(version.source_run_id)
    about = {
        version.model_id,
        version.id,
        run.id,
        version.artifact_id,
        run.code_ref_id,
        run.environment_lock_id,
        *(item["dataset_version_id"] for item in run.inputs),
    }
    if run.policy_snapshot_id:
        about.add(run.policy_snapshot_id)
    versions = DatasetVersion.select(DatasetVersion.dataset_id).where(
        DatasetVersion.id.in_([i["dataset_version_id"] for i in run.inputs])
    )
    about.update(v.dataset_id for v in versions)
    return list(
        AuditEvent.select()
        .where((AuditEvent.project_id == version.project_id) & AuditEvent.object_id.in_(about))
        .order_by(AuditEvent.seq)
    )


def describe_version(version: ModelVersion) -> dict:
    model = Model.get_by_id(version.model_id)
    snapshot = ExecutionSnapshot.get_or_none(ExecutionSnapshot.run_id == version.source_run_id)
    return {
        "project_id": version.project_id,
        "model": {"id": model.id, "name": model.name, "description": model.description},
        "model_version": {
            "id": version.id,
            "number": version.number,
            "stage": version.stage,
            "metrics": version.metrics,
            "created_at": version.created_at,
            "created_by": version.created_by,
            "decided_at": version.decided_at,
            "decided_by": version.decided_by,
            "decision_reason": version.decision_reason,
        },
        "source_run": {
            "id": version.source_run_id,
            "snapshot_digest": snapshot.digest if snapshot else None,
        },
        "artifact": {
            "id": version.artifact_id,
            "path": version.artifact_path,
            "sha256": version.artifact_sha256,
            "size": version.artifact_size,
            "file": f"artifact/{version.artifact_path}",
        },
    }


class _Verifying:
    """Reads a blob while hashing it, so a corrupted blob is never exported unnoticed."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data


def _add(archive: tarfile.TarFile, name: str, size: int, stream: BinaryIO, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    archive.addfile(info, stream)


def build_package(
    version: ModelVersion, key: signing.SigningKey, signer: Signer, blobs: BlobStore
) -> tuple[dict, BinaryIO]:
    """Write the package of ``version`` to a temporary file.

    Returns ``(description, file)``: the description has the export ``id``, the package's
    ``sha256`` and ``size``, ``manifest_sha256`` and ``signing_fingerprint``; the file is
    positioned at its start and deleted when closed.
    """
    export_id = new_id("mex")
    now = datetime.now(UTC)
    created_at = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    events = audit_slice(version)
    snapshot = ExecutionSnapshot.get_or_none(ExecutionSnapshot.run_id == version.source_run_id)
    small: dict[str, bytes] = {
        "model_version.json": _json_bytes(describe_version(version)),
        "lineage.json": _json_bytes(
            lineage.lineage_graph(Project.get_by_id(version.project_id), version.id)
        ),
        "execution_snapshot.json": (
            canonical_json(snapshot.snapshot).encode() if snapshot else b"null"
        ),
        "audit/events.ndjson": "".join(e.canonical + "\n" for e in events).encode("utf-8"),
        "audit/hashes.json": _json_bytes([{"seq": e.seq, "hash": e.hash} for e in events]),
        "signing-key.asc": key.public_key.encode("ascii"),
    }
    artifact_name = f"artifact/{version.artifact_path}"
    files = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for name, data in small.items()
    }
    files[artifact_name] = {"sha256": version.artifact_sha256, "size": version.artifact_size}
    head = AuditEvent.select().order_by(AuditEvent.seq.desc()).first()
    manifest = _json_bytes(
        {
            "format": FORMAT,
            "export_id": export_id,
            "created_at": created_at,
            "installation_id": audit.installation_id(),
            "project_id": version.project_id,
            "model_id": version.model_id,
            "model_version_id": version.id,
            "signing_fingerprint": key.fingerprint,
            "audit_head": {"seq": head.seq, "hash": head.hash} if head else None,
            "files": dict(sorted(files.items())),
        }
    )
    signature = signing.detach_sign(signer.gnupg_home, key.fingerprint, manifest)
    small[MANIFEST] = manifest
    small[SIGNATURE] = signature

    mtime = int(now.timestamp())
    package = tempfile.TemporaryFile(dir=blobs.tmp_dir)  # noqa: SIM115 (handed to the caller)
    try:
        with tarfile.open(fileobj=package, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for name in sorted([*small, artifact_name]):
                if name == artifact_name:
                    with blobs.open(version.artifact_sha256) as blob:
                        reader = _Verifying(blob)
                        _add(archive, name, version.artifact_size, reader, mtime)  # type: ignore[arg-type]
                    if reader.digest.hexdigest() != version.artifact_sha256:
                        raise AnimusError(
                            "the stored artifact does not match its recorded digest",
                            code="blob_digest_mismatch",
                        )
                else:
                    _add(archive, name, len(small[name]), io.BytesIO(small[name]), mtime)
        package.seek(0)
        digest, size = hashlib.sha256(), 0
        while chunk := package.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        package.seek(0)
    except BaseException:
        package.close()
        raise
    return {
        "id": export_id,
        "sha256": digest.hexdigest(),
        "size": size,
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "signing_fingerprint": key.fingerprint,
    }, package
