"""``animus bundle build``: collect, describe, sign and pack an offline bundle.

Steps: stage the bundle's files (``bundle/bundle.toml`` says which) — hash-pinned wheels
from ``bundle/requirements.lock`` plus the appliance's own wheel, the images as OCI
layouts, Ansible content, docs, install.sh, the stdlib-only verifier — then the SBOM,
``MANIFEST.json`` and its detached signature, then ``animus-V.tar`` and its detached
signature ``animus-V.tar.sig``, optionally split into parts.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from appliance.bundle.archive import split_file, write_tar
from appliance.bundle.manifest import (
    MANIFEST_NAME,
    MANIFEST_SIGNATURE_NAME,
    hash_tree,
    render_manifest,
)
from appliance.bundle.requirements import (
    TARGET_PLATFORM,
    TARGET_PYTHON,
    read_requirements_lock,
)
from appliance.bundle.sbom import ImageEntry, render_sbom
from appliance.bundle.signing import sign_detached, signing_fingerprint
from appliance.errors import AnimusError
from appliance.images.build import build_image
from appliance.images.definition import load_definition
from appliance.images.lock import read_lock
from appliance.images.packages import Wheel, fetch_wheels
from appliance.images.progress import NULL_PROGRESS, Progress

REPO_ROOT = Path(__file__).resolve().parents[2]
SBOM_NAME = "sbom.cdx.json"


@dataclass(frozen=True)
class BundleDefinition:
    """The parsed ``bundle/bundle.toml``."""

    files: dict[str, str]
    directories: dict[str, str]
    images: tuple[str, ...]
    requirements_lock: str
    valid_days: int
    min_upgrade_from: str | None


def load_bundle_definition(repo_root: Path = REPO_ROOT) -> BundleDefinition:
    """Read what a bundle contains from ``bundle/bundle.toml``."""
    data = tomllib.loads((repo_root / "bundle" / "bundle.toml").read_text())
    contents, policy = data["contents"], data.get("policy", {})
    return BundleDefinition(
        files=dict(contents["files"]),
        directories=dict(contents.get("directories", {})),
        images=tuple(contents["images"]),
        requirements_lock=contents["requirements_lock"],
        valid_days=int(policy.get("valid_days", 365)),
        min_upgrade_from=policy.get("min_upgrade_from"),
    )


@dataclass(frozen=True)
class BuiltBundle:
    """What ``build_bundle`` wrote."""

    version: str
    tar: Path | None
    signature: Path
    parts: list[Path]
    manifest_sha256: str
    signer_fingerprint: str
    images: dict[str, str] = field(default_factory=dict)
    size: int = 0


class _ByteProgress:
    """Turns per-chunk byte counts into ``Progress.transfer`` calls."""

    def __init__(self, progress: Progress, label: str, total: int):
        self.progress, self.label, self.total, self.done = progress, label, total, 0

    def __call__(self, n: int) -> None:
        self.done += n
        self.progress.transfer(self.label, self.done, self.total)


def _stage_wheels(
    definition: BundleDefinition,
    repo_root: Path,
    dest: Path,
    wheelhouse: Path | None,
    progress: Progress,
) -> list[Wheel]:
    wheels = read_requirements_lock(repo_root / definition.requirements_lock)
    progress.step(f"collecting {len(wheels)} hash-pinned wheels")
    found = fetch_wheels(
        wheels, TARGET_PLATFORM, TARGET_PYTHON, find_links=wheelhouse, progress=progress
    )
    dest.mkdir(parents=True)
    for wheel in wheels:
        shutil.copyfile(found[wheel.sha256], dest / wheel.filename)
    progress.step("building the appliance's own wheel")
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"),
            "--disable-pip-version-check",
            *("--wheel-dir", str(dest), str(repo_root)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise AnimusError(
            f"building the appliance wheel failed: {proc.stderr.strip()[-300:]}",
            code="package_unavailable",
        )
    return wheels


def _stage_images(
    names: tuple[str, ...], repo_root: Path, dest: Path, progress: Progress
) -> tuple[list[dict], list[ImageEntry]]:
    entries, sbom_entries = [], []
    for index, name in enumerate(names, start=1):
        progress.step(f"image {index}/{len(names)}: {name}")
        definition = load_definition(repo_root / "images" / name)
        built = build_image(definition, dest / name, repo_root=repo_root, progress=progress)
        entries.append({"name": name, "digest": built.manifest_digest, "path": f"images/{name}"})
        sbom_entries.append(ImageEntry(name, built.manifest_digest, read_lock(definition)))
    return entries, sbom_entries


def _stage_content(definition: BundleDefinition, repo_root: Path, stage: Path) -> None:
    for target, source in definition.files.items():
        (stage / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo_root / source, stage / target)
    for target, source in definition.directories.items():
        if (repo_root / source).is_dir():  # ansible/ lands later; a bundle without it is fine
            shutil.copytree(
                repo_root / source,
                stage / target,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"),
                symlinks=False,
            )


def build_bundle(
    version: str,
    sign_key: str,
    output: str | Path,
    *,
    images: tuple[str, ...] | None = None,
    wheels: bool = True,
    wheelhouse: Path | None = None,
    split_size: int | None = None,
    valid_days: int | None = None,
    min_upgrade_from: str | None = None,
    gnupghome: str | Path | None = None,
    repo_root: Path = REPO_ROOT,
    now: dt.datetime | None = None,
    progress: Progress = NULL_PROGRESS,
) -> BuiltBundle:
    """Build ``animus-VERSION.tar`` and its detached signature in OUTPUT.

    IMAGES: names under ``images/`` (None: all that bundle.toml lists; ``()``: none).
    WHEELS: include offline-wheels/ (False only for quick test bundles).
    SPLIT_SIZE: cut the tar into parts of at most this many bytes, with a parts index.
    """
    definition = load_bundle_definition(repo_root)
    fingerprint = signing_fingerprint(sign_key, gnupghome)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    top = f"animus-{version}"
    tar_path = output / f"{top}.tar"
    created = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    expires = created + dt.timedelta(days=valid_days or definition.valid_days)
    chosen = definition.images if images is None else images
    unknown = sorted(set(chosen) - set(definition.images))
    if unknown:
        raise AnimusError(f"unknown image(s): {', '.join(unknown)}", code="invalid_request")
    with tempfile.TemporaryDirectory(dir=output, prefix=".stage-") as tmp:
        stage = Path(tmp) / top
        stage.mkdir()
        progress.step(f"staging bundle {version}")
        _stage_content(definition, repo_root, stage)
        wheel_list = (
            _stage_wheels(definition, repo_root, stage / "offline-wheels", wheelhouse, progress)
            if wheels
            else []
        )
        image_entries, sbom_images = _stage_images(chosen, repo_root, stage / "images", progress)
        progress.step("writing the SBOM (CycloneDX 1.6)")
        (stage / SBOM_NAME).write_text(render_sbom(version, created, wheel_list, sbom_images))
        progress.step("hashing every file for the manifest")
        entries = hash_tree(stage)
        total = sum(e.size for e in entries)
        manifest = render_manifest(
            version=version,
            created=created,
            expires=expires,
            min_upgrade_from=min_upgrade_from or definition.min_upgrade_from,
            files=entries,
            images=image_entries,
            sbom=SBOM_NAME,
        )
        (stage / MANIFEST_NAME).write_bytes(manifest)
        progress.step(f"signing {MANIFEST_NAME} with {fingerprint}")
        sign_detached(
            stage / MANIFEST_NAME,
            stage / MANIFEST_SIGNATURE_NAME,
            fingerprint,
            armor=True,
            gnupghome=gnupghome,
        )
        progress.step(
            f"writing {tar_path.name} ({len(entries)} files, {total / (1 << 20):.1f} MiB)"
        )
        tar_path.unlink(missing_ok=True)
        write_tar(
            stage,
            tar_path,
            top,
            mtime=int(created.timestamp()),
            on_bytes=_ByteProgress(progress, tar_path.name, total),
        )
    signature = tar_path.with_name(tar_path.name + ".sig")
    signature.unlink(missing_ok=True)
    progress.step(f"signing {tar_path.name}")
    sign_detached(tar_path, signature, fingerprint, armor=False, gnupghome=gnupghome)
    size = tar_path.stat().st_size
    parts: list[Path] = []
    if split_size:
        progress.step(f"splitting into parts of at most {split_size / (1 << 20):.0f} MiB")
        parts = split_file(tar_path, split_size)
    return BuiltBundle(
        version=version,
        tar=None if parts else tar_path,
        signature=signature,
        parts=parts,
        manifest_sha256=hashlib.sha256(manifest).hexdigest(),
        signer_fingerprint=fingerprint,
        images={e["name"]: e["digest"] for e in image_entries},
        size=size,
    )
