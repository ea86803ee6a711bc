"""The auditor's signed export of the whole chain, checked by the standalone verifier."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tarfile

import pytest

from appliance.audit import chain_export
from appliance.audit import log as audit_log
from appliance.domain.records import AuditEvent
from tests.integration.ui.conftest import Browser, make_person, text


@pytest.fixture
def exported(app, bound_db, signed_in, tmp_path):
    """alice made a project; audrey, the auditor, downloads an export and the verifier."""
    signed_in.get("/ui/projects")
    signed_in.post("/ui/projects", {"name": "p"})
    make_person("audrey", "auditor")
    audrey = Browser(app)
    audrey.sign_in("audrey")
    audrey.get("/ui/audit/export")
    assert audrey.post("/ui/audit/signing-key").status_code == 302
    page = text(audrey.get("/ui/audit/export"))
    fingerprint = re.search(r"--trust-fingerprint ([0-9A-F]{40,64})", page).group(1)
    response = audrey.post("/ui/audit/export")
    assert response.status_code == 200 and response.mimetype == "application/x-tar"
    assert "attachment" in response.headers["Content-Disposition"]
    package = tmp_path / "export.tar"
    package.write_bytes(response.data)
    verifier = tmp_path / "verify_audit_export.py"
    verifier.write_bytes(audrey.get("/ui/audit/verifier").data)
    return package, verifier, fingerprint


def verify(verifier, package, fingerprint) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(verifier), str(package), "--trust-fingerprint", fingerprint],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def rewrite(package, change) -> None:
    with tarfile.open(package) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive}
    members = change(members)
    with tarfile.open(package, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_the_export_verifies_and_holds_the_event_recording_it(exported, bound_db):
    package, verifier, fingerprint = exported
    result = verify(verifier, package, fingerprint)
    assert result.returncode == 0, result.stdout + result.stderr
    head = AuditEvent.select().order_by(AuditEvent.seq.desc()).first()
    assert head.action == "audit:chain:exported" and head.actor == "user:audrey"
    assert result.stdout.startswith(f"VERIFIED: {head.seq} events")
    with tarfile.open(package) as archive:
        lines = archive.extractfile("events.ndjson").read().decode().splitlines()
    assert lines[-1] == head.canonical


def test_a_changed_event_fails_verification(exported):
    package, verifier, fingerprint = exported

    def tamper(members):
        lines = members[chain_export.EVENTS].decode().splitlines(keepends=True)
        lines[1] = lines[1].replace('"actor":"', '"actor":"x', 1)
        members[chain_export.EVENTS] = "".join(lines).encode()
        return members

    rewrite(package, tamper)
    result = verify(verifier, package, fingerprint)
    assert result.returncode == 1
    assert result.stdout.startswith("FAILED: events.ndjson does not match the manifest")


def test_a_dropped_event_is_found_even_with_a_forged_manifest_hash(exported):
    """Without the signing key the manifest cannot be fixed up: its signature fails."""
    package, verifier, fingerprint = exported

    def drop(members):
        lines = members[chain_export.EVENTS].decode().splitlines(keepends=True)
        members[chain_export.EVENTS] = "".join(lines[:2] + lines[3:]).encode()
        import hashlib
        import json

        manifest = json.loads(members[chain_export.MANIFEST])
        manifest["files"][chain_export.EVENTS] = {
            "sha256": hashlib.sha256(members[chain_export.EVENTS]).hexdigest(),
            "size": len(members[chain_export.EVENTS]),
        }
        members[chain_export.MANIFEST] = json.dumps(manifest).encode()
        return members

    rewrite(package, drop)
    result = verify(verifier, package, fingerprint)
    assert result.returncode == 1
    assert result.stdout.startswith("FAILED: MANIFEST.json has no good signature")


def test_another_key_is_not_trusted(exported):
    package, verifier, _ = exported
    result = verify(verifier, package, "0" * 40)
    assert result.returncode == 1
    assert "not by the trusted key" in result.stdout


def test_only_auditors_may_export(signed_in):
    assert signed_in.get("/ui/audit/export").status_code == 403
    refused = signed_in.post("/ui/audit/export")
    assert refused.status_code == 403
    assert AuditEvent.select().where(AuditEvent.action == "audit:chain:exported").count() == 0


def test_a_resigned_export_with_a_changed_event_fails_at_the_next_seq(exported, config):
    """Even with the signing key, a changed event breaks the chain right after it."""
    import hashlib
    import json

    from appliance.audit import signing

    package, verifier, fingerprint = exported

    def tamper_and_resign(members):
        lines = members[chain_export.EVENTS].decode().splitlines(keepends=True)
        event = json.loads(lines[1])
        event["payload"]["forged"] = True
        lines[1] = json.dumps(event, sort_keys=True, separators=(",", ":")) + "\n"
        members[chain_export.EVENTS] = "".join(lines).encode()
        manifest = json.loads(members[chain_export.MANIFEST])
        manifest["files"][chain_export.EVENTS] = {
            "sha256": hashlib.sha256(members[chain_export.EVENTS]).hexdigest(),
            "size": len(members[chain_export.EVENTS]),
        }
        members[chain_export.MANIFEST] = json.dumps(manifest).encode()
        members[chain_export.SIGNATURE] = signing.detach_sign(
            config.gnupg_home, fingerprint, members[chain_export.MANIFEST]
        )
        return members

    rewrite(package, tamper_and_resign)
    result = verify(verifier, package, fingerprint)
    assert result.returncode == 1
    assert result.stdout.strip() == "FAILED: seq 3 does not link to the previous event"


@pytest.fixture
def audrey(app, bound_db):
    make_person("audrey", "auditor")
    browser = Browser(app)
    browser.sign_in("audrey")
    return browser


def exports() -> int:
    return AuditEvent.select().where(AuditEvent.action == "audit:chain:exported").count()


def test_viewing_the_export_page_never_creates_the_signing_key(audrey, config):
    from appliance.audit import signing

    page = audrey.get("/ui/audit/export")
    assert page.status_code == 200
    assert "Create the signing key" in text(page)
    assert "Download a signed export" not in text(page)
    assert signing.existing_signing_key(config.gnupg_home, "", audit_log.installation_id()) is None
    generated = AuditEvent.select().where(AuditEvent.action == "signing:key:generated")
    assert generated.count() == 0
    # Exporting before the key exists says how to create it, and records nothing.
    refused = audrey.post("/ui/audit/export")
    assert refused.status_code == 503
    assert "no signing key yet" in text(refused) and "Create the signing key" in text(refused)
    assert exports() == 0
    # Creating it is an explicit, audited POST.
    assert audrey.post("/ui/audit/signing-key").status_code == 302
    made = AuditEvent.get(AuditEvent.action == "signing:key:generated")
    assert made.actor == "user:audrey"
    assert "Download a signed export" in text(audrey.get("/ui/audit/export"))


def test_an_export_that_cannot_be_signed_leaves_no_export_event(audrey, monkeypatch):
    from appliance.audit import signing

    audrey.get("/ui/audit/export")
    assert audrey.post("/ui/audit/signing-key").status_code == 302
    head = AuditEvent.select().order_by(AuditEvent.seq.desc()).first().seq

    def gpg_fails(*_args, **_kwargs):
        raise signing.SigningUnavailable("gpg failed (--detach-sign, exit 2); see the server log")

    monkeypatch.setattr(signing, "detach_sign", gpg_fails)
    audrey.get("/ui/audit/export")
    refused = audrey.post("/ui/audit/export")
    assert refused.status_code == 503
    assert exports() == 0, "no export event without an export"
    assert AuditEvent.select().order_by(AuditEvent.seq.desc()).first().seq == head
    assert audit_log.verify().ok
