"""MANIFEST.json: what a bundle holds, file by file, as ``bundle/verify.py`` reads it.

The manifest lists every file of the unpacked bundle except itself and its signature, with
its SHA-256 and size, plus the images' manifest digests, the product version, when the
bundle was made, when it expires and the oldest version it may upgrade.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_FORMAT = "animus-bundle-manifest/1"
MANIFEST_NAME = "MANIFEST.json"
MANIFEST_SIGNATURE_NAME = "MANIFEST.json.asc"
PRODUCT = "animus-datalab"


@dataclass(frozen=True)
class FileEntry:
    """One file of the bundle, by its path relative to the bundle's root."""

    path: str
    sha256: str
    size: int


def hash_file(path: Path) -> tuple[str, int]:
    """SHA-256 hex and size of PATH, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size


def list_files(root: Path) -> list[str]:
    """Relative paths of every regular file under ROOT except the manifest and its
    signature, sorted; a symbolic link or special file is an error (a bundle holds none)."""
    paths = []
    for directory, _dirs, names in os.walk(root):
        for name in names:
            path = Path(directory, name)
            if path.is_symlink() or not path.is_file():
                raise ValueError(f"{path} is not a regular file; a bundle holds only files")
            rel = path.relative_to(root).as_posix()
            if rel not in (MANIFEST_NAME, MANIFEST_SIGNATURE_NAME):
                paths.append(rel)
    return sorted(paths)


def hash_tree(
    root: Path,
    *,
    workers: int | None = None,
    on_file: Callable[[int], None] | None = None,
) -> list[FileEntry]:
    """Hash every file under ROOT in parallel threads (hashlib releases the GIL)."""
    paths = list_files(root)
    workers = workers or min(32, (os.cpu_count() or 1) + 2)
    entries: dict[str, FileEntry] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(hash_file, root / p): p for p in paths}
        for future in concurrent.futures.as_completed(futures):
            sha, size = future.result()
            path = futures[future]
            entries[path] = FileEntry(path, sha, size)
            if on_file is not None:
                on_file(size)
    return [entries[p] for p in paths]


def render_manifest(
    *,
    version: str,
    created: dt.datetime,
    expires: dt.datetime,
    min_upgrade_from: str | None,
    files: list[FileEntry],
    images: list[dict[str, Any]],
    sbom: str | None,
) -> bytes:
    """The manifest bytes as signed: sorted keys, one-space indent (readable by a person
    checking a bundle by hand), UTF-8, trailing newline."""
    document = {
        "format": MANIFEST_FORMAT,
        "product": PRODUCT,
        "version": version,
        "created": _rfc3339(created),
        "expires": _rfc3339(expires),
        "min_upgrade_from": min_upgrade_from,
        "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in files],
        "images": sorted(images, key=lambda image: image["name"]),
        "sbom": sbom,
        "total_size": sum(f.size for f in files),
    }
    return (json.dumps(document, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()


def _rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
