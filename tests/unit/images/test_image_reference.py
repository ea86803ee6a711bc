"""Image references: the registry is explicit, and only a digest pins an image."""

from __future__ import annotations

import pytest

from appliance.errors import AnimusError
from appliance.images.registry import Reference, parse_reference

DIGEST = "sha256:" + "0123456789abcdef" * 4


def test_full_reference() -> None:
    ref = parse_reference(f"127.0.0.1:5000/animus/runner:latest@{DIGEST}")
    assert ref == Reference("127.0.0.1:5000", "animus/runner", "latest", DIGEST)
    assert str(ref) == f"127.0.0.1:5000/animus/runner:latest@{DIGEST}"


def test_a_tag_never_stands_in_for_a_digest() -> None:
    with pytest.raises(AnimusError) as caught:
        parse_reference("registry.local/animus/runner:latest").pinned()
    assert caught.value.code == "invalid_digest"
    # With both, the digest is what pins the image.
    assert parse_reference(f"registry.local/runner:v1@{DIGEST}").pinned() == DIGEST


@pytest.mark.parametrize("text", ["runner", "host/UPPER", "host/repo@sha256:short", "host/"])
def test_malformed_references_are_refused(text: str) -> None:
    with pytest.raises(AnimusError):
        parse_reference(text)
