"""Push, pull and verify images by digest against an OCI distribution registry.

The HTTP session, authentication (basic and bearer token challenges), TLS settings and
reference parsing come from oras-py (``oras.provider.Registry``, ``oras.container``); this
module adds what oras-py does not do and our guarantees need (docs/adr/0003): manifests sent
and received as exact bytes so their digests hold, streaming chunked uploads that resume
after an interruption, parallel blob uploads, and every downloaded byte hashed against the
digest that named it.

A tag never overrides a digest: pulls and verifies require ``@sha256:…`` and ignore any tag
given beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import oras.provider
import requests

from appliance.errors import AnimusError
from appliance.images.layout import (
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
    Image,
    Layout,
    check_digest,
    digest_of,
)
from appliance.images.packages import cache_dir
from appliance.images.progress import NULL_PROGRESS, Progress

CHUNK_SIZE = 32 << 20
DEFAULT_WORKERS = 4
TIMEOUT_SECONDS = 60
MAX_MANIFEST_BYTES = 4 << 20
_REF_RE = re.compile(
    r"^(?P<registry>[^/]+)/(?P<repository>[a-z0-9]+(?:[._/-][a-z0-9]+)*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


@dataclass(frozen=True)
class Reference:
    """``REGISTRY/REPOSITORY[:TAG][@DIGEST]``; the registry part is always explicit."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    def pinned(self) -> str:
        """The digest, or ``invalid_digest`` if the reference has none."""
        if not self.digest:
            raise AnimusError(
                "an image reference must be pinned by digest (REPO@sha256:…)",
                code="invalid_digest",
                details={"reference": str(self)},
            )
        return self.digest


def parse_reference(text: str) -> Reference:
    """Parse ``host[:port]/repo[:tag][@sha256:…]``."""
    match = _REF_RE.match(text)
    if not match:
        raise AnimusError(
            "not an image reference (expected REGISTRY/REPO[:TAG][@sha256:…])",
            code="invalid_request",
            details={"reference": text[:200]},
        )
    return Reference(match["registry"], match["repository"], match["tag"], match["digest"])


class _TimeoutSession(requests.Session):
    """A session whose requests time out instead of hanging on a dead registry."""

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs.setdefault("timeout", TIMEOUT_SECONDS)
        return super().request(*args, **kwargs)


def _mismatch(digest: str, actual: str) -> AnimusError:
    return AnimusError(
        f"blob {digest} from the registry does not match its digest (got {actual})",
        code="blob_digest_mismatch",
        details={"digest": digest, "actual": actual},
    )


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *params.items()]
    return urlunsplit(parts._replace(query=urlencode(query)))


