"""OCI image layouts on disk (image-spec ``image-layout.md``) and the JSON documents in them.

Manifests and configs are serialized canonically (sorted keys, no whitespace) so their
digests depend only on their content.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import AnimusError

MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def canonical_json(document: Any) -> bytes:
    """UTF-8, sorted keys, no insignificant whitespace."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest_of(data: bytes) -> str:
    """``sha256:<hex>`` of DATA."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    """Return DIGEST if it is ``sha256:<64 hex>``, else raise ``invalid_digest``."""
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise AnimusError(
            "a digest must be sha256:<64 lowercase hex>",
            code="invalid_digest",
            details={"digest": str(digest)[:80]},
        )
    return digest


def descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    """An OCI content descriptor for DATA."""
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data)}


@dataclass(frozen=True)
class Image:
    """One image manifest of a layout, with its decoded config."""

    manifest_digest: str
    manifest: dict[str, Any]
    manifest_bytes: bytes
    config: dict[str, Any]

    @property
    def blobs(self) -> list[dict[str, Any]]:
        """Descriptors of the config and every layer, in manifest order."""
        return [self.manifest["config"], *self.manifest["layers"]]


class Layout:
    """An OCI image layout directory: ``oci-layout``, ``index.json``, ``blobs/sha256/``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def blob_path(self, digest: str) -> Path:
        """Where the blob with DIGEST lives in this layout."""
        algorithm, _, hexdigest = check_digest(digest).partition(":")
        return self.root / "blobs" / algorithm / hexdigest

    def init(self) -> None:
        """Create the layout's skeleton if missing."""
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        marker = self.root / "oci-layout"
        if not marker.exists():
            marker.write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))

    def write_blob(self, data: bytes) -> str:
        """Store DATA under its digest (atomically); return the digest."""
        digest = digest_of(data)
        path = self.blob_path(digest)
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return digest

    def has_blob(self, digest: str) -> bool:
        """Whether the blob file exists (not whether it is intact)."""
        return self.blob_path(digest).exists()

    def read_blob(self, digest: str) -> bytes:
        """Read a blob and check it against its digest."""
        path = self.blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise AnimusError(
                f"blob {digest} is missing from the layout",
                code="blob_unknown",
                details={"digest": digest},
            ) from None
        if digest_of(data) != digest:
            raise AnimusError(
                f"blob {digest} does not match its digest",
                code="blob_digest_mismatch",
                details={"digest": digest},
            )
        return data

    def verify_blob(self, digest: str) -> None:
        """Re-hash a blob file without loading it whole; raise if missing or altered."""
        path = self.blob_path(digest)
        if not path.exists():
            raise AnimusError(
                f"blob {digest} is missing from the layout",
                code="blob_unknown",
                details={"digest": digest},
            )
        hasher = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                hasher.update(block)
        if "sha256:" + hasher.hexdigest() != digest:
            raise AnimusError(
                f"blob {digest} does not match its digest",
                code="blob_digest_mismatch",
                details={"digest": digest},
            )

    def set_index(self, manifest_bytes: bytes, ref_name: str) -> None:
        """Point ``index.json`` at one manifest, named REF_NAME (replacing any other)."""
        entry = descriptor(MEDIA_TYPE_MANIFEST, manifest_bytes)
        entry["annotations"] = {REF_NAME_ANNOTATION: ref_name}
        index = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": [entry]}
        (self.root / "index.json").write_bytes(canonical_json(index))

    def image(self, ref_name: str | None = None) -> Image:
        """The manifest named REF_NAME, or the only one in the index."""
        try:
            index = json.loads((self.root / "index.json").read_bytes())
        except FileNotFoundError:
            raise AnimusError("not an OCI image layout (no index.json)", code="not_found") from None
        manifests = index.get("manifests", [])
        if ref_name is not None:
            manifests = [
                m
                for m in manifests
                if m.get("annotations", {}).get(REF_NAME_ANNOTATION) == ref_name
            ]
        if len(manifests) != 1:
            raise AnimusError(
                "the layout must name exactly one image",
                code="invalid_request",
                details={"found": len(manifests)},
            )
        digest = check_digest(manifests[0]["digest"])
        manifest_bytes = self.read_blob(digest)
        manifest = json.loads(manifest_bytes)
        config = json.loads(self.read_blob(manifest["config"]["digest"]))
        return Image(digest, manifest, manifest_bytes, config)
