"""Deterministic layer tarballs.

A ``LayerBuilder`` collects filesystem entries from any source (.deb data archives, installed
wheels, repository files, generated files) and writes them as one tar: entries sorted by path,
every parent directory present, mtime fixed, owner 0:0 unless the definition says otherwise,
no user or group names, hard links turned into copies. Nothing of the build host leaks in,
so the same entries always give the same bytes, and the gzip stream carries no name or time.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import posixpath
import stat
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from appliance.errors import AnimusError

#: Every entry's mtime. Zero says plainly "not a real time"; nothing in an image depends on it.
FIXED_MTIME = 0
GZIP_LEVEL = 6
MEDIA_TYPE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class Entry:
    """One filesystem entry of a layer; PATH is relative to the root, without a leading '/'."""

    path: str
    kind: str  # "file" | "dir" | "symlink"
    mode: int
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    target: str = ""


@dataclass(frozen=True)
class LayerBlob:
    """A finished, compressed layer."""

    data: bytes
    digest: str  # sha256 of the compressed bytes
    diff_id: str  # sha256 of the uncompressed tar
    media_type: str = MEDIA_TYPE_LAYER_GZIP


def normalize_path(path: str) -> str:
    """'./usr//bin/' and '/usr/bin' both become 'usr/bin'; '..' is refused."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise AnimusError(
            "path leaves the image root", code="unsafe_layer_entry", details={"path": path}
        )
    return "/".join(parts)


class LayerBuilder:
    """Collects entries; later additions replace earlier ones at the same path."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: Entry) -> None:
        """Add ENTRY and any missing parent directories (0755, root-owned)."""
        path = normalize_path(entry.path)
        if not path:
            return
        parent = posixpath.dirname(path)
        while parent and parent not in self._entries:
            self._entries[parent] = Entry(parent, "dir", 0o755)
            parent = posixpath.dirname(parent)
        self._entries[path] = replace(entry, path=path)

    def add_file(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0):
        """Add a regular file."""
        self.add(Entry(path, "file", mode, uid, gid, data=data))

    def add_dir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        """Add a directory."""
        self.add(Entry(path, "dir", mode, uid, gid))

    def add_symlink(self, path: str, target: str) -> None:
        """Add a symbolic link."""
        self.add(Entry(path, "symlink", 0o777, target=target))

    def add_tree(self, source: Path, target: str, *, uid: int = 0, gid: int = 0) -> None:
        """Add a host directory tree (or one file) at TARGET. Only permission bits survive,
        normalized to 0755/0644 so that a developer's umask does not change the image;
        ``__pycache__`` and ``*.pyc`` are left out because they embed host mtimes."""
        if source.is_file():
            mode = 0o755 if source.stat().st_mode & 0o111 else 0o644
            self.add_file(target, source.read_bytes(), mode, uid, gid)
            return
        self.add_dir(target, 0o755, uid, gid)
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source)
            if "__pycache__" in rel.parts or path.suffix == ".pyc":
                continue
            dest = posixpath.join(target, rel.as_posix())
            if path.is_symlink():
                self.add_symlink(dest, str(path.readlink()))
            elif path.is_dir():
                self.add_dir(dest, 0o755, uid, gid)
            elif path.is_file():
                mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
                self.add_file(dest, path.read_bytes(), mode, uid, gid)

    def add_tar(
        self,
        archive: tarfile.TarFile,
        *,
        origin: str,
        keep: Callable[[str], bool] | None = None,
    ) -> None:
        """Add the members of a (trusted, build-time) tar such as a .deb's data archive.

        Hard links become copies of their target so that entry order never matters; device
        nodes and FIFOs are refused because no image of ours needs them.
        """
        members = archive.getmembers()
        contents: dict[str, bytes] = {}
        for member in members:
            path = normalize_path(member.name)
            if member.isfile():
                handle = archive.extractfile(member)
                contents[path] = handle.read() if handle else b""
        for member in members:
            path = normalize_path(member.name)
            if not path or (keep is not None and not keep(path)):
                continue
            mode = stat.S_IMODE(member.mode)
            if member.isdir():
                self.add(Entry(path, "dir", mode, member.uid, member.gid))
            elif member.isfile():
                self.add(Entry(path, "file", mode, member.uid, member.gid, data=contents[path]))
            elif member.issym():
                self.add(
                    Entry(path, "symlink", 0o777, member.uid, member.gid, target=member.linkname)
                )
            elif member.islnk():
                source = normalize_path(member.linkname)
                if source not in contents:
                    raise AnimusError(
                        f"hard link to a missing file in {origin}",
                        code="unsafe_layer_entry",
                        details={"path": path},
                    )
                self.add(Entry(path, "file", mode, member.uid, member.gid, data=contents[source]))
            else:
                raise AnimusError(
                    f"special file in {origin}",
                    code="unsafe_layer_entry",
                    details={"path": path},
                )

    def paths(self) -> list[str]:
        """Paths in the order they are written."""
        return sorted(self._entries)

    def tar_bytes(self) -> bytes:
        """The uncompressed, deterministic tar."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in self.paths():
                entry = self._entries[path]
                info = tarfile.TarInfo(path)
                info.mtime = FIXED_MTIME
                info.mode = entry.mode
                info.uid, info.gid = entry.uid, entry.gid
                info.uname = info.gname = ""
                if entry.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif entry.kind == "symlink":
                    info.type = tarfile.SYMTYPE
                    info.linkname = entry.target
                    tar.addfile(info)
                else:
                    info.size = len(entry.data)
                    tar.addfile(info, io.BytesIO(entry.data))
        return buffer.getvalue()

    def build(self) -> LayerBlob:
        """Write the tar and gzip it (no file name, mtime 0 in the gzip header)."""
        raw = self.tar_bytes()
        compressed = gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0)
        return LayerBlob(
            data=compressed,
            digest="sha256:" + hashlib.sha256(compressed).hexdigest(),
            diff_id="sha256:" + hashlib.sha256(raw).hexdigest(),
        )


def open_deb_data(path: Path) -> tarfile.TarFile:
    """Open the data archive of a .deb (an ar archive holding data.tar.{xz,gz,zst,bz2})."""
    blob = path.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise AnimusError(f"{path.name} is not a Debian package", code="invalid_request")
    offset = 8
    while offset + 60 <= len(blob):
        header = blob[offset : offset + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = blob[offset + 60 : offset + 60 + size]
        offset += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                # tarfile has no zstd; Debian's zstd tool is a build-host requirement.
                body = subprocess.run(
                    ["zstd", "-dc"], input=body, capture_output=True, check=True
                ).stdout
                return tarfile.open(fileobj=io.BytesIO(body), mode="r:")
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
    raise AnimusError(f"{path.name} has no data archive", code="invalid_request")