class RegistryClient:
    """A connection to one registry (``host:port``)."""

    def __init__(
        self,
        registry: str,
        *,
        tls: bool = False,
        ca_file: str | Path | None = None,
        username: str | None = None,
        password: str | None = None,
    ):
        self.registry = registry
        self.base = f"{'https' if tls else 'http'}://{registry}"
        tls_verify: bool | str = str(ca_file) if ca_file else True
        self._oras = oras.provider.Registry(
            hostname=registry, insecure=not tls, tls_verify=tls_verify, auth_backend="basic"
        )
        session = _TimeoutSession()
        self._oras.session = session
        self._oras.auth.session = session
        if username is not None and password is not None:
            self._oras.auth.set_basic_auth(username, password)
        self._auth_headers = self._oras.auth.get_auth_header() if username else {}

    def _request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        headers = {**self._auth_headers, **kwargs.pop("headers", {})}
        try:
            return self._oras.do_request(url, method, headers=headers, **kwargs)
        except (requests.RequestException, ValueError) as exc:
            raise AnimusError(
                f"registry {self.registry} did not answer: {type(exc).__name__}",
                code="registry_error",
            ) from exc

    def _expect(self, response: requests.Response, *codes: int, what: str) -> None:
        if response.status_code not in codes:
            try:
                errors = [e.get("code", "") for e in response.json().get("errors", [])]
            except ValueError:
                errors = []
            raise AnimusError(
                f"registry refused {what}: HTTP {response.status_code} {','.join(errors)}".strip(),
                code="registry_error",
                details={"status": response.status_code, "errors": errors},
            )

    def ping(self) -> None:
        """Check that the registry answers the distribution API (one quick try, no retries)."""
        try:
            response = self._oras.session.get(
                f"{self.base}/v2/",
                headers=self._auth_headers,
                timeout=5,
                verify=self._oras._tls_verify,
            )
        except requests.RequestException as exc:
            raise AnimusError(
                f"registry {self.registry} is unreachable: {type(exc).__name__}",
                code="registry_error",
            ) from exc
        self._expect(response, 200, what="the API version check")

    # -- blobs -----------------------------------------------------------------------------

    def blob_exists(self, repository: str, digest: str) -> bool:
        """Whether the repository already has the blob (then a push skips it)."""
        response = self._request("HEAD", f"{self.base}/v2/{repository}/blobs/{digest}")
        return response.status_code == 200

    def mount_blob(self, repository: str, digest: str, source_repository: str) -> bool:
        """Ask the registry to link a blob it holds for SOURCE_REPOSITORY into REPOSITORY
        (no bytes move); False if it would rather have the blob uploaded."""
        response = self._request(
            "POST",
            _with_query(
                f"{self.base}/v2/{repository}/blobs/uploads/",
                mount=digest,
                **{"from": source_repository},
            ),
            headers={"Content-Length": "0"},
        )
        if response.status_code == 202:
            # The registry opened an ordinary upload instead; cancel it, we upload ourselves.
            location = response.headers.get("Location")
            if location:
                self._request("DELETE", urljoin(self.base, location))
        return response.status_code == 201

    def _state_path(self, repository: str, digest: str) -> Path:
        key = hashlib.sha256(f"{self.registry}/{repository}@{digest}".encode()).hexdigest()
        return cache_dir() / "push-state" / key

    def _resume(self, repository: str, digest: str) -> tuple[str, int] | None:
        """An unfinished upload session of this blob and how many bytes the registry has."""
        path = self._state_path(repository, digest)
        try:
            state = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        response = self._request("GET", state["location"])
        if response.status_code != 204:
            path.unlink(missing_ok=True)
            return None
        # "0-N" is the last byte received; the registry says "0-0" for an empty upload.
        end = int(response.headers.get("Range", "0-0").rsplit("-", 1)[-1] or 0)
        location = urljoin(state["location"], response.headers.get("Location", state["location"]))
        return location, end + 1 if end > 0 else 0

    def upload_blob(
        self,
        repository: str,
        path: Path,
        digest: str,
        size: int,
        progress: Progress = NULL_PROGRESS,
    ) -> None:
        """Upload one blob in chunks, resuming a session a previous, interrupted push left."""
        state_path = self._state_path(repository, digest)
        resumed = self._resume(repository, digest)
        if resumed is not None:
            location, offset = resumed
        else:
            response = self._request(
                "POST",
                f"{self.base}/v2/{repository}/blobs/uploads/",
                headers={"Content-Length": "0"},
            )
            self._expect(response, 202, what=f"an upload of {digest}")
            location = urljoin(self.base, response.headers["Location"])
            offset = 0
        state_path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "rb") as handle:
            handle.seek(offset)
            while offset < size:
                chunk = handle.read(CHUNK_SIZE)
                response = self._request(
                    "PATCH",
                    location,
                    data=chunk,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                        "Content-Length": str(len(chunk)),
                    },
                )
                self._expect(response, 202, what=f"a chunk of {digest}")
                location = urljoin(location, response.headers["Location"])
                offset += len(chunk)
                state_path.write_text(json.dumps({"location": location, "offset": offset}))
                progress.transfer(digest, offset, size)
        response = self._request(
            "PUT", _with_query(location, digest=digest), headers={"Content-Length": "0"}
        )
        self._expect(response, 201, what=f"the end of the upload of {digest}")
        state_path.unlink(missing_ok=True)

    def download_blob(
        self,
        repository: str,
        digest: str,
        target: Path,
        progress: Progress = NULL_PROGRESS,
        *,
        size: int | None = None,
    ) -> None:
        """Stream a blob to TARGET, hashing as it arrives; TARGET appears only if it matched.
        With SIZE (from the descriptor), a registry sending more bytes is cut off."""
        response = self._request("GET", f"{self.base}/v2/{repository}/blobs/{digest}", stream=True)
        self._expect(response, 200, what=f"blob {digest}")
        hasher = hashlib.sha256()
        total = int(response.headers.get("Content-Length", 0))
        done = 0
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".pull-")
        try:
            with os.fdopen(fd, "wb") as out:
                for block in response.iter_content(1 << 20):
                    done += len(block)
                    if size is not None and done > size:
                        raise _mismatch(digest, f"more than {size} bytes")
                    hasher.update(block)
                    out.write(block)
                    progress.transfer(digest, done, total)
            actual = "sha256:" + hasher.hexdigest()
            if actual != digest:
                raise _mismatch(digest, actual)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def hash_blob(self, repository: str, digest: str) -> tuple[str, int]:
        """Download a blob only to hash it: ``(sha256:…, size)``."""
        response = self._request("GET", f"{self.base}/v2/{repository}/blobs/{digest}", stream=True)
        self._expect(response, 200, what=f"blob {digest}")
        hasher = hashlib.sha256()
        size = 0
        for block in response.iter_content(1 << 20):
            hasher.update(block)
            size += len(block)
        return "sha256:" + hasher.hexdigest(), size

    # -- manifests -------------------------------------------------------------------------

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> str:
        """Store a manifest under REFERENCE (a digest or a tag) exactly as DATA."""
        response = self._request(
            "PUT",
            f"{self.base}/v2/{repository}/manifests/{reference}",
            data=data,
            headers={"Content-Type": media_type},
        )
        self._expect(response, 201, what=f"manifest {reference}")
        return response.headers.get("Docker-Content-Digest", digest_of(data))

    def get_manifest(self, repository: str, digest: str) -> bytes:
        """Fetch the manifest with DIGEST and check its bytes against it."""
        response = self._request(
            "GET",
            f"{self.base}/v2/{repository}/manifests/{digest}",
            headers={"Accept": f"{MEDIA_TYPE_MANIFEST}, {MEDIA_TYPE_INDEX}"},
        )
        self._expect(response, 200, what=f"manifest {digest}")
        if len(response.content) > MAX_MANIFEST_BYTES:
            raise _mismatch(digest, f"a manifest over {MAX_MANIFEST_BYTES} bytes")
        actual = digest_of(response.content)
        if actual != digest:
            raise _mismatch(digest, actual)
        return response.content


