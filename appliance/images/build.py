"""Build an OCI image layout from a definition and its lock, without any container daemon.

Layers, in order: the Debian packages (``dpkg -x`` style: data archives only, no maintainer
scripts), the locked wheels installed under ``/usr/local``, and the definition's own files,
users, links and directories. Every input file is checked against the lock before use.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.sources import WheelFile

from appliance.errors import AnimusError
from appliance.images.definition import ImageDefinition, User
from appliance.images.layer import LayerBlob, LayerBuilder, open_deb_data
from appliance.images.layout import (
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_MANIFEST,
    Layout,
    canonical_json,
    descriptor,
)
from appliance.images.lock import ImageLock, read_lock
from appliance.images.packages import Wheel, fetch_debian, fetch_wheels, sha256_file
from appliance.images.progress import NULL_PROGRESS, Progress

LABEL_LOCK_DIGEST = "io.animus.image.lock-digest"
LABEL_REVISION = "org.opencontainers.image.revision"
LABEL_TITLE = "org.opencontainers.image.title"
LABEL_PYTHON_VERSION = "io.animus.python.version"
LABEL_PYTHON_PLATFORM = "io.animus.python.platform"

PYTHON_PREFIX = "/usr/local"

#: Documentation that no container reads; copyright files stay (licence obligations).
_DROPPED_PREFIXES = ("usr/share/man/", "usr/share/info/", "usr/share/lintian/")


def _keep_debian_path(path: str) -> bool:
    if path.startswith(_DROPPED_PREFIXES):
        return False
    if path.startswith("usr/share/doc/"):
        parts = path.split("/")
        return len(parts) == 4 or (len(parts) == 5 and parts[4] == "copyright")
    return True


@dataclass(frozen=True)
class BuiltImage:
    """The result of a build: where the layout is and what it holds."""

    layout: Path
    manifest_digest: str
    config_digest: str
    layers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def compressed_size(self) -> int:
        """Bytes of all layers as stored and transferred."""
        return sum(layer["size"] for layer in self.layers)


def source_revision(repo_root: Path) -> str:
    """The revision the image is built from: ``$ANIMUS_SOURCE_REVISION``, else git's HEAD,
    else ``unknown`` (a tree with no commits)."""
    configured = os.environ.get("ANIMUS_SOURCE_REVISION")
    if configured:
        return configured
    proc = subprocess.run(
        ["git", "-C", str(repo_root), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def debian_layer(lock: ImageLock, progress: Progress = NULL_PROGRESS) -> LayerBlob | None:
    """One layer holding the data archives of every locked .deb, in lock order."""
    if not lock.debian:
        return None
    paths = fetch_debian(list(lock.debian), progress)
    builder = LayerBuilder()
    for package in lock.debian:
        path = paths[package.sha256]
        if sha256_file(path) != package.sha256:  # the cache may have changed under us
            raise AnimusError(f"{package.name} changed in the cache", code="package_hash_mismatch")
        with open_deb_data(path) as data:
            builder.add_tar(data, origin=package.name, keep=_keep_debian_path)
    progress.step(f"debian layer: {len(lock.debian)} packages, {len(builder)} entries")
    return builder.build()


def install_wheels(
    wheels: list[Wheel], paths: dict[str, Path], python_version: str, builder: LayerBuilder
) -> None:
    """Install WHEELS (already checked against their hashes) into BUILDER under /usr/local,
    with console scripts pointing at the image's interpreter."""
    site = f"{PYTHON_PREFIX}/lib/python{python_version}/dist-packages"
    with tempfile.TemporaryDirectory() as staging:
        destination = SchemeDictionaryDestination(
            scheme_dict={
                "purelib": site,
                "platlib": site,
                "headers": f"{PYTHON_PREFIX}/include/python{python_version}",
                "scripts": f"{PYTHON_PREFIX}/bin",
                "data": PYTHON_PREFIX,
            },
            interpreter=f"/usr/bin/python{python_version}",
            script_kind="posix",
            destdir=staging,
        )
        with tempfile.TemporaryDirectory() as named:
            for wheel in wheels:
                # installer reads tags from the file name; the cache names files by hash.
                link = Path(named, wheel.filename)
                link.symlink_to(paths[wheel.sha256])
                with WheelFile.open(link) as source:
                    install(source, destination, {"INSTALLER": b"animus\n"})
        builder.add_tree(Path(staging), "/")


def wheel_layer(
    definition: ImageDefinition, lock: ImageLock, progress: Progress = NULL_PROGRESS
) -> LayerBlob | None:
    """One layer with every locked wheel installed."""
    if not lock.wheels:
        return None
    paths = fetch_wheels(
        list(lock.wheels),
        definition.python_platform,
        definition.python_version,
        progress=progress,
    )
    builder = LayerBuilder()
    install_wheels(list(lock.wheels), paths, definition.python_version, builder)
    progress.step(f"wheel layer: {len(lock.wheels)} wheels, {len(builder)} entries")
    return builder.build()


