"""Installed releases under one prefix, switched atomically, and rolled back.

```
PREFIX/
  releases/V/        a verified, unpacked bundle (its own venv/ inside)
  current -> releases/V
  previous -> releases/U
  VERSION            the installed version (the verifier reads it to refuse downgrades)
  state/             verification records, one JSON file per installed bundle
```

A switch writes a new symbolic link beside the old one and renames it over the old one:
``rename(2)`` replaces the link in one step, so every reader sees either release, never
none. The database is migrated before the switch and reverted before a rollback's switch,
each by the release that knows the migrations (see ``rollback``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import AnimusError
from appliance.storage.blobs import fsync_path

_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+-]{0,63}$")


class InstallError(AnimusError):
    """A release operation that cannot go ahead; the message says why."""

    def __init__(self, message: str, code: str = "invalid_state"):
        super().__init__(message, code=code)


def check_version(version: str) -> str:
    if not _VERSION.match(version):
        raise InstallError(f"not a release version: {version!r}", code="invalid_request")
    return version


@dataclass(frozen=True)
class Installation:
    """The releases installed under PREFIX."""

    prefix: Path

    @property
    def releases(self) -> Path:
        return self.prefix / "releases"

    @property
    def state(self) -> Path:
        return self.prefix / "state"

    @property
    def version_file(self) -> Path:
        return self.prefix / "VERSION"

    def release_dir(self, version: str) -> Path:
        return self.releases / check_version(version)

    def _linked_version(self, name: str) -> str | None:
        link = self.prefix / name
        if not link.is_symlink():
            return None
        return Path(os.readlink(link)).name

    @property
    def current(self) -> str | None:
        return self._linked_version("current")

    @property
    def previous(self) -> str | None:
        return self._linked_version("previous")

    def installed_versions(self) -> list[str]:
        if not self.releases.is_dir():
            return []
        return sorted(p.name for p in self.releases.iterdir() if _is_release(p))

    def animus(self, version: str) -> Path:
        """The ``animus`` command of release VERSION."""
        return self.release_dir(version) / "venv" / "bin" / "animus"

    def status(self) -> dict:
        return {
            "prefix": str(self.prefix),
            "current": self.current,
            "previous": self.previous,
            "installed": self.installed_versions(),
        }


def _is_release(path: Path) -> bool:
    return path.is_dir() and (path / "MANIFEST.json").is_file() and not path.name.startswith(".")


def _replace_link(link: Path, target: str) -> None:
    """Point LINK at TARGET (relative) in one rename; the directory is synced after."""
    temporary = link.with_name(f".{link.name}.new")
    temporary.unlink(missing_ok=True)
    os.symlink(target, temporary)
    os.replace(temporary, link)
    fsync_path(link.parent)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.new")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_path(path.parent)


def activate(installation: Installation, version: str) -> dict:
    """Make release VERSION current; the release it replaces becomes ``previous``.

    Idempotent: activating the current release changes nothing.
    """
    target = installation.release_dir(version)
    if not _is_release(target):
        raise InstallError(f"release {version} is not installed under {installation.releases}")
    if not (target / "venv" / "bin" / "animus").exists():
        raise InstallError(f"release {version} has no virtualenv yet ({target}/venv)")
    old = installation.current
    if old == version:
        return {"changed": False, "current": version, "previous": installation.previous}
    if old is not None:
        _replace_link(installation.prefix / "previous", f"releases/{old}")
    _replace_link(installation.prefix / "current", f"releases/{version}")
    _write_atomically(installation.version_file, version + "\n")
    return {"changed": True, "current": version, "previous": old}


def schema_head(installation: Installation, version: str) -> int:
    """The newest schema version release VERSION knows, asked of that release's own code."""
    animus = installation.animus(version)
    if not animus.exists():
        raise InstallError(f"release {version} has no virtualenv ({animus} is missing)")
    proc = subprocess.run(
        [str(animus), "db", "newest"], capture_output=True, text=True, check=False, timeout=120
    )
    if proc.returncode != 0 or not proc.stdout.strip().isdigit():
        raise InstallError(
            f"release {version} could not tell its schema version: "
            f"{(proc.stderr or proc.stdout).strip()[-300:]}"
        )
    return int(proc.stdout.strip())


def save_verification(installation: Installation, verification: dict) -> Path:
    """Keep the verifier's result beside the releases: the evidence behind the audit event."""
    version = check_version(str(verification.get("version", "")))
    installation.state.mkdir(parents=True, exist_ok=True)
    path = installation.state / f"verification-{version}.json"
    _write_atomically(path, json.dumps(verification, indent=2, sort_keys=True) + "\n")
    return path


def read_verification(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InstallError(f"cannot read the verification record {path}: {exc}") from None
    required = ("status", "version", "manifest_sha256", "signer_fingerprint")
    if not isinstance(data, dict) or any(not data.get(key) for key in required):
        raise InstallError(f"{path} is not a verification record ({', '.join(required)})")
    if data["status"] != "ok":
        raise InstallError(f"{path} records a refused bundle ({data['status']})")
    return data
