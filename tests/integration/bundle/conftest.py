"""Throwaway GPG keys (real gpg, never mocked) and a factory for small crafted bundles."""

from __future__ import annotations

import datetime as dt
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.bundle.archive import write_tar
from appliance.bundle.manifest import (
    MANIFEST_NAME,
    MANIFEST_SIGNATURE_NAME,
    hash_tree,
    render_manifest,
)
from appliance.bundle.signing import sign_detached

ROOT = Path(__file__).resolve().parents[3]
VERIFY = ROOT / "bundle" / "verify.py"


@dataclass(frozen=True)
class Signer:
    """A generated ed25519 signing key in its own GnuPG home."""

    home: Path
    fingerprint: str
    public_key: Path


def generate_signer(home: Path, uid: str) -> Signer:
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--batch", "--homedir", str(home)]
    subprocess.run(
        [*gpg, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never"],
        check=True,
        capture_output=True,
    )
    listing = subprocess.run(
        [*gpg, "--with-colons", "--list-secret-keys"], check=True, capture_output=True, text=True
    ).stdout
    fingerprint = next(
        line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr")
    )
    public_key = home / "public.asc"
    with open(public_key, "wb") as out:
        subprocess.run([*gpg, "--armor", "--export", fingerprint], check=True, stdout=out)
    return Signer(home, fingerprint, public_key)


@pytest.fixture(scope="session")
def signers() -> Iterator[tuple[Signer, Signer]]:
    """The release key and a stranger's key, each in its own GnuPG home (short paths:
    gpg-agent's socket path has a length limit)."""
    base = Path(tempfile.mkdtemp(prefix="animus-gpg-"))
    try:
        yield (
            generate_signer(base / "release", "Animus Release Test <release@example.test>"),
            generate_signer(base / "stranger", "Someone Else <else@example.test>"),
        )
    finally:
        for home in ("release", "stranger"):
            subprocess.run(["gpgconf", "--homedir", str(base / home), "--kill", "all"], check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def release(signers) -> Signer:
    """The key bundles are signed with, trusted ultimately in its own home."""
    return signers[0]


@pytest.fixture
def stranger(signers) -> Signer:
    """Another valid key that is not the trust anchor."""
    return signers[1]


DEFAULT_FILES = {
    "install.sh": b"#!/bin/sh\necho install\n",
    "verify.py": VERIFY.read_bytes(),
    "docs/install.md": b"# Installing\n",
    "offline-wheels/example-1.0-py3-none-any.whl": bytes(range(256)) * 40,
}


def make_bundle(
    root: Path,
    signer: Signer,
    *,
    version: str = "1.2.0",
    files: dict[str, bytes] | None = None,
    expires: dt.datetime | None = None,
    min_upgrade_from: str | None = None,
) -> Path:
    """Write FILES under ROOT with a signed manifest, as ``animus bundle build`` would."""
    root.mkdir(parents=True)
    for name, data in (DEFAULT_FILES if files is None else files).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    now = dt.datetime.now(dt.UTC)
    manifest = render_manifest(
        version=version,
        created=now,
        expires=expires or now + dt.timedelta(days=30),
        min_upgrade_from=min_upgrade_from,
        files=hash_tree(root),
        images=[],
        sbom=None,
    )
    sign_manifest(root, manifest, signer)
    return root


def sign_manifest(root: Path, manifest: bytes, signer: Signer) -> None:
    """Write MANIFEST bytes into ROOT and sign them (also used to sign crafted manifests)."""
    (root / MANIFEST_NAME).write_bytes(manifest)
    (root / MANIFEST_SIGNATURE_NAME).unlink(missing_ok=True)
    sign_detached(
        root / MANIFEST_NAME,
        root / MANIFEST_SIGNATURE_NAME,
        signer.fingerprint,
        armor=True,
        gnupghome=signer.home,
    )


def make_tar(root: Path, tar_path: Path, signer: Signer, top: str = "animus-1.2.0") -> Path:
    """Pack ROOT as a bundle tar and sign the whole file."""
    write_tar(root, tar_path, top, mtime=0)
    sign_file(tar_path, signer)
    return tar_path


def sign_file(path: Path, signer: Signer) -> None:
    """Write PATH.sig, a binary detached signature by SIGNER."""
    sig = path.with_name(path.name + ".sig")
    sig.unlink(missing_ok=True)
    sign_detached(path, sig, signer.fingerprint, armor=False, gnupghome=signer.home)


def add_members(tar_path: Path, signer: Signer, *members: tuple[tarfile.TarInfo, bytes]) -> None:
    """Append crafted MEMBERS to a bundle tar and re-sign it, as an attacker with the
    signing key (or a careless build) could: the verifier must still refuse."""
    # Appending rewrites the end-of-archive blocks; tarfile's "a" mode does exactly that.
    with tarfile.open(tar_path, "a", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data else None)
    sign_file(tar_path, signer)


def run_verify(*args: str | Path, signer: Signer | None = None, env: dict | None = None):
    """Run ``python3 verify.py ARGS`` as a sysadmin would; GNUPGHOME is SIGNER's home."""
    environment = {**os.environ, **(env or {})}
    if signer is not None:
        environment["GNUPGHOME"] = str(signer.home)
    return subprocess.run(
        # The bundle first, as install.sh names it: its files start hashing before the
        # rest of the command line is read.
        [sys.executable, "-I", "-S", str(VERIFY), *map(str, args), "--quiet"],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )
