"""Models and versions from a run's artifact: approval by project admins, signed export.

The test acts as a Data Plane agent to produce a succeeded run with metrics and an artifact
(as in test_runs.py). Export packages are signed with a real GPG key and checked with the
stdlib-only verifier, copied alone to another directory, and with ``gpg --verify``.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import peewee
import pytest

from appliance.audit import signing
from appliance.auth import identities
from appliance.domain.context import SYSTEM, Context
from appliance.domain.records import AuditEvent, ModelVersion
from appliance.execution import scheduler

COMMIT = "2" * 40
WEIGHTS = b"model-weights-" + bytes(range(256)) * 4
VERIFIER = Path(__file__).resolve().parents[3] / "appliance" / "audit" / "verify_export.py"
DP = "/api/v1/dataplane"


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def _stop_gpg_agent(config):
    yield
    signing.stop_agent(config.gnupg_home)


def upload_version(api, pid: str, dataset_id: str, files: dict[str, bytes], parent=None) -> dict:
    response = api.post(
        f"/api/v1/projects/{pid}/datasets/{dataset_id}/versions",
        data=tar_of(files),
        params={"parent_id": parent} if parent else None,
        headers={"Content-Type": "application/x-tar"},
    )
    assert response.status_code == 201, response.text
    return response.json()


def finish_run(plane, rid: str, *, metrics=(), artifact: bytes = WEIGHTS) -> None:
    """Act as the Data Plane: run ``rid`` to success with ``metrics`` and ``model.bin``."""
    assert plane.post(f"{DP}/leases", json={"capacity": 8}).status_code == 200
    plane.post(f"{DP}/runs/{rid}/state", json={"state": "running"})
    records = [
        {"seq": seq, "name": name, "value": value, "step": seq}
        for seq, (name, value) in enumerate(metrics)
    ]
    plane.post(f"{DP}/runs/{rid}/metrics", json={"records": records})
    stored = plane.put(
        f"{DP}/runs/{rid}/artifacts/model.bin",
        data=artifact,
        headers={"X-Content-SHA256": hashlib.sha256(artifact).hexdigest()},
    )
    assert stored.status_code == 200, stored.text
    done = plane.post(f"{DP}/runs/{rid}/state", json={"state": "succeeded", "exit_code": 0})
    assert done.json() == {"state": "succeeded"}


@pytest.fixture
def trained(server, alice, project, config, bound_db):
    """A succeeded run (input: a dataset version with a parent) that produced ``model.bin``."""
    pid, api = project["id"], alice.api
    dataset = api.post(f"/api/v1/projects/{pid}/datasets", json={"name": "loans"}).json()
    raw = upload_version(api, pid, dataset["id"], {"loans.csv": b"a,b\n1,2\n"})
    clean = upload_version(api, pid, dataset["id"], {"loans.csv": b"a,b\n1,2\n3,4\n"}, raw["id"])
    code = api.post(
        f"/api/v1/projects/{pid}/code-refs",
        json={"repo_url": "file:///srv/git/credit.git", "commit_sha": COMMIT},
    ).json()
    env = api.post(
        f"/api/v1/projects/{pid}/environments",
        json={"name": "train", "base_image": "runner", "packages": []},
    ).json()
    lock = api.post(
        f"/api/v1/projects/{pid}/environment-locks",
        json={"environment_id": env["id"], "image_digest": "sha256:" + "b" * 64, "packages": []},
    ).json()
    _, credential = identities.register_data_plane(Context(SYSTEM, "test"), "dp-models", "runc")
    plane = server.client(credential)
    spec = {
        "code_ref_id": code["id"],
        "environment_lock_id": lock["id"],
        "inputs": [{"name": "train", "dataset_version_id": clean["id"]}],
        "command": ["python3", "train.py"],
        "parameters": {"depth": 4},
    }
    run = api.post(f"/api/v1/projects/{pid}/runs", json=spec).json()
    scheduler.tick(config)
    finish_run(plane, run["id"], metrics=[("loss", 0.5), ("auc", 0.7), ("loss", 0.2)])
    model = api.post(f"/api/v1/projects/{pid}/models", json={"name": "credit-risk"})
    assert model.status_code == 201, model.text
    return {
        "pid": pid,
        "api": api,
        "plane": plane,
        "config": config,
        "spec": spec,
        "run": run,
        "raw": raw,
        "clean": clean,
        "code": code,
        "lock": lock,
        "model": model.json(),
    }


def register(trained, **overrides) -> dict:
    pid, model = trained["pid"], trained["model"]
    body = {"run_id": trained["run"]["id"], "artifact_path": "model.bin", **overrides}
    response = trained["api"].post(
        f"/api/v1/projects/{pid}/models/{model['id']}/versions", json=body
    )
    assert response.status_code == 201, response.text
    return response.json()


def test_a_version_records_its_source_artifact_and_final_metrics(trained):
    api, pid, model = trained["api"], trained["pid"], trained["model"]
    version = register(trained)
    assert version["stage"] == "registered" and version["number"] == 1
    assert version["source_run_id"] == trained["run"]["id"]
    assert version["artifact_path"] == "model.bin"
    assert version["artifact_sha256"] == hashlib.sha256(WEIGHTS).hexdigest()
    assert version["metrics"] == {"loss": 0.2, "auc": 0.7}  # the last value of each
    assert register(trained)["number"] == 2
    listed = api.get(f"/api/v1/projects/{pid}/models/{model['id']}/versions").json()["items"]
    assert [v["number"] for v in listed] == [1, 2]
    got = api.get(f"/api/v1/projects/{pid}/model-versions/{version['id']}").json()
    assert got == version
    assert api.get(f"/api/v1/projects/{pid}/models").json()["items"] == [model]
    event = AuditEvent.get(AuditEvent.object_id == version["id"])
    assert event.action == "model:version:registered"
    assert event.payload["artifact_sha256"] == version["artifact_sha256"]
    assert event.payload["metrics"] == {"loss": 0.2, "auc": 0.7}
    duplicate = api.post(f"/api/v1/projects/{pid}/models", json={"name": "credit-risk"})
    assert (duplicate.status_code, duplicate.json()["error"]) == (409, "already_exists")


def test_only_a_succeeded_run_of_the_project_can_be_registered(trained):
    api, pid, model = trained["api"], trained["pid"], trained["model"]
    url = f"/api/v1/projects/{pid}/models/{model['id']}/versions"
    queued = api.post(f"/api/v1/projects/{pid}/runs", json=trained["spec"]).json()
    refused = api.post(url, json={"run_id": queued["id"], "artifact_path": "model.bin"})
    assert (refused.status_code, refused.json()["error"]) == (409, "invalid_state")
    missing = api.post(url, json={"run_id": trained["run"]["id"], "artifact_path": "nope.bin"})
    assert (missing.status_code, missing.json()["error"]) == (422, "validation_failed")
    other = api.post("/api/v1/projects", json={"name": "elsewhere"}).json()
    foreign_model = api.post(f"/api/v1/projects/{other['id']}/models", json={"name": "m"}).json()
    foreign = api.post(
        f"/api/v1/projects/{other['id']}/models/{foreign_model['id']}/versions",
        json={"run_id": trained["run"]["id"], "artifact_path": "model.bin"},
    )
    assert (foreign.status_code, foreign.json()["error"]) == (422, "cross_project_reference")
    assert ModelVersion.select().count() == 0


def test_an_editor_cannot_approve_and_the_refusal_is_audited(trained, make_user):
    api, pid = trained["api"], trained["pid"]
    version = register(trained)
    bob = make_user("bob")
    api.put(f"/api/v1/projects/{pid}/members/bob", json={"role": "editor"})
    url = f"/api/v1/projects/{pid}/model-versions/{version['id']}/approve"
    refused = bob.api.post(url, json={"reason": "looks good to me"})
    assert (refused.status_code, refused.json()["error"]) == (403, "forbidden")
    denial = AuditEvent.get(
        (AuditEvent.action == "authz:request:denied") & (AuditEvent.actor == "user:bob")
    )
    assert denial.object_id == f"POST {url}"
    assert denial.project_id == pid and denial.payload["status"] == 403
    assert ModelVersion.get_by_id(version["id"]).stage == "registered"
    rejected = bob.api.post(url.replace("/approve", "/reject"), json={"reason": "no"})
    assert rejected.status_code == 403


def test_an_admin_approves_with_a_reason_that_is_audited(trained):
    api, pid = trained["api"], trained["pid"]
    version = register(trained)
    url = f"/api/v1/projects/{pid}/model-versions/{version['id']}"
    for reason in ("", "   "):
        blank = api.post(f"{url}/approve", json={"reason": reason})
        assert blank.status_code in (400, 422), blank.text
    approved = api.post(f"{url}/approve", json={"reason": "AUC 0.7 on the holdout; reviewed"})
    assert approved.status_code == 200, approved.text
    body = approved.json()
    assert (body["stage"], body["decided_by"]) == ("approved", "user:alice")
    assert body["decision_reason"] == "AUC 0.7 on the holdout; reviewed"
    event = AuditEvent.get(AuditEvent.action == "model:version:approved")
    assert (event.object_id, event.actor) == (version["id"], "user:alice")
    assert event.payload == {
        "from": "registered",
        "to": "approved",
        "reason": "AUC 0.7 on the holdout; reviewed",
    }
    again = api.post(f"{url}/reject", json={"reason": "changed my mind"})
    assert (again.status_code, again.json()["error"]) == (409, "invalid_state")
    other = register(trained)
    rejected = api.post(
        f"/api/v1/projects/{pid}/model-versions/{other['id']}/reject", json={"reason": "leaky"}
    )
    assert rejected.json()["stage"] == "rejected"
    assert (
        AuditEvent.get(AuditEvent.action == "model:version:rejected").payload["reason"] == "leaky"
    )


def test_export_follows_the_stage_and_the_project_policy(trained):
    api, pid = trained["api"], trained["pid"]
    version = register(trained)
    url = f"/api/v1/projects/{pid}/model-versions/{version['id']}/export"
    early = api.post(url)
    assert (early.status_code, early.json()["error"]) == (409, "approval_required")
    assert api.get(url).status_code == 404
    policy = api.get(f"/api/v1/projects/{pid}/policy").json()
    assert policy["export_requires_approval"] is True
    policy["export_requires_approval"] = False
    assert api.put(f"/api/v1/projects/{pid}/policy", json=policy).status_code == 200
    exported = api.post(url)
    assert exported.status_code == 201, exported.text
    assert api.get(url.removesuffix("/export")).json()["stage"] == "exported"
    rejected = register(trained)
    api.post(
        f"/api/v1/projects/{pid}/model-versions/{rejected['id']}/reject", json={"reason": "no"}
    )
    refused = api.post(f"/api/v1/projects/{pid}/model-versions/{rejected['id']}/export")
    assert (refused.status_code, refused.json()["error"]) == (409, "invalid_state")


def export_approved(trained) -> tuple[dict, dict, bytes]:
    """Register, approve and export a version; return (version, export, package bytes)."""
    api, pid = trained["api"], trained["pid"]
    version = register(trained)
    url = f"/api/v1/projects/{pid}/model-versions/{version['id']}"
    assert api.post(f"{url}/approve", json={"reason": "ship it"}).status_code == 200
    exported = api.post(f"{url}/export")
    assert exported.status_code == 201, exported.text
    download = api.get(f"{url}/export")
    assert download.status_code == 200
    assert download.headers["Content-Type"] == "application/x-tar"
    assert hashlib.sha256(download.content).hexdigest() == exported.json()["sha256"]
    return version, exported.json(), download.content


def run_verifier(tmp_path: Path, package: bytes, fingerprint: str) -> subprocess.CompletedProcess:
    """Run the verifier copied alone into an empty directory, with the system's python3."""
    alone = tmp_path / "auditor"
    alone.mkdir(exist_ok=True)
    shutil.copy(VERIFIER, alone / "verify_export.py")
    (alone / "package.tar").write_bytes(package)
    python = shutil.which("python3") or sys.executable
    return subprocess.run(
        [python, "-I", "verify_export.py", "package.tar", "--trust-fingerprint", fingerprint],
        cwd=alone,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_an_exported_package_verifies_offline(trained, tmp_path):
    api = trained["api"]
    version, export, package = export_approved(trained)
    key = api.get("/api/v1/signing-key").json()
    assert key["fingerprint"] == export["signing_fingerprint"]
    assert key["public_key"].startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")

    result = run_verifier(tmp_path, package, key["fingerprint"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"OK model version {version['id']}")

    with tarfile.open(fileobj=io.BytesIO(package)) as archive:
        names = archive.getnames()
        files = {name: archive.extractfile(name).read() for name in names}
    assert names == sorted(names)
    assert set(names) == {
        "MANIFEST.json",
        "MANIFEST.json.asc",
        "artifact/model.bin",
        "audit/events.ndjson",
        "audit/hashes.json",
        "execution_snapshot.json",
        "lineage.json",
        "model_version.json",
        "signing-key.asc",
    }
    assert files["artifact/model.bin"] == WEIGHTS
    snapshot_digest = api.get(
        f"/api/v1/projects/{trained['pid']}/runs/{trained['run']['id']}"
    ).json()["snapshot_digest"]
    assert "sha256:" + hashlib.sha256(files["execution_snapshot.json"]).hexdigest() == (
        snapshot_digest
    )
    # The audit slice is the stored canonical text, exactly as hashed.
    lines = files["audit/events.ndjson"].decode().splitlines()
    stored = {e.seq: e for e in AuditEvent.select()}
    seqs = [json.loads(line)["seq"] for line in lines]
    assert [stored[s].canonical for s in seqs] == lines
    about = {json.loads(line)["object_id"] for line in lines}
    expected = {
        trained["model"]["id"],
        version["id"],
        trained["run"]["id"],
        version["artifact_id"],
        trained["clean"]["id"],
        trained["code"]["id"],
        trained["lock"]["id"],
    }
    assert expected <= about
    actions = {json.loads(line)["action"] for line in lines}
    assert {"model:version:approved", "run:state:changed", "dataset:version:created"} <= actions
    lineage = json.loads(files["lineage.json"])
    assert {"from": version["artifact_id"], "to": version["id"], "kind": "registered_as"} in (
        lineage["edges"]
    )
    exported = AuditEvent.get(AuditEvent.action == "model:version:exported")
    assert exported.payload["sha256"] == export["sha256"]
    assert exported.payload["signing_fingerprint"] == key["fingerprint"]

    # The signature checks with plain gpg too, against the key published by the API.
    home = tmp_path / "gnupg-auditor"
    home.mkdir(mode=0o700)
    (home / "key.asc").write_text(key["public_key"])
    (home / "MANIFEST.json").write_bytes(files["MANIFEST.json"])
    (home / "MANIFEST.json.asc").write_bytes(files["MANIFEST.json.asc"])
    gpg = ["gpg", "--batch", "--homedir", str(home)]
    subprocess.run([*gpg, "--import", str(home / "key.asc")], check=True, capture_output=True)
    verified = subprocess.run(
        [
            *gpg,
            "--status-fd",
            "1",
            "--verify",
            str(home / "MANIFEST.json.asc"),
            str(home / "MANIFEST.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stderr
    assert f"VALIDSIG {key['fingerprint']}" in verified.stdout
    manifest = json.loads(files["MANIFEST.json"])
    assert manifest["files"]["artifact/model.bin"]["sha256"] == hashlib.sha256(WEIGHTS).hexdigest()
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False)


def test_a_flipped_byte_fails_verification(trained, tmp_path):
    _, export, package = export_approved(trained)
    fingerprint = export["signing_fingerprint"]

    def flipped(at: int) -> bytes:
        changed = bytearray(package)
        changed[at] ^= 0x01
        return bytes(changed)

    in_artifact = package.index(WEIGHTS) + 100
    in_manifest = package.index(b'"format"') + 3
    in_audit = package.index(b'"action":"model:version:approved"') + 12
    for at, why in (
        (in_artifact, "artifact/model.bin: sha256 or size differs"),
        (in_manifest, "does not carry a good signature"),
        (in_audit, "audit/events.ndjson: sha256 or size differs"),
    ):
        result = run_verifier(tmp_path, flipped(at), fingerprint)
        assert result.returncode == 1, result.stdout + result.stderr
        assert result.stdout.startswith("FAILED") and why in result.stdout, result.stdout
    stranger = run_verifier(tmp_path, package, "0" * 40)
    assert stranger.returncode == 1 and "not by the trusted key" in stranger.stdout
    assert run_verifier(tmp_path, package, fingerprint).returncode == 0


def test_what_a_version_was_registered_from_is_immutable(trained, bound_db):
    version = register(trained)
    for statement in (
        "UPDATE model_versions SET artifact_sha256 = 'x'",
        "UPDATE model_versions SET metrics = '{}'",
        "DELETE FROM model_versions",
    ):
        with pytest.raises(peewee.DatabaseError, match="immutable"), bound_db.atomic():
            bound_db.execute_sql(statement)
    assert ModelVersion.get_by_id(version["id"]).artifact_sha256 == version["artifact_sha256"]


def test_the_signing_key_is_generated_once_and_audited(trained):
    api = trained["api"]
    first = api.get("/api/v1/signing-key").json()
    second = api.get("/api/v1/signing-key").json()
    assert first == second and first["algorithm"] in ("ed25519", "eddsa")
    generated = list(AuditEvent.select().where(AuditEvent.action == "signing:key:generated"))
    assert [e.object_id for e in generated] == [first["fingerprint"]]
    assert (trained["config"].gnupg_home).stat().st_mode & 0o077 == 0
