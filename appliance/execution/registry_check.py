"""Checking, from the control plane, that an EnvironmentLock's image digest is in the registry.

The control plane never pulls or runs images; it only asks the registry whether the manifest
with that digest exists and hashes to it.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlparse

from appliance.errors import AnimusError


def registry_host(registry_url: str) -> str:
    """``http://127.0.0.1:5000`` → ``127.0.0.1:5000`` (how image references name it)."""
    return urlparse(registry_url).netloc


def image_repository(registry_url: str, repository: str) -> str:
    """Where environment images live, as the first part of an image reference."""
    host = registry_host(registry_url)
    return f"{host}/{repository}" if host else repository


def digest_verifier(registry_url: str, repository: str) -> Callable[[str], str | None]:
    """A function telling whether a digest verifies in the registry: None, or the problem."""

    def verify(digest: str) -> str | None:
        if not registry_url:
            return "no registry is configured to verify its digest (ANIMUS_REGISTRY_URL)"
        from appliance.images.registry import RegistryClient

        parsed = urlparse(registry_url)
        client = RegistryClient(parsed.netloc, tls=parsed.scheme == "https")
        try:
            client.get_manifest(repository, digest)
        except AnimusError as exc:
            return f"image {digest} does not verify in {parsed.netloc}/{repository}: {exc.message}"
        return None

    return verify
