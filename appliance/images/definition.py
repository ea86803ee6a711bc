"""Declarative image definitions: ``images/<name>/image.toml``.

A definition says *what* goes into an image (Debian packages, Python requirements, files
from the repository, users, links) and how the container starts; its lock
(``image.lock.json`` beside it) says *which exact bytes* those inputs are.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import AnimusError

DEFINITION_FILE = "image.toml"
LOCK_FILE = "image.lock.json"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_PIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+$")


def _invalid(message: str, **details: Any) -> AnimusError:
    return AnimusError(message, code="image_definition_invalid", details=details)


@dataclass(frozen=True)
class FileCopy:
    """A file or directory of the repository copied into the image."""

    source: str
    target: str
    mode: int | None = None
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class User:
    """A user (with a group of the same name and id) written to /etc/passwd and /etc/group."""

    name: str
    uid: int
    home: str
    shell: str = "/usr/sbin/nologin"


@dataclass(frozen=True)
class ImageConfig:
    """What the OCI image config says about how the container starts."""

    user: str
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageDefinition:
    """One parsed ``image.toml``."""

    name: str
    directory: Path
    suite: str
    architecture: str
    debian_packages: tuple[str, ...]
    debian_exclude: tuple[str, ...]
    python_requirements: tuple[str, ...]
    python_platform: str
    python_version: str
    files: tuple[FileCopy, ...]
    users: tuple[User, ...]
    links: dict[str, str]
    directories: dict[str, int]
    config: ImageConfig

    @property
    def lock_path(self) -> Path:
        """Where the committed lock of this definition lives."""
        return self.directory / LOCK_FILE

    def inputs_sha256(self) -> str:
        """Digest of the inputs a lock pins; a lock made for other inputs is stale."""
        inputs = {
            "suite": self.suite,
            "architecture": self.architecture,
            "debian_packages": sorted(self.debian_packages),
            "debian_exclude": sorted(self.debian_exclude),
            "python_requirements": sorted(self.python_requirements),
            "python_platform": self.python_platform,
            "python_version": self.python_version,
        }
        data = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(data).hexdigest()


def _image_path(value: str, what: str) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise _invalid(f"{what} must be an absolute path in the image", path=value)
    normalized = posixpath.normpath(value)
    if normalized != (value.rstrip("/") or "/") or "/../" in f"{value}/":
        raise _invalid(f"{what} must be a normalized path", path=value)
    return normalized


def _str_list(table: dict[str, Any], key: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid(f"{key} must be a list of strings")
    return tuple(value)


def load_definition(directory: str | Path) -> ImageDefinition:
    """Read and validate ``DIRECTORY/image.toml``.

    Raises ``AnimusError(code="image_definition_invalid")`` naming the first problem.
    """
    directory = Path(directory)
    path = directory / DEFINITION_FILE
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _invalid(
            f"no {DEFINITION_FILE} in the image directory", directory=str(directory)
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise _invalid(f"{DEFINITION_FILE} is not valid TOML: {exc}") from exc

    name = raw.get("name", "")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _invalid("name must be a lowercase image name", name=name)

    debian = raw.get("debian", {})
    python = raw.get("python", {})
    requirements = _str_list(python, "requirements")
    for requirement in requirements:
        if not _PIN_RE.match(requirement):
            raise _invalid("python requirements must be pinned as name==version", req=requirement)

    files = []
    for item in raw.get("files", []):
        mode = item.get("mode")
        files.append(
            FileCopy(
                source=str(item["source"]),
                target=_image_path(item["target"], "files.target"),
                mode=int(mode) if mode is not None else None,
                uid=int(item.get("uid", 0)),
                gid=int(item.get("gid", 0)),
            )
        )
        if Path(item["source"]).is_absolute() or ".." in Path(item["source"]).parts:
            raise _invalid("files.source must be relative to the repository", source=item["source"])

    users = tuple(
        User(
            name=str(u["name"]),
            uid=int(u["uid"]),
            home=_image_path(u["home"], "users.home"),
            shell=str(u.get("shell", "/usr/sbin/nologin")),
        )
        for u in raw.get("users", [])
    )
    links = {_image_path(k, "links"): str(v) for k, v in raw.get("links", {}).items()}
    directories = {
        _image_path(k, "directories"): int(v) for k, v in raw.get("directories", {}).items()
    }

    cfg = raw.get("config", {})
    user = cfg.get("user", "")
    if not isinstance(user, str) or not user:
        raise _invalid("config.user is required (images run as a non-root user)")
    if user.split(":")[0] in ("0", "root"):
        raise _invalid("config.user must not be root", user=user)
    config = ImageConfig(
        user=user,
        entrypoint=_str_list(cfg, "entrypoint"),
        cmd=_str_list(cfg, "cmd"),
        workdir=_image_path(cfg.get("workdir", "/"), "config.workdir"),
        env={str(k): str(v) for k, v in cfg.get("env", {}).items()},
        labels={str(k): str(v) for k, v in cfg.get("labels", {}).items()},
    )
    return ImageDefinition(
        name=name,
        directory=directory,
        suite=str(debian.get("suite", "bookworm")),
        architecture=str(debian.get("architecture", "amd64")),
        debian_packages=_str_list(debian, "packages"),
        debian_exclude=_str_list(debian, "exclude"),
        python_requirements=requirements,
        python_platform=str(python.get("platform", "manylinux_2_36_x86_64")),
        python_version=str(python.get("version", "3.11")),
        files=tuple(files),
        users=users,
        links=links,
        directories=directories,
        config=config,
    )