@dataclass
class PushResult:
    """What a push did."""

    reference: str
    manifest_digest: str
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    mounted: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0


def push_image(
    source: Layout,
    image: Image,
    client: RegistryClient,
    repository: str,
    *,
    tag: str | None = None,
    mount_from: str | None = None,
    workers: int = DEFAULT_WORKERS,
    progress: Progress = NULL_PROGRESS,
) -> PushResult:
    """Push IMAGE from SOURCE to REPOSITORY by digest, blobs in parallel, then the manifest;
    then, if given, point TAG at it. Blobs the registry has are skipped; partly uploaded ones
    resume where the registry stopped; with MOUNT_FROM (a repository of the same registry,
    e.g. the base image's), blobs it holds are linked instead of uploaded."""
    client.ping()
    result = PushResult(
        reference=f"{client.registry}/{repository}@{image.manifest_digest}",
        manifest_digest=image.manifest_digest,
    )

    counter_lock = threading.Lock()

    def push_one(blob: dict[str, Any]) -> None:
        digest = blob["digest"]
        if client.blob_exists(repository, digest):
            with counter_lock:
                result.skipped.append(digest)
            return
        if mount_from and client.mount_blob(repository, digest, mount_from):
            with counter_lock:
                result.mounted.append(digest)
            return
        source.verify_blob(digest)
        client.upload_blob(repository, source.blob_path(digest), digest, blob["size"], progress)
        with counter_lock:
            result.uploaded.append(digest)
            result.bytes_uploaded += blob["size"]

    blobs = sorted(image.blobs, key=lambda b: -b["size"])  # the largest start first
    progress.step(f"pushing {len(blobs)} blobs to {client.registry}/{repository}")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for future in [pool.submit(push_one, blob) for blob in blobs]:
            future.result()
    media_type = image.manifest.get("mediaType", MEDIA_TYPE_MANIFEST)
    client.put_manifest(repository, image.manifest_digest, image.manifest_bytes, media_type)
    if tag:
        client.put_manifest(repository, tag, image.manifest_bytes, media_type)
    progress.step(
        f"pushed {result.reference}: {len(result.uploaded)} uploaded,"
        f" {len(result.skipped)} already present, {len(result.mounted)} mounted"
    )
    return result


