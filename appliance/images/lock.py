"""Image locks: every Debian package and wheel of an image, pinned by version and SHA-256.

``lock_image`` runs on a build host that reaches the package sources; the lock it writes is
committed, and ``build`` never resolves anything again: it only fetches and checks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import AnimusError
from appliance.images.definition import ImageDefinition
from appliance.images.packages import (
    DebianPackage,
    Wheel,
    as_dict,
    resolve_debian,
    resolve_wheels,
)
from appliance.images.progress import NULL_PROGRESS, Progress

LOCK_VERSION = 1


@dataclass(frozen=True)
class ImageLock:
    """The parsed lock of one image definition."""

    inputs_sha256: str
    debian: tuple[DebianPackage, ...]
    wheels: tuple[Wheel, ...]
    raw: bytes

    @property
    def digest(self) -> str:
        """``sha256:`` of the lock file's bytes; images carry it as a label."""
        return "sha256:" + hashlib.sha256(self.raw).hexdigest()


def render_lock(inputs_sha256: str, debian: list[DebianPackage], wheels: list[Wheel]) -> bytes:
    """The lock file's bytes: stable, reviewable JSON."""
    document = {
        "lock_version": LOCK_VERSION,
        "inputs_sha256": inputs_sha256,
        "debian": [as_dict(p) for p in debian],
        "wheels": [as_dict(w) for w in wheels],
    }
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def lock_image(definition: ImageDefinition, progress: Progress = NULL_PROGRESS) -> ImageLock:
    """Resolve the definition's inputs and write ``image.lock.json`` beside it."""
    progress.step(f"resolving Debian packages for {definition.name}")
    debian = resolve_debian(
        definition.debian_packages, definition.debian_exclude, definition.architecture
    )
    progress.step(f"resolving wheels for {definition.name}")
    wheels = resolve_wheels(
        definition.python_requirements, definition.python_platform, definition.python_version
    )
    raw = render_lock(definition.inputs_sha256(), debian, wheels)
    definition.lock_path.write_bytes(raw)
    progress.step(f"locked {len(debian)} Debian packages and {len(wheels)} wheels")
    return parse_lock(raw)


def parse_lock(raw: bytes) -> ImageLock:
    """Parse lock bytes."""
    try:
        document = json.loads(raw)
        if document.get("lock_version") != LOCK_VERSION:
            raise ValueError("unsupported lock_version")
        return ImageLock(
            inputs_sha256=document["inputs_sha256"],
            debian=tuple(DebianPackage(**p) for p in document["debian"]),
            wheels=tuple(Wheel(**w) for w in document["wheels"]),
            raw=raw,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise AnimusError(
            f"the image lock is malformed: {exc}", code="image_definition_invalid"
        ) from exc


def read_lock(definition: ImageDefinition) -> ImageLock:
    """Read the committed lock and check that it was made for the definition's inputs."""
    path: Path = definition.lock_path
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise AnimusError(
            f"image {definition.name} has no lock; run `animus image lock` first",
            code="image_lock_stale",
        ) from None
    lock = parse_lock(raw)
    if lock.inputs_sha256 != definition.inputs_sha256():
        raise AnimusError(
            f"the lock of image {definition.name} was made for other inputs;"
            " run `animus image lock` again",
            code="image_lock_stale",
        )
    return lock
