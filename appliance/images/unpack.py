"""Unpack image layers into a root filesystem for runc, refusing anything unsafe.

Layers come from registries, so their entries are untrusted: an entry may not be absolute,
contain ``..``, pass through a symbolic link, be a hard link to outside the root, be a
symbolic link whose target climbs out of the root, or be a device node or FIFO. Any of those
stops the unpack with ``unsafe_layer_entry`` naming the layer and the entry. Whiteouts
(``.wh.NAME`` and the opaque ``.wh..wh..opq``) remove what lower layers put there.

Unpacked root filesystems are cached by manifest digest and shared read-only by containers.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
from pathlib import Path

from appliance.errors import AnimusError
from appliance.images.layout import Image, Layout
from appliance.images.packages import cache_dir
from appliance.images.progress import NULL_PROGRESS, Progress
from appliance.images.registry import RegistryClient, parse_reference, pull_image
from appliance.images.runtime import MOUNTPOINTS

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
_UNPACK_COMPLETE = ".animus-unpacked"


def _unsafe(layer: str, name: str, reason: str) -> AnimusError:
    return AnimusError(
        f"layer {layer} has an unsafe entry {name!r}: {reason}",
        code="unsafe_layer_entry",
        details={"layer": layer, "entry": name, "reason": reason},
    )


def _entry_parts(layer: str, name: str) -> list[str]:
    if name.startswith("/"):
        raise _unsafe(layer, name, "absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _unsafe(layer, name, "path contains '..'")
    return parts


def _escapes(link_dir: list[str], target: str) -> bool:
    """Whether a relative symlink TARGET, placed in directory LINK_DIR, climbs above '/'."""
    depth = len(link_dir)
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


class _Unpacker:
    def __init__(self, root: Path, layer: str):
        self.root = root
        self.layer = layer
        self.as_root = os.geteuid() == 0

    def parent_dir(self, name: str, parts: list[str]) -> Path:
        """The real directory that will hold PARTS[-1], created if missing; never through a
        symbolic link, because following one could write outside the root."""
        current = self.root
        for part in parts[:-1]:
            current = current / part
            try:
                mode = os.lstat(current).st_mode
            except FileNotFoundError:
                os.mkdir(current, 0o755)
                continue
            if stat.S_ISLNK(mode):
                raise _unsafe(self.layer, name, "path passes through a symbolic link")
            if not stat.S_ISDIR(mode):
                raise _unsafe(self.layer, name, "path passes through a non-directory")
        return current

    def remove(self, path: Path) -> None:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISDIR(mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)

    def whiteout(self, member: tarfile.TarInfo) -> None:
        parts = _entry_parts(self.layer, member.name)
        if not parts:
            return
        parent = self.parent_dir(member.name, parts)
        base = parts[-1]
        if base == OPAQUE_WHITEOUT:
            for child in list(parent.iterdir()):
                self.remove(child)
        else:
            hidden = base[len(WHITEOUT_PREFIX) :]
            if hidden in ("", ".", ".."):
                raise _unsafe(self.layer, member.name, "malformed whiteout")
            self.remove(parent / hidden)

    def extract(self, member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        name = member.name
        parts = _entry_parts(self.layer, name)
        if not parts:
            return
        if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
            kind = "device node" if (member.ischr() or member.isblk()) else "special file"
            raise _unsafe(self.layer, name, kind)
        parent = self.parent_dir(name, parts)
        path = parent / parts[-1]
        # setuid/setgid bits are never honoured in our containers (noNewPrivileges); strip
        # them so that a root filesystem on the host holds no such file either.
        mode = stat.S_IMODE(member.mode) & ~(stat.S_ISUID | stat.S_ISGID)

        if member.isdir():
            if os.path.lexists(path) and not (path.is_dir() and not path.is_symlink()):
                self.remove(path)
            if not os.path.lexists(path):
                os.mkdir(path, 0o700)
            os.chmod(path, mode)
        elif member.issym():
            target = member.linkname
            if not target.startswith("/") and _escapes(parts[:-1], target):
                raise _unsafe(self.layer, name, "symbolic link points outside the root")
            self.remove(path)
            os.symlink(target, path)
        elif member.islnk():
            target_name = member.linkname
            target_parts = _entry_parts(self.layer, target_name)
            if not target_parts:
                raise _unsafe(self.layer, name, "hard link to the root")
            source = self.parent_dir(target_name, target_parts) / target_parts[-1]
            try:
                source_mode = os.lstat(source).st_mode
            except FileNotFoundError:
                raise _unsafe(self.layer, name, "hard link to a missing file") from None
            if stat.S_ISDIR(source_mode):
                raise _unsafe(self.layer, name, "hard link to a directory")
            self.remove(path)
            os.link(source, path, follow_symlinks=False)
            return
        else:
            self.remove(path)
            handle = archive.extractfile(member)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                if handle is not None:
                    shutil.copyfileobj(handle, out, 1 << 20)
            os.chmod(path, mode)
        if self.as_root:
            os.lchown(path, member.uid, member.gid)


def unpack_layer(layer_path: Path, root: Path, *, layer: str) -> None:
    """Apply one layer tarball (any compression tarfile knows) onto ROOT.

    Whiteouts are applied before the layer's own entries, so an opaque directory keeps what
    this same layer puts into it.
    """
    with tarfile.open(layer_path, mode="r:*") as archive:
        unpacker = _Unpacker(root, layer)
        members = []
        for member in archive:
            base = posixpath.basename(member.name.rstrip("/"))
            if base.startswith(WHITEOUT_PREFIX):
                unpacker.whiteout(member)
            else:
                members.append(member)
        for member in members:
            unpacker.extract(member, archive)


def unpack_image(store: Layout, image: Image, cache: Path) -> Path:
    """Unpack IMAGE (its blobs already in STORE) into ``CACHE/<manifest hex>/rootfs`` and
    return that path; an earlier complete unpack of the same digest is reused.

    Every layer is re-hashed against its digest before it is applied.
    """
    final = cache / image.manifest_digest.split(":")[1]
    if (final / _UNPACK_COMPLETE).exists():
        return final / "rootfs"
    cache.mkdir(parents=True, exist_ok=True)
    work = cache / f".tmp-{final.name}-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    rootfs = work / "rootfs"
    rootfs.mkdir(parents=True)
    os.chmod(rootfs, 0o755)  # noqa: S103 - a root filesystem's / is world-readable
    try:
        for layer in image.manifest["layers"]:
            store.verify_blob(layer["digest"])
            unpack_layer(store.blob_path(layer["digest"]), rootfs, layer=layer["digest"])
        # runc mounts onto these; with a read-only root it could not create them later.
        for mountpoint in MOUNTPOINTS:
            target = rootfs / mountpoint
            if not os.path.lexists(target):
                target.mkdir(mode=0o755)
        (work / _UNPACK_COMPLETE).write_text(image.manifest_digest + "\n")
        try:
            os.rename(work, final)
        except OSError:
            # Another process unpacked the same digest first: identical content, and it may
            # already back running containers, so keep theirs.
            if not (final / _UNPACK_COMPLETE).exists():
                raise
    finally:
        if work.exists():
            shutil.rmtree(work)
    return final / "rootfs"


def pull_and_unpack(
    reference: str,
    client: RegistryClient,
    *,
    cache: Path | None = None,
    progress: Progress = NULL_PROGRESS,
) -> tuple[Image, Path]:
    """What the Data Plane calls before a run: pull ``REPO@sha256:…`` (verified, into the
    content store under CACHE) and unpack it into a cached root filesystem.

    Returns the image (its config feeds ``runtime.runtime_config``) and the rootfs path.
    """
    cache = cache or cache_dir()
    store = Layout(cache / "oci")
    image = pull_image(parse_reference(reference), client, store, progress=progress)
    return image, unpack_image(store, image, cache / "rootfs")
