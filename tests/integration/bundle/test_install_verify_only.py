"""`install.sh --verify-only --bundle FILE`: the host's gpg checks the outer signature before
any code from the bundle runs, then the stdlib verifier checks everything inside."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.integration.bundle.conftest import ROOT, make_bundle, make_tar, sign_file


def install(*args, signer) -> subprocess.CompletedProcess:
    env = {**os.environ, "GNUPGHOME": str(signer.home)}
    return subprocess.run(
        ["bash", str(ROOT / "install.sh"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_a_good_bundle_verifies(tmp_path, release):
    tar = make_tar(make_bundle(tmp_path / "b", release), tmp_path / "animus-1.2.0.tar", release)
    result = install(
        "--verify-only", "--bundle", tar, "--trust-fingerprint", release.fingerprint, signer=release
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "outer signature good" in result.stderr and "1.2.0" in result.stdout + result.stderr


def test_a_missing_outer_signature_is_refused_before_anything_runs(tmp_path, release):
    tar = make_tar(make_bundle(tmp_path / "b", release), tmp_path / "animus-1.2.0.tar", release)
    (tmp_path / "animus-1.2.0.tar.sig").unlink()
    result = install("--verify-only", "--bundle", tar, signer=release)
    assert result.returncode == 10 and "signature missing" in result.stderr


def test_a_changed_byte_breaks_the_outer_signature(tmp_path, release):
    tar = make_tar(make_bundle(tmp_path / "b", release), tmp_path / "animus-1.2.0.tar", release)
    data = bytearray(tar.read_bytes())
    data[700] ^= 0x01
    tar.write_bytes(bytes(data))
    result = install(
        "--verify-only", "--bundle", tar, "--trust-fingerprint", release.fingerprint, signer=release
    )
    assert result.returncode == 11 and "BAD signature" in result.stderr


def test_a_bundle_signed_by_another_key_is_untrusted(tmp_path, release, stranger):
    tar = make_tar(make_bundle(tmp_path / "b", release), tmp_path / "animus-1.2.0.tar", release)
    sign_file(tar, stranger)
    # The stranger's public key is known to the keyring used here, but it is not the anchor.
    result = install(
        "--verify-only",
        "--bundle",
        tar,
        "--trust-fingerprint",
        release.fingerprint,
        signer=stranger,
    )
    assert result.returncode == 13 and "untrusted" in result.stderr


def test_a_bundle_with_a_changed_byte_installs_nothing(tmp_path, release):
    tar = make_tar(make_bundle(tmp_path / "b", release), tmp_path / "animus-1.2.0.tar", release)
    data = bytearray(tar.read_bytes())
    data[700] ^= 0x01
    tar.write_bytes(bytes(data))
    prefix = tmp_path / "opt"
    result = install(
        "--bundle",
        tar,
        "--prefix",
        prefix,
        "--trust-fingerprint",
        release.fingerprint,
        signer=release,
    )
    assert result.returncode == 11 and "BAD signature" in result.stderr
    assert not (prefix / "releases").exists() or not any((prefix / "releases").iterdir())


def test_a_refusal_inside_the_bundle_leaves_no_release_and_no_staging(tmp_path, release):
    bundle = make_bundle(tmp_path / "b", release)
    (bundle / "offline-wheels" / "planted-1.0-py3-none-any.whl").write_bytes(b"not listed")
    tar = make_tar(bundle, tmp_path / "animus-1.2.0.tar", release)
    prefix = tmp_path / "opt"
    result = install(
        "--bundle",
        tar,
        "--prefix",
        prefix,
        "--trust-fingerprint",
        release.fingerprint,
        signer=release,
    )
    assert result.returncode == 22, result.stderr
    assert "planted-1.0-py3-none-any.whl" in result.stderr
    assert "nothing was installed" in result.stderr
    assert list((prefix / "releases").iterdir()) == []
    assert not (prefix / "current").exists() and not (prefix / "VERSION").exists()


def test_kubernetes_mode_needs_a_kubeconfig(tmp_path, release):
    result = install("--bundle", tmp_path / "animus-1.2.0.tar", "--kubernetes", signer=release)
    assert result.returncode == 2 and "--kubeconfig" in result.stderr


def test_install_without_a_bundle_outside_an_unpacked_bundle_says_what_to_give(release):
    result = install("--prefix", "/nonexistent/animus", signer=release)
    assert result.returncode == 2 and "--bundle animus-V.tar" in result.stderr


def test_a_missing_host_prerequisite_is_named_before_anything_is_unpacked(tmp_path, release):
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "python3").symlink_to(Path(sys.executable).resolve())
    for name in ("bash", "dirname", "id", "gpg", "tar", "git", "docker-registry"):
        found = shutil.which(name)
        assert found, name
        (tools / name).symlink_to(found)
    tar = make_tar(make_bundle(tmp_path / "b", release), tmp_path / "animus-1.2.0.tar", release)
    result = subprocess.run(
        ["bash", str(ROOT / "install.sh"), "--bundle", str(tar), "--prefix", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env={"PATH": str(tools), "GNUPGHOME": str(release.home)},
        timeout=60,
        check=False,
    )
    assert result.returncode == 3, result.stderr
    assert "missing on this host: runc" in result.stderr
    assert not (tmp_path / "o").exists()
