"""The cluster registry: TLS from a generated CA, htpasswd (bcrypt) authentication."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from appliance.errors import AnimusError
from appliance.images.layout import Layout
from appliance.images.registry import RegistryClient, parse_reference, pull_image, push_image


def test_tls_registry_with_auth_accepts_only_authenticated_clients(
    tmp_path: Path, tiny_layout, start_own_registry
) -> None:
    with start_own_registry(
        tls=True,
        hostnames=("127.0.0.1", "localhost"),
        users={"animus": "s3cret-pass"},
    ) as registry:
        ca = registry.settings.ca_certificate
        assert (registry.settings.state_dir / "tls/ca.key").stat().st_mode & 0o077 == 0

        # Without the CA, the certificate is not trusted.
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"https://{registry.address}/v2/", timeout=5)

        anonymous = RegistryClient(registry.address, tls=True, ca_file=ca)
        with pytest.raises(AnimusError) as caught:
            anonymous.ping()
        assert caught.value.details["status"] == 401

        wrong = RegistryClient(
            registry.address, tls=True, ca_file=ca, username="animus", password="wrong"
        )
        with pytest.raises(AnimusError):
            wrong.ping()

        client = RegistryClient(
            registry.address, tls=True, ca_file=ca, username="animus", password="s3cret-pass"
        )
        layout = tiny_layout("tls")
        pushed = push_image(layout, layout.image(), client, "animus/tiny")
        pulled = pull_image(parse_reference(pushed.reference), client, Layout(tmp_path / "s"))
        assert pulled.manifest_digest == layout.image().manifest_digest