def _passwd(users: tuple[User, ...]) -> tuple[bytes, bytes]:
    passwd = ["root:x:0:0:root:/root:/usr/sbin/nologin"]
    group = ["root:x:0:"]
    for user in users:
        passwd.append(f"{user.name}:x:{user.uid}:{user.uid}::{user.home}:{user.shell}")
        group.append(f"{user.name}:x:{user.uid}:")
    passwd.append("nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin")
    group.append("nogroup:x:65534:")
    return ("\n".join(passwd) + "\n").encode(), ("\n".join(group) + "\n").encode()


def definition_layer(definition: ImageDefinition, repo_root: Path) -> LayerBlob:
    """The definition's files, users, links and directories."""
    builder = LayerBuilder()
    passwd, group = _passwd(definition.users)
    builder.add_file("etc/passwd", passwd)
    builder.add_file("etc/group", group)
    builder.add_dir("tmp", 0o1777)
    for user in definition.users:
        builder.add_dir(user.home, 0o750, user.uid, user.uid)
    for path, mode in sorted(definition.directories.items()):
        builder.add_dir(path, mode)
    for path, target in sorted(definition.links.items()):
        builder.add_symlink(path, target)
    for copy in definition.files:
        source = repo_root / copy.source
        if not source.exists():
            raise AnimusError(
                f"image {definition.name} copies a file that does not exist",
                code="image_definition_invalid",
                details={"source": copy.source},
            )
        builder.add_tree(source, copy.target, uid=copy.uid, gid=copy.gid)
        if copy.mode is not None and source.is_file():
            builder.add_file(copy.target, source.read_bytes(), copy.mode, copy.uid, copy.gid)
    return builder.build()


def image_config(
    definition: ImageDefinition, layers: list[LayerBlob], labels: dict[str, str]
) -> dict[str, Any]:
    """The OCI image config document (no timestamps: they would break reproducibility)."""
    cfg = definition.config
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", **cfg.env}
    config: dict[str, Any] = {
        "User": cfg.user,
        "Env": [f"{k}={v}" for k, v in sorted(env.items())],
        "WorkingDir": cfg.workdir,
        "Labels": {**cfg.labels, **labels},
    }
    if cfg.entrypoint:
        config["Entrypoint"] = list(cfg.entrypoint)
    if cfg.cmd:
        config["Cmd"] = list(cfg.cmd)
    return {
        "architecture": definition.architecture,
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }


def write_image(
    layout: Layout,
    layers: list[LayerBlob],
    config: dict[str, Any],
    ref_name: str,
    layer_descriptors: list[dict[str, Any]] | None = None,
) -> BuiltImage:
    """Store LAYERS, CONFIG and their manifest in LAYOUT and name it REF_NAME.

    LAYER_DESCRIPTORS, when given, are descriptors of layers already in the layout (a base
    image) that come before LAYERS.
    """
    layout.init()
    descriptors = list(layer_descriptors or [])
    for layer in layers:
        layout.write_blob(layer.data)
        descriptors.append(
            {"mediaType": layer.media_type, "digest": layer.digest, "size": len(layer.data)}
        )
    config_bytes = canonical_json(config)
    layout.write_blob(config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": descriptor(MEDIA_TYPE_CONFIG, config_bytes),
        "layers": descriptors,
    }
    manifest_bytes = canonical_json(manifest)
    manifest_digest = layout.write_blob(manifest_bytes)
    layout.set_index(manifest_bytes, ref_name)
    return BuiltImage(
        layout=layout.root,
        manifest_digest=manifest_digest,
        config_digest=manifest["config"]["digest"],
        layers=descriptors,
    )


def build_image(
    definition: ImageDefinition,
    output: str | Path,
    *,
    repo_root: Path | None = None,
    progress: Progress = NULL_PROGRESS,
) -> BuiltImage:
    """Build DEFINITION into the OCI layout at OUTPUT and return what was built.

    Building twice from the same definition, lock and revision gives byte-identical blobs.
    """
    lock = read_lock(definition)
    repo_root = repo_root or definition.directory.resolve().parents[1]
    progress.step(f"building image {definition.name}")
    layers = [
        layer
        for layer in (
            debian_layer(lock, progress),
            wheel_layer(definition, lock, progress),
            definition_layer(definition, repo_root),
        )
        if layer is not None
    ]
    labels = {
        LABEL_TITLE: definition.name,
        LABEL_LOCK_DIGEST: lock.digest,
        LABEL_REVISION: source_revision(repo_root),
        LABEL_PYTHON_VERSION: definition.python_version,
        LABEL_PYTHON_PLATFORM: definition.python_platform,
    }
    config = image_config(definition, layers, labels)
    built = write_image(Layout(output), layers, config, ref_name=definition.name)
    progress.step(
        f"built {definition.name} {built.manifest_digest}"
        f" ({built.compressed_size / (1 << 20):.1f} MiB compressed)"
    )
    return built
