"""Pinned Debian packages and Python wheels: resolving them into a lock, fetching them by hash.

Resolving needs the build host's package sources (apt lists and PyPI). Fetching goes through a
content-addressed cache (``$ANIMUS_CACHE_DIR/packages/sha256/<hex>``): a file is only ever
used after its SHA-256 matched the lock, whether it came from the cache or the network.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from appliance.errors import AnimusError
from appliance.images.progress import NULL_PROGRESS, Progress

_INST_RE = re.compile(r"^Inst (\S+) \((\S+) .*\[(\S+)\]\)")
_WHEEL_RE = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def cache_dir() -> Path:
    """The download and unpack cache: ``$ANIMUS_CACHE_DIR``, default ``~/.cache/animus``."""
    configured = os.environ.get("ANIMUS_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "animus"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class DebianPackage:
    """One pinned .deb of a lock."""

    name: str
    version: str
    architecture: str
    filename: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel of a lock."""

    name: str
    version: str
    filename: str
    size: int
    sha256: str


def wheel_from_file(path: Path) -> Wheel:
    """Describe a wheel file by its name and content."""
    match = _WHEEL_RE.match(path.name)
    if not match:
        raise AnimusError(f"not a wheel file name: {path.name}", code="invalid_request")
    return Wheel(
        name=canonical_name(match["name"]),
        version=match["version"],
        filename=path.name,
        size=path.stat().st_size,
        sha256=sha256_file(path),
    )


