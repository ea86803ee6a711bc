"""Environment builds: an EnvironmentDefinition's wheels, layered onto the runner image.

The packages come only from the offline wheelhouse (never an index), each pinned by its
SHA-256; the new image is pushed by digest and the function returns the data of an
EnvironmentLock (``image_digest`` plus every package with its hash), which the control plane
records through ``POST /api/v1/projects/{pid}/environment-locks``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import AnimusError
from appliance.images.build import (
    LABEL_PYTHON_PLATFORM,
    LABEL_PYTHON_VERSION,
    install_wheels,
    write_image,
)
from appliance.images.layer import LayerBuilder
from appliance.images.layout import Layout
from appliance.images.packages import cache_dir, fetch_wheels, resolve_wheels
from appliance.images.progress import NULL_PROGRESS, Progress
from appliance.images.registry import RegistryClient, parse_reference, pull_image, push_image

LABEL_ENVIRONMENT = "io.animus.environment.name"
LABEL_BASE_DIGEST = "io.animus.environment.base-digest"
# A project name with optional extras and version specifiers; markers and URLs are refused
# because they would let an environment reach outside the wheelhouse or depend on the host.
_REQUIREMENT_RE = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?"
    r"((===?|!=|~=|<=?|>=?)[\w.*+!-]+(,(===?|!=|~=|<=?|>=?)[\w.*+!-]+)*)?$"
)


@dataclass(frozen=True)
class EnvironmentDefinition:
    """What an environment asks for: requirements (exact pins or ranges, resolved against the
    wheelhouse; the lock records what they resolved to), optionally with expected hashes."""

    name: str
    packages: tuple[str, ...]
    hashes: dict[str, tuple[str, ...]]  # canonical project name -> allowed sha256 hex


def load_environment_definition(path: str | Path) -> EnvironmentDefinition:
    """Read an environment definition (TOML)::

    name = "sklearn"
    packages = ["scikit-learn==1.5.2", "numpy==2.1.3"]
    [hashes]            # optional: the wheel a package must resolve to
    numpy = ["sha256:…"]
    """
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise AnimusError(
            f"cannot read the environment definition: {exc}", code="validation_failed"
        ) from exc
    name = raw.get("name")
    packages = raw.get("packages", [])
    if not isinstance(name, str) or not re.match(r"^[a-z0-9][a-z0-9._-]{0,62}$", name):
        raise AnimusError("environment name must be a lowercase name", code="validation_failed")
    if not packages or not all(isinstance(p, str) and _REQUIREMENT_RE.match(p) for p in packages):
        raise AnimusError(
            "packages must be a non-empty list of requirements such as name==version",
            code="validation_failed",
        )
    hashes = {
        re.sub(r"[-_.]+", "-", key).lower(): tuple(h.removeprefix("sha256:") for h in value)
        for key, value in raw.get("hashes", {}).items()
    }
    return EnvironmentDefinition(name=name, packages=tuple(packages), hashes=hashes)


def build_environment(
    definition: EnvironmentDefinition,
    *,
    base: str,
    wheelhouse: Path,
    client: RegistryClient,
    repository: str,
    output: Path | None = None,
    progress: Progress = NULL_PROGRESS,
) -> dict[str, Any]:
    """Build and push the environment image; return the EnvironmentLock data.

    BASE is the runner image pinned by digest (``REGISTRY/REPO@sha256:…``); it is pulled
    and verified first. The result is ``{"image_digest", "image_reference",
    "base_image_digest", "packages": [{name, version, filename, sha256}]}``.
    """
    base_ref = parse_reference(base)
    if base_ref.registry != client.registry:
        raise AnimusError(
            "the base image must be in the registry the environment is pushed to",
            code="invalid_request",
            details={"base": str(base_ref), "registry": client.registry},
        )
    store = Layout(cache_dir() / "oci")
    progress.step(f"pulling base image {base_ref}")
    base_image = pull_image(base_ref, client, store, progress=progress)
    labels = base_image.config.get("config", {}).get("Labels", {})
    python_version = labels.get(LABEL_PYTHON_VERSION, "3.11")
    platform = labels.get(LABEL_PYTHON_PLATFORM, "manylinux_2_36_x86_64")

    progress.step(f"resolving {len(definition.packages)} packages from the wheelhouse")
    wheels = resolve_wheels(definition.packages, platform, python_version, find_links=wheelhouse)
    for wheel in wheels:
        allowed = definition.hashes.get(wheel.name)
        if allowed is not None and wheel.sha256 not in allowed:
            raise AnimusError(
                f"wheel {wheel.filename} in the wheelhouse does not have the required hash",
                code="package_hash_mismatch",
                details={"package": wheel.name, "sha256": wheel.sha256},
            )
    paths = fetch_wheels(wheels, platform, python_version, find_links=wheelhouse, progress=progress)
    progress.step(f"installing {len(wheels)} wheels")
    builder = LayerBuilder()
    install_wheels(wheels, paths, python_version, builder)
    layer = builder.build()

    packages_digest = hashlib.sha256(
        "".join(f"{w.name}=={w.version} sha256:{w.sha256}\n" for w in wheels).encode()
    ).hexdigest()
    config = dict(base_image.config)
    config["config"] = {
        **config.get("config", {}),
        "Labels": {
            **labels,
            LABEL_ENVIRONMENT: definition.name,
            LABEL_BASE_DIGEST: base_image.manifest_digest,
            "io.animus.environment.packages-sha256": packages_digest,
        },
    }
    config["rootfs"] = {
        "type": "layers",
        "diff_ids": [*config["rootfs"]["diff_ids"], layer.diff_id],
    }

    work = Path(tempfile.mkdtemp(prefix="animus-env-")) if output is None else output
    try:
        layout = Layout(work)
        layout.init()
        for blob in base_image.manifest["layers"]:
            target = layout.blob_path(blob["digest"])
            if not target.exists():
                # A hard link costs nothing; a copy is the fallback across file systems.
                try:
                    os.link(store.blob_path(blob["digest"]), target)
                except OSError:
                    shutil.copyfile(store.blob_path(blob["digest"]), target)
        built = write_image(
            layout,
            [layer],
            config,
            ref_name=definition.name,
            layer_descriptors=list(base_image.manifest["layers"]),
        )
        image = layout.image(definition.name)
        pushed = push_image(
            layout, image, client, repository, mount_from=base_ref.repository, progress=progress
        )
    finally:
        if output is None:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "image_digest": built.manifest_digest,
        "image_reference": pushed.reference,
        "base_image_digest": base_image.manifest_digest,
        "packages": [
            {"name": w.name, "version": w.version, "filename": w.filename, "sha256": w.sha256}
            for w in wheels
        ],
    }
