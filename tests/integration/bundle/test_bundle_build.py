"""``animus bundle build`` makes a bundle that the shipped verifier accepts, end to end:
real gpg key, real wheels from the committed lock, real SBOM, the outer signature checked
by the host's plain ``gpg --verify``."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.bundle.cli import bundle_group

from .conftest import run_verify


def _build(tmp_path, release, *extra: str) -> dict:
    result = CliRunner().invoke(
        bundle_group,
        [
            "build",
            *("--version", "1.4.0", "--sign-key", release.fingerprint),
            *("--output", str(tmp_path / "out"), "--gnupghome", str(release.home), "--json"),
            *extra,
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _refused_build(release, version: str, output: Path):
    """``animus bundle build`` that must stop with an error of its own: an exception it lets
    through fails the test (catch_exceptions=False)."""
    result = CliRunner().invoke(
        bundle_group,
        [
            "build",
            *("--version", version, "--sign-key", release.fingerprint),
            *("--output", str(output), "--gnupghome", str(release.home)),
            *("--no-images", "--no-wheels"),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    return result


@pytest.mark.parametrize("version", ["1/2", "not a version", "1.2.0/../../x", ""])
def test_a_version_the_verifier_would_refuse_is_refused_before_anything_is_built(
    tmp_path, release, version
):
    result = _refused_build(release, version, tmp_path / "out")
    assert result.exit_code == 2
    assert f"Invalid value for '--version': not a release version: {version!r}" in result.output
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_cannot_be_made_is_an_error_not_a_traceback(tmp_path, release):
    (tmp_path / "file").write_text("not a folder")
    result = _refused_build(release, "1.4.0", tmp_path / "file" / "out")
    assert result.exit_code == 1
    assert f"Error: io_error: Not a directory: {tmp_path / 'file' / 'out'}" in result.output


@pytest.mark.slow
def test_build_then_verify_the_tar_with_plain_gpg_and_the_shipped_verifier(tmp_path, release):
    built = _build(tmp_path, release, "--no-images")
    tar = tmp_path / "out" / "animus-1.4.0.tar"
    assert built["tar"] == str(tar) and built["signer_fingerprint"] == release.fingerprint
    # The very first check needs nothing but the host's gpg.
    subprocess.run(
        ["gpg", "--batch", "--homedir", str(release.home), "--verify", built["signature"], tar],
        check=True,
        capture_output=True,
    )
    with tarfile.open(tar) as archive:
        names = archive.getnames()
    # The manifest comes first: a reader meets the list before anything it lists.
    assert names[1:3] == ["animus-1.4.0/MANIFEST.json", "animus-1.4.0/MANIFEST.json.asc"]
    target = tmp_path / "unpacked"
    proc = run_verify(tar, "--keyring", release.public_key, "--target", target, "--json")
    assert proc.returncode == 0, proc.stderr
    verified = json.loads(proc.stdout)
    assert verified["version"] == "1.4.0"
    assert verified["manifest_sha256"] == built["manifest_sha256"]
    assert verified["signer_fingerprint"] == release.fingerprint

    manifest = json.loads((target / "MANIFEST.json").read_text())
    paths = {entry["path"] for entry in manifest["files"]}
    assert {"verify.py", "install.sh", "README.md", "sbom.cdx.json", "docs/bundle.md"} <= paths
    wheels = {p for p in paths if p.startswith("offline-wheels/")}
    assert any("flask-3.1.3" in p for p in wheels)
    assert any(p.startswith("offline-wheels/animus_datalab-") for p in wheels)
    assert manifest["min_upgrade_from"] and manifest["expires"] > manifest["created"]
    sbom = json.loads((target / "sbom.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.6"
    purls = {c.get("purl") for c in sbom["components"]}
    assert "pkg:pypi/flask@3.1.3" in purls
    # The verifier in the bundle is the one in the repository, byte for byte.
    assert (target / "verify.py").read_bytes() == run_verify.__globals__["VERIFY"].read_bytes()


@pytest.mark.slow
def test_a_split_bundle_with_the_runner_image(tmp_path, release):
    built = _build(tmp_path, release, "--images", "runner", "--no-wheels", "--split-size", "8M")
    assert built["tar"] is None and len(built["parts"]) >= 2
    assert list(built["images"]) == ["runner"]
    parts_index = tmp_path / "out" / "animus-1.4.0.tar.parts.json"
    proc = run_verify(parts_index, "--target", tmp_path / "t", "--json", signer=release)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "t" / "MANIFEST.json").read_text())
    assert manifest["images"] == [
        {"name": "runner", "digest": built["images"]["runner"], "path": "images/runner"}
    ]