def canonical_name(name: str) -> str:
    """PEP 503 normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _run(args: list[str], *, what: str, cwd: str | Path | None = None) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise AnimusError(
            f"{what} failed: {' / '.join(tail)}",
            code="package_unavailable",
            details={"command": args[0]},
        )
    return proc.stdout


def resolve_debian(
    packages: Iterable[str], exclude: Iterable[str], architecture: str
) -> list[DebianPackage]:
    """Resolve the dependency closure of PACKAGES from the host's apt lists, as if installed
    onto an empty system, and pin each package by version and SHA-256.

    apt's own resolver is used against an empty dpkg status so that alternatives and virtual
    packages are chosen the way a real installation chooses them.
    """
    packages = list(packages)
    if not packages:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        status = Path(tmp, "status")
        status.write_text("")
        out = _run(
            [
                "apt-get",
                "-s",
                "-q",
                "-o",
                f"Dir::State::status={status}",
                "-o",
                f"APT::Architecture={architecture}",
                "install",
                "--no-install-recommends",
                *packages,
            ],
            what="resolving Debian packages",
        )
    excluded = set(exclude)
    chosen = []
    for line in out.splitlines():
        match = _INST_RE.match(line)
        if match and match[1] not in excluded:
            chosen.append((match[1], match[2]))
    show = _run(
        ["apt-cache", "show", *(f"{n}={v}" for n, v in chosen)],
        what="reading Debian package metadata",
    )
    by_key: dict[tuple[str, str], DebianPackage] = {}
    for stanza in show.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " "
        )
        if "Package" not in fields:
            continue
        key = (fields["Package"], fields["Version"])
        by_key.setdefault(
            key,
            DebianPackage(
                name=fields["Package"],
                version=fields["Version"],
                architecture=fields["Architecture"],
                filename=fields["Filename"],
                size=int(fields["Size"]),
                sha256=fields["SHA256"],
            ),
        )
    return sorted((by_key[key] for key in chosen), key=lambda p: p.name)


def _compatible_platforms(platform: str) -> list[str]:
    """PLATFORM and every older manylinux tag it runs (pip 23 does not expand them itself)."""
    match = re.match(r"^manylinux_2_(\d+)_(\w+)$", platform)
    if not match:
        return [platform]
    glibc_minor, arch = int(match[1]), match[2]
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc_minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{name}_{arch}" for minor, name in legacy.items() if minor <= glibc_minor]
    return tags


def _pip_platform_args(platform: str, python_version: str) -> list[str]:
    abi = "cp" + python_version.replace(".", "")
    args = ["--only-binary=:all:", "--python-version", python_version]
    args += ["--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none"]
    for tag in _compatible_platforms(platform):
        args += ["--platform", tag]
    return args


def resolve_wheels(
    requirements: Iterable[str],
    platform: str,
    python_version: str,
    *,
    find_links: str | Path | None = None,
) -> list[Wheel]:
    """Resolve pinned requirements and their dependencies to exact wheels for the image's
    platform, and pin each by SHA-256. With FIND_LINKS, resolve offline from that wheelhouse.

    The wheels land in the package cache, so the build that follows needs no download.
    """
    requirements = list(requirements)
    if not requirements:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
        args += ["--dest", tmp, *_pip_platform_args(platform, python_version)]
        if find_links is not None:
            args += ["--no-index", "--find-links", str(find_links)]
        _run([*args, *requirements], what="resolving Python wheels")
        wheels = [wheel_from_file(path) for path in sorted(Path(tmp).glob("*.whl"))]
        for wheel in wheels:
            _store(Path(tmp, wheel.filename), wheel.sha256)
    return sorted(wheels, key=lambda w: w.name)


def _cached_path(sha256: str) -> Path:
    return cache_dir() / "packages" / "sha256" / sha256


def _store(path: Path, sha256: str) -> Path:
    target = _cached_path(sha256)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{sha256}.{os.getpid()}")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
    return target


def _checked(sha256: str) -> Path | None:
    """The cached file for SHA256 if present and intact; a corrupt entry is dropped."""
    path = _cached_path(sha256)
    if not path.exists():
        return None
    if sha256_file(path) != sha256:
        path.unlink()
        return None
    return path


def _download_from_pool(package: DebianPackage, directory: Path) -> Path | None:
    """Fetch a .deb by its pool file name from each archive apt is configured with."""
    proc = subprocess.run(
        ["apt-get", "indextargets", "--format", "$(REPO_URI)"],
        capture_output=True,
        text=True,
        check=False,
    )
    for base in sorted(set(proc.stdout.split())):
        url = base.rstrip("/") + "/" + package.filename
        try:
            response = requests.get(url, timeout=60)
        except requests.RequestException:
            continue
        if response.status_code == 200:
            path = directory / Path(package.filename).name
            path.write_bytes(response.content)
            return path
    return None


def fetch_debian(
    packages: list[DebianPackage], progress: Progress = NULL_PROGRESS
) -> dict[str, Path]:
    """Return ``{sha256: path}`` for every package, downloading the missing ones with
    ``apt-get download`` and refusing any file whose SHA-256 differs from the lock."""
    found = {p.sha256: _checked(p.sha256) for p in packages}
    missing = [p for p in packages if found[p.sha256] is None]
    if missing:
        progress.step(f"downloading {len(missing)} Debian packages")
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                ["apt-get", "download", "-q", *(f"{p.name}={p.version}" for p in missing)],
                cwd=tmp,
                capture_output=True,
                text=True,
                check=False,
            )
            by_hash = {sha256_file(path): path for path in Path(tmp).glob("*.deb")}
            for package in missing:
                path = by_hash.get(package.sha256)
                if path is None and proc.returncode != 0:
                    # apt only knows the versions in its current lists; a version superseded
                    # since the lock may still be in the archive's pool.
                    path = _download_from_pool(package, Path(tmp))
                if path is None or sha256_file(path) != package.sha256:
                    raise AnimusError(
                        f"{package.name} {package.version} could not be fetched with the"
                        " SHA-256 in the lock; re-lock the image if the archive dropped it",
                        code="package_hash_mismatch" if path else "package_unavailable",
                        details={"package": package.name, "expected": package.sha256},
                    )
                found[package.sha256] = _store(path, package.sha256)
    return {k: v for k, v in found.items() if v is not None}


def fetch_wheels(
    wheels: list[Wheel],
    platform: str,
    python_version: str,
    *,
    find_links: str | Path | None = None,
    progress: Progress = NULL_PROGRESS,
) -> dict[str, Path]:
    """Return ``{sha256: path}`` for every wheel, downloading missing ones with
    ``pip download --require-hashes`` (offline from FIND_LINKS when given)."""
    found = {w.sha256: _checked(w.sha256) for w in wheels}
    missing = [w for w in wheels if found[w.sha256] is None]
    if missing:
        progress.step(f"downloading {len(missing)} wheels")
        with tempfile.TemporaryDirectory() as tmp:
            requirements = Path(tmp, "requirements.txt")
            requirements.write_text(
                "".join(f"{w.name}=={w.version} --hash=sha256:{w.sha256}\n" for w in missing)
            )
            dest = Path(tmp, "dl")
            args = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
            args += ["--disable-pip-version-check", "--require-hashes", "--dest", str(dest)]
            args += _pip_platform_args(platform, python_version)
            if find_links is not None:
                args += ["--no-index", "--find-links", str(find_links)]
            _run([*args, "-r", str(requirements)], what="pip download")
            by_hash = {sha256_file(path): path for path in dest.glob("*.whl")}
            for wheel in missing:
                path = by_hash.get(wheel.sha256)
                if path is None:
                    raise AnimusError(
                        f"downloaded wheel {wheel.filename} does not match the SHA-256 in the lock",
                        code="package_hash_mismatch",
                        details={"package": wheel.name, "expected": wheel.sha256},
                    )
                found[wheel.sha256] = _store(path, wheel.sha256)
    return {k: v for k, v in found.items() if v is not None}


def as_dict(item: DebianPackage | Wheel) -> dict:
    """JSON-ready form of a pinned package."""
    return asdict(item)


def fill_wheelhouse(
    requirements: Iterable[str],
    dest: Path,
    platform: str = "manylinux_2_36_x86_64",
    python_version: str = "3.11",
) -> None:
    """Download REQUIREMENTS and their dependencies as wheels for the runner's platform into
    DEST (build host only: this is the step that needs the package index)."""
    dest.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
    args += ["--dest", str(dest), *_pip_platform_args(platform, python_version)]
    _run([*args, *requirements], what="filling the wheelhouse")
