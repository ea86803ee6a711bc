"""`install.sh --verify-only --bundle FILE`: the host's gpg checks the outer signature before
any code from the bundle runs, then the stdlib verifier checks everything inside."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.bundle.archive import write_tar
from tests.integration.bundle.conftest import (
    DEFAULT_FILES,
    ROOT,
    Signer,
    make_bundle,
    make_tar,
    run_verify,
    sign_file,
)


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


@pytest.fixture
def dated_signer() -> Iterator[Callable[..., Signer]]:
    """Makes keys in their own GnuPG homes, optionally as of a past date (gpg's
    --faked-system-time), for keys that are expired or revoked by now."""
    base = Path(tempfile.mkdtemp(prefix="animus-gpg-"))  # short: gpg-agent's socket path
    made: list[Path] = []

    def make(name: str, *, created: str | None = None, expires: str = "never") -> Signer:
        home = base / name
        home.mkdir(mode=0o700)
        made.append(home)
        gpg = ["gpg", "--batch", "--homedir", str(home)]
        if created:
            gpg += ["--faked-system-time", created]
        uid = f"{name} <{name}@example.test>"
        subprocess.run(
            [*gpg, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", expires],
            check=True,
            capture_output=True,
        )
        listing = subprocess.run(
            [*gpg, "--with-colons", "--list-secret-keys"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr"))
        return Signer(home, fpr, home / "public.asc")

    yield make
    for home in made:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False)
    shutil.rmtree(base, ignore_errors=True)


def _sign_as_of(path: Path, signer: Signer, when: str) -> None:
    sig = path.with_name(path.name + ".sig")
    sig.unlink(missing_ok=True)
    subprocess.run(
        ["gpg", "--batch", "--homedir", str(signer.home), "--faked-system-time", when,
         "--local-user", signer.fingerprint, "--output", str(sig), "--detach-sign", str(path)],
        check=True,
        capture_output=True,
    )  # fmt: skip


def _revoke(signer: Signer) -> None:
    """Import the revocation certificate gpg made with the key."""
    certificate = signer.home / "openpgp-revocs.d" / f"{signer.fingerprint}.rev"
    # gpg writes the certificate with a guard (":-----BEGIN") against importing it by mistake.
    armored = certificate.read_text().replace(":-----BEGIN", "-----BEGIN")
    subprocess.run(
        ["gpg", "--batch", "--homedir", str(signer.home), "--import"],
        input=armored,
        text=True,
        check=True,
        capture_output=True,
    )


def test_the_verifier_refuses_a_manifest_signed_by_a_revoked_key(tmp_path, dated_signer):
    revoked = dated_signer("revoked")
    root = make_bundle(tmp_path / "b", revoked)
    _revoke(revoked)
    result = run_verify(root, "--trust-fingerprint", revoked.fingerprint, signer=revoked)
    assert result.returncode == 13, result.stderr
    assert "the signing key is revoked" in result.stderr


def test_a_bundle_signed_by_a_revoked_key_is_refused_before_its_verifier_runs(
    tmp_path, release, dated_signer
):
    """gpg still reports VALIDSIG for a revoked key: only GOODSIG means good."""
    revoked = dated_signer("revoked")
    tar = make_tar(make_bundle(tmp_path / "b", revoked), tmp_path / "animus-1.2.0.tar", revoked)
    _revoke(revoked)
    result = install(
        "--verify-only", "--bundle", tar, "--trust-fingerprint", revoked.fingerprint, signer=revoked
    )
    assert result.returncode == 13, result.stderr
    assert "revoked key" in result.stderr
    assert "outer signature good" not in result.stderr
    prefix = tmp_path / "opt"
    result = install(
        "--bundle", tar, "--prefix", prefix, "--trust-fingerprint", revoked.fingerprint,
        signer=revoked,
    )  # fmt: skip
    assert result.returncode == 13 and "revoked key" in result.stderr
    assert not (prefix / "releases").exists() or not any((prefix / "releases").iterdir())


def test_a_bundle_signed_by_an_expired_key_is_refused(tmp_path, dated_signer):
    expired = dated_signer("expired", created="20200101T000000", expires="1y")
    bundle = make_bundle(tmp_path / "b", dated_signer("manifest"))
    tar = tmp_path / "animus-1.2.0.tar"
    write_tar(bundle, tar, "animus-1.2.0", mtime=0)
    _sign_as_of(tar, expired, "20200601T000000")  # a signature made while the key was valid
    result = install(
        "--verify-only", "--bundle", tar, "--trust-fingerprint", expired.fingerprint, signer=expired
    )
    assert result.returncode == 13, result.stderr
    assert "expired key" in result.stderr


def test_the_trusted_fingerprint_is_a_fingerprint_not_a_pattern(tmp_path, release):
    tar = make_tar(make_bundle(tmp_path / "b", release), tmp_path / "animus-1.2.0.tar", release)
    result = install("--verify-only", "--bundle", tar, "--trust-fingerprint", ".*", signer=release)
    assert result.returncode == 2 and "full key fingerprint" in result.stderr
    spaced = " ".join(release.fingerprint[i : i + 4] for i in range(0, 40, 4))
    result = install(
        "--verify-only", "--bundle", tar, "--trust-fingerprint", spaced, signer=release
    )
    assert result.returncode == 0, result.stderr


def test_verify_only_can_run_again_and_leaves_nothing_beside_the_bundle(tmp_path, release):
    (tmp_path / "out").mkdir()
    tar = make_tar(make_bundle(tmp_path / "b", release), tmp_path / "out" / "animus-1.2.0.tar",
                   release)  # fmt: skip
    for _ in range(2):
        result = install(
            "--verify-only", "--bundle", tar, "--trust-fingerprint", release.fingerprint,
            signer=release,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tar.parent.iterdir()) == [
        "animus-1.2.0.tar",
        "animus-1.2.0.tar.sig",
    ]


def test_verify_only_refuses_a_downgrade_against_the_prefix(tmp_path, release):
    tar = make_tar(make_bundle(tmp_path / "b", release), tmp_path / "animus-1.2.0.tar", release)
    prefix = tmp_path / "opt"
    prefix.mkdir()
    (prefix / "VERSION").write_text("2.0.0\n")
    args = ["--verify-only", "--bundle", tar, "--trust-fingerprint", release.fingerprint]
    result = install(*args, "--prefix", prefix, signer=release)
    assert result.returncode == 40, result.stderr
    result = install(*args, "--prefix", prefix, "--allow-downgrade", signer=release)
    assert result.returncode == 0, result.stderr


def test_verify_only_in_an_unpacked_bundle_checks_that_directory(tmp_path, release):
    files = {**DEFAULT_FILES, "install.sh": (ROOT / "install.sh").read_bytes()}
    bundle = make_bundle(tmp_path / "animus-1.2.0", release, files=files)
    command = ["bash", str(bundle / "install.sh"), "--verify-only", "--prefix", tmp_path / "opt",
               "--trust-fingerprint", release.fingerprint]  # fmt: skip
    env = {**os.environ, "GNUPGHOME": str(release.home)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert "verified: animus 1.2.0" in result.stdout
    (bundle / "docs" / "install.md").write_bytes(b"# Installing, changed\n")
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 23 and "docs/install.md" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port"], "--port needs a port number"),
        (["--port", "http"], "--port needs a port number (1-65535), not http"),
        (["--registry-port", "70000"], "--registry-port needs a port number (1-65535)"),
        (["--bundle", "--prefix", "/opt/x"], "--bundle needs the bundle file"),
        (["--prefix"], "--prefix needs a directory"),
    ],
)
def test_a_missing_or_bad_option_value_is_a_usage_error(args, message, release):
    result = install(*args, signer=release)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_a_bundle_swapped_after_the_outer_check_does_not_run_its_verifier(
    tmp_path, release, stranger
):
    """Someone who can write beside the bundle renames another file over it between the
    outer check and the moment install.sh takes the verifier out (a `tar` that does the
    rename first stands in for the race): the verifier still comes from the file that was
    checked, and that verifier refuses the swapped bundle's signature."""
    tar = make_tar(make_bundle(tmp_path / "b", release), tmp_path / "animus-1.2.0.tar", release)
    marker = tmp_path / "the-swapped-verifier-ran"
    evil_files = {
        **DEFAULT_FILES,
        "verify.py": f"open({str(marker)!r}, 'w').write('ran')\nprint('{{}}')\n".encode(),
    }
    (tmp_path / "evil").mkdir()
    evil = make_tar(
        make_bundle(tmp_path / "e", stranger, files=evil_files),
        tmp_path / "evil" / "animus-1.2.0.tar",
        stranger,
    )
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "tar").write_text(
        "#!/bin/sh\n"
        f'[ -e "{tmp_path}/swapped" ] || {{ touch "{tmp_path}/swapped"; mv "{evil}" "{tar}"; }}\n'
        f'exec {shutil.which("tar")} "$@"\n'
    )
    (tools / "tar").chmod(0o755)
    prefix = tmp_path / "opt"
    env = {
        **os.environ,
        "GNUPGHOME": str(release.home),
        "PATH": f"{tools}:{os.environ['PATH']}",
    }
    result = subprocess.run(
        ["bash", str(ROOT / "install.sh"), "--bundle", str(tar), "--prefix", str(prefix),
         "--trust-fingerprint", release.fingerprint],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert (tmp_path / "swapped").exists(), "the stand-in tar was not used"
    assert not marker.exists(), "the swapped bundle's verifier ran"
    assert result.returncode == 11, result.stderr
    assert "BAD signature" in result.stderr
    assert not (prefix / "releases").exists() or not any((prefix / "releases").iterdir())
