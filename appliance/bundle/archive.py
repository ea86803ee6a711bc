"""The bundle's outer file: a deterministic, uncompressed tar, optionally split into parts.

Members sit under one folder ``animus-V/``; the manifest and its signature come first, so
a reader meets the list of what may follow before anything else. Entries are sorted, owned
by 0:0 with no names, mtime fixed, mode 0644 (0755 for executables).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

from appliance.bundle.manifest import MANIFEST_NAME, MANIFEST_SIGNATURE_NAME

PARTS_FORMAT = "animus-bundle-parts/1"
_COPY_CHUNK = 4 << 20


def _tarinfo(
    name: str, *, size: int = 0, mode: int = 0o644, mtime: int, directory: bool = False
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    if directory:
        info.type = tarfile.DIRTYPE
    info.size = size
    info.mode = mode
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_tar(
    root: Path,
    tar_path: Path,
    top: str,
    *,
    mtime: int,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Write every file under ROOT into TAR_PATH below the folder TOP."""
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    first = [name for name in (MANIFEST_NAME, MANIFEST_SIGNATURE_NAME) if name in files]
    directories = sorted(
        {parent.as_posix() for name in files for parent in Path(name).parents} - {"."}
    )
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(_tarinfo(top, mode=0o755, mtime=mtime, directory=True))
        for name in first:
            _add_file(archive, root / name, f"{top}/{name}", mtime, on_bytes)
        for directory in directories:
            info = _tarinfo(f"{top}/{directory}", mode=0o755, mtime=mtime, directory=True)
            archive.addfile(info)
        for name in files:
            if name not in first:
                _add_file(archive, root / name, f"{top}/{name}", mtime, on_bytes)


def _add_file(
    archive: tarfile.TarFile,
    path: Path,
    name: str,
    mtime: int,
    on_bytes: Callable[[int], None] | None,
) -> None:
    mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
    info = _tarinfo(name, size=path.stat().st_size, mode=mode, mtime=mtime)
    with open(path, "rb") as handle:
        archive.addfile(info, _Counting(handle, on_bytes))


class _Counting:
    """A file reader that reports bytes read (tarfile copies with read())."""

    def __init__(self, handle, on_bytes: Callable[[int], None] | None):
        self.handle = handle
        self.on_bytes = on_bytes

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        if self.on_bytes is not None and data:
            self.on_bytes(len(data))
        return data


def split_file(path: Path, part_size: int) -> list[Path]:
    """Cut PATH into ``PATH.part-000``, … of at most PART_SIZE bytes, write the index
    ``PATH.parts.json`` and remove PATH. ``cat PATH.part-* > PATH`` puts it back together."""
    if part_size <= 0:
        raise ValueError("part size must be positive")
    parts: list[dict] = []
    whole = hashlib.sha256()
    with open(path, "rb") as source:
        index = 0
        while True:
            part_path = path.with_name(f"{path.name}.part-{index:03d}")
            digest = hashlib.sha256()
            written = 0
            with open(part_path, "wb") as out:
                while written < part_size:
                    chunk = source.read(min(_COPY_CHUNK, part_size - written))
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    whole.update(chunk)
                    written += len(chunk)
            if written == 0 and index > 0:
                part_path.unlink()
                break
            parts.append({"name": part_path.name, "size": written, "sha256": digest.hexdigest()})
            index += 1
            if written < part_size:
                break
    index_doc = {
        "format": PARTS_FORMAT,
        "bundle": path.name,
        "size": sum(p["size"] for p in parts),
        "sha256": whole.hexdigest(),
        "parts": parts,
    }
    index_path = path.with_name(path.name + ".parts.json")
    index_path.write_text(json.dumps(index_doc, indent=1, sort_keys=True) + "\n")
    path.unlink()
    return [path.with_name(p["name"]) for p in parts]