def pull_image(
    reference: Reference,
    client: RegistryClient,
    store: Layout,
    *,
    progress: Progress = NULL_PROGRESS,
) -> Image:
    """Pull the image pinned by REFERENCE's digest into STORE (a content store layout),
    verifying the manifest and every blob; blobs STORE already holds intact are not fetched."""
    digest = check_digest(reference.pinned())
    store.init()
    manifest_bytes = client.get_manifest(reference.repository, digest)
    manifest = json.loads(manifest_bytes)
    if manifest.get("mediaType", MEDIA_TYPE_MANIFEST) != MEDIA_TYPE_MANIFEST:
        raise AnimusError(
            "only single-platform OCI image manifests are supported",
            code="invalid_request",
            details={"mediaType": manifest.get("mediaType")},
        )
    for blob in [manifest["config"], *manifest["layers"]]:
        blob_digest = check_digest(blob["digest"])
        if store.has_blob(blob_digest):
            try:
                store.verify_blob(blob_digest)
                continue
            except AnimusError:
                store.blob_path(blob_digest).unlink()
        progress.step(f"pulling {blob_digest}")
        client.download_blob(
            reference.repository,
            blob_digest,
            store.blob_path(blob_digest),
            progress,
            size=blob["size"],
        )
    store.write_blob(manifest_bytes)
    config = json.loads(store.read_blob(manifest["config"]["digest"]))
    return Image(digest, manifest, manifest_bytes, config)


@dataclass(frozen=True)
class BlobCheck:
    """The outcome of re-hashing one blob in the registry."""

    digest: str
    size: int
    ok: bool


def verify_image(
    reference: Reference, client: RegistryClient, progress: Progress = NULL_PROGRESS
) -> list[BlobCheck]:
    """Re-hash the manifest and every blob of the image pinned by REFERENCE, in the registry.

    Raises ``blob_digest_mismatch`` naming the first bad blob (all bad ones in details).
    """
    digest = check_digest(reference.pinned())
    manifest = json.loads(client.get_manifest(reference.repository, digest))
    checks = []
    for blob in [manifest["config"], *manifest["layers"]]:
        actual, size = client.hash_blob(reference.repository, blob["digest"])
        ok = actual == blob["digest"] and size == blob["size"]
        progress.step(f"{'ok ' if ok else 'BAD'} {blob['digest']} ({size} bytes)")
        checks.append(BlobCheck(blob["digest"], size, ok))
    bad = [check.digest for check in checks if not check.ok]
    if bad:
        raise AnimusError(
            f"blob {bad[0]} in {reference.registry}/{reference.repository} does not match"
            " its digest",
            code="blob_digest_mismatch",
            details={"digest": bad[0], "bad_blobs": bad},
        )
    return checks
