"""The Kubernetes objects of a Run: valid against the official schemas (Kubernetes 1.30,
``kubernetes-validate``) and carrying every sandbox setting of DESIGN §7, field by field."""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from appliance.execution import run_agent
from appliance.execution.backend import ExecutionRefused
from appliance.execution.kubernetes_manifests import (
    LAUNCHER,
    KubernetesSettings,
    job_manifest,
    job_name,
    namespace_manifests,
    network_policy_manifest,
    owner_reference,
    render_manifests,
    secret_manifest,
)
from appliance.execution.runc_backend import frame_secrets

KUBERNETES_VERSION = "1.30.0"
SETTINGS = KubernetesSettings(
    namespace="animus-runs",
    registry="registry.animus.local:5000",
    workspace_claim="animus-workspaces",
    run_as_user=1000,
    run_as_group=1000,
    kill_grace_seconds=5,
    deadline_margin_seconds=60,
)
DIGEST = "sha256:" + "ab" * 32
SNAPSHOT: dict[str, Any] = {
    "run_id": "Run_01H8XYZ",
    "image": f"registry.animus.local:5000/animus/runner@{DIGEST}",
    "command": ["python", "train.py", "--epochs", "3"],
    "env": {"MODE": "fast"},
    "resources": {"cpu": 1.5, "memory_mb": 512, "pids": 128, "timeout_seconds": 600},
    "network": {"egress": []},
    "inputs": [{"name": "train", "files": []}, {"name": "eval", "files": []}],
    "code": {"repo_url": "file:///x", "commit_sha": "a" * 40, "path": "sub"},
    "secrets": ["API_TOKEN"],
}
WORKSPACE = "runs/Run_01H8XYZ"
OWNER = {"metadata": {"name": job_name("Run_01H8XYZ"), "uid": "0b7e3c1e-uid"}}


def snapshot(**changes: Any) -> dict[str, Any]:
    return {**copy.deepcopy(SNAPSHOT), **changes}


def validate(manifest: dict[str, Any]) -> None:
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_every_rendered_manifest_validates_against_the_kubernetes_schemas():
    manifests = render_manifests(SNAPSHOT, SETTINGS, WORKSPACE)
    assert [m["kind"] for m in manifests] == ["Job", "NetworkPolicy", "Secret"]
    for manifest in manifests:
        validate(manifest)
    validate(job_manifest(SNAPSHOT, SETTINGS, WORKSPACE, suspend=True))
    without_secrets = render_manifests(snapshot(secrets=[]), SETTINGS, WORKSPACE)
    assert [m["kind"] for m in without_secrets] == ["Job", "NetworkPolicy"]


def test_schema_validation_would_catch_a_malformed_manifest():
    """The schema check is real: a misspelt security field fails it."""
    job = job_manifest(SNAPSHOT, SETTINGS, WORKSPACE)
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job)


def test_job_carries_the_sandbox_settings():
    job = job_manifest(SNAPSHOT, SETTINGS, WORKSPACE)
    name = job_name("Run_01H8XYZ")
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["metadata"]["name"] == name
    assert job["metadata"]["namespace"] == "animus-runs"
    assert job["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "animus-dataplane",
        "animus.io/run": name,
    }
    assert job["metadata"]["annotations"]["animus.io/run-id"] == "Run_01H8XYZ"
    assert job["metadata"]["annotations"]["animus.io/workspace"] == WORKSPACE

    spec = job["spec"]
    assert spec["suspend"] is True  # resumed only once the NetworkPolicy exists
    assert spec["backoffLimit"] == 0
    assert spec["completions"] == 1 and spec["parallelism"] == 1
    # timeout + 2 × kill grace + margin: the agent's own timeout acts first.
    assert spec["activeDeadlineSeconds"] == 600 + 10 + 60

    pod = spec["template"]["spec"]
    assert spec["template"]["metadata"]["labels"]["animus.io/run"] == name
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert pod["hostNetwork"] is False and pod["hostPID"] is False and pod["hostIPC"] is False
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (container,) = pod["containers"]
    assert container["image"] == f"registry.animus.local:5000/animus/runner@{DIGEST}"
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 1000
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert "add" not in security["capabilities"]
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"] == {
        "requests": {"cpu": "1500m", "memory": "512Mi"},
        "limits": {"cpu": "1500m", "memory": "512Mi"},
    }
    assert container["workingDir"] == "/code/sub"
    assert container["terminationMessagePath"] == "/dev/termination-log"


def test_job_runs_the_run_agent_with_the_snapshot_command():
    job = job_manifest(SNAPSHOT, SETTINGS, WORKSPACE)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == [
        "/usr/bin/python3",
        "-I",
        "-S",
        "-c",
        LAUNCHER,
        "--with-secrets",
    ]
    args = container["args"]
    assert args[0] == "/opt/animus/run_agent.py"
    assert "--timeout=600.0" in args and "--status-fd=3" in args
    assert "--secrets-stdin" in args and "--secrets-dir=/run/secrets" in args
    assert args[args.index("--") + 1 :] == SNAPSHOT["command"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MODE"] == "fast"
    assert env["ANIMUS_RUN_ID"] == "Run_01H8XYZ"
    assert env["ANIMUS_METRICS_FILE"] == "/state/metrics.jsonl"
    # No secret value ever appears in the Job (only in the Secret).
    assert all("valueFrom" not in e for e in container["env"])


def test_job_mounts_the_workspace_by_subpath_with_inputs_and_code_read_only():
    job = job_manifest(SNAPSHOT, SETTINGS, WORKSPACE)
    pod = job["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/code"] == {
        "name": "workspace",
        "mountPath": "/code",
        "subPath": f"{WORKSPACE}/code",
        "readOnly": True,
    }
    for name in ("train", "eval"):
        assert mounts[f"/inputs/{name}"]["subPath"] == f"{WORKSPACE}/inputs/{name}"
        assert mounts[f"/inputs/{name}"]["readOnly"] is True
    assert mounts["/output"]["subPath"] == f"{WORKSPACE}/output"
    assert not mounts["/output"].get("readOnly")
    assert mounts["/state"]["subPath"] == f"{WORKSPACE}/state/metrics"
    assert mounts["/var/run/animus/secrets-in"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["workspace"]["persistentVolumeClaim"] == {"claimName": "animus-workspaces"}
    assert volumes["secrets-in"]["secret"]["secretName"] == job_name("Run_01H8XYZ")
    assert volumes["secrets-in"]["secret"]["defaultMode"] == 0o440
    assert volumes["run-secrets"]["emptyDir"]["medium"] == "Memory"
    assert set(mounts) >= {"/scratch", "/tmp", "/run/secrets"}


def test_job_without_timeout_has_no_deadline_and_without_secrets_no_secret_volume():
    job = job_manifest(
        snapshot(resources={"cpu": 1, "memory_mb": 256}, secrets=[]), SETTINGS, WORKSPACE
    )
    assert "activeDeadlineSeconds" not in job["spec"]
    pod = job["spec"]["template"]["spec"]
    assert "secrets-in" not in {v["name"] for v in pod["volumes"]}
    assert "--secrets-stdin" not in pod["containers"][0]["args"]
    assert pod["containers"][0]["command"][-1] == "--without-secrets"


def test_network_policy_denies_all_ingress_and_egress_by_default():
    policy = network_policy_manifest(SNAPSHOT, SETTINGS, owner=OWNER)
    validate(policy)
    name = job_name("Run_01H8XYZ")
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    assert policy["metadata"]["name"] == name
    assert policy["metadata"]["namespace"] == "animus-runs"
    assert policy["spec"]["podSelector"] == {"matchLabels": {"animus.io/run": name}}
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["egress"] == []
    assert policy["spec"]["ingress"] == []
    assert policy["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": name,
            "uid": "0b7e3c1e-uid",
            "controller": False,
            "blockOwnerDeletion": False,
        }
    ]


def test_network_policy_allows_only_the_policys_addresses():
    allowed = snapshot(network={"egress": ["10.1.2.3:443", "10.9.9.9"]})
    policy = network_policy_manifest(allowed, SETTINGS, owner=OWNER)
    validate(policy)
    assert policy["spec"]["egress"] == [
        {"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}], "ports": [{"protocol": "TCP", "port": 443}]},
        {"to": [{"ipBlock": {"cidr": "10.9.9.9/32"}}]},
    ]


def test_egress_to_a_host_name_is_refused_since_a_network_policy_cannot_enforce_it():
    with pytest.raises(ExecutionRefused) as caught:
        network_policy_manifest(snapshot(network={"egress": ["pypi.org:443"]}), SETTINGS)
    assert caught.value.details["reason"] == "egress_not_allowed"


def test_secret_is_immutable_owned_by_the_job_and_framed_for_the_run_agent():
    secret = secret_manifest(SNAPSHOT, SETTINGS, {"API_TOKEN": "s3cr3t"}, owner=OWNER)
    assert secret is not None
    validate(secret)
    assert secret["kind"] == "Secret" and secret["type"] == "Opaque"
    assert secret["immutable"] is True
    assert secret["metadata"]["name"] == job_name("Run_01H8XYZ")
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "0b7e3c1e-uid"
    assert base64.b64decode(secret["data"]["frames"]) == frame_secrets({"API_TOKEN": "s3cr3t"})
    assert secret_manifest(snapshot(secrets=[]), SETTINGS, {}) is None
    with pytest.raises(ExecutionRefused):
        secret_manifest(SNAPSHOT, SETTINGS, {})


def test_rendering_for_the_cli_shows_no_secret_value():
    (*_, secret) = render_manifests(SNAPSHOT, SETTINGS, WORKSPACE)
    assert base64.b64decode(secret["data"]["frames"]) == b"API_TOKEN 0\n"


def test_owner_reference_names_the_created_job():
    assert owner_reference(OWNER)["uid"] == "0b7e3c1e-uid"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"image": "registry.animus.local:5000/animus/runner:latest"}, "invalid_snapshot"),
        ({"image": f"elsewhere.example:5000/animus/runner@{DIGEST}"}, "invalid_snapshot"),
        ({"command": []}, "invalid_snapshot"),
        ({"env": {"ANIMUS_RUN_ID": "x"}}, "invalid_snapshot"),
        ({"inputs": [{"name": "../etc", "files": []}]}, "invalid_snapshot"),
        ({"code": {"path": "../up"}}, "invalid_snapshot"),
        ({"run_id": "bad id"}, "invalid_snapshot"),
    ],
)
def test_unsafe_snapshots_are_refused(changes, reason):
    with pytest.raises(ExecutionRefused) as caught:
        job_manifest(snapshot(**changes), SETTINGS, WORKSPACE)
    assert caught.value.details["reason"] == reason


def test_job_names_are_dns_labels_and_keep_distinct_run_ids_apart():
    names = {job_name(r) for r in ("Run_1", "run-1", "RUN.1", "x" * 128)}
    assert len(names) == 4
    for name in names:
        assert len(name) <= 57 and name == name.lower()
        assert name[0].isalnum() and name[-1].isalnum()


def test_launcher_hands_secrets_and_the_outcome_file_to_the_real_run_agent(tmp_path):
    """The Job's launcher, run with this Python and the repository's run agent, the pod's
    paths swapped for temporary files: secrets reach the agent (and are redacted from the
    log), and the outcome lands in what is the termination-message file in a pod."""
    termination_log = tmp_path / "termination-log"
    termination_log.write_text("forged by an earlier process\n")
    frames = tmp_path / "frames"
    frames.write_bytes(frame_secrets({"API_TOKEN": "s3cr3t"}))
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    launcher = LAUNCHER.replace("/dev/termination-log", str(termination_log)).replace(
        "/var/run/animus/secrets-in/frames", str(frames)
    )
    agent = Path(run_agent.__file__)
    command = "import os; print(open(os.environ['F']).read()); raise SystemExit(3)"
    result = subprocess.run(
        [
            *(sys.executable, "-I", "-S", "-c", launcher, "--with-secrets", str(agent)),
            *("--status-fd=3", "--secrets-stdin", f"--secrets-dir={secrets_dir}", "--"),
            *(sys.executable, "-c", command),
        ],
        env={"F": str(secrets_dir / "API_TOKEN")},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 3
    assert b"[REDACTED]" in result.stdout and b"s3cr3t" not in result.stdout
    outcome = json.loads(termination_log.read_text())
    assert outcome["exit_code"] == 3 and outcome["reason"] == "nonzero_exit"


def test_namespace_objects_validate_and_lock_the_namespace_down():
    manifests = {m["kind"]: m for m in namespace_manifests(SETTINGS, agent_namespace="animus")}
    for manifest in manifests.values():
        validate(manifest)
    labels = manifests["Namespace"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    policy = manifests["NetworkPolicy"]
    assert policy["spec"]["podSelector"] == {}
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "egress" not in policy["spec"] and "ingress" not in policy["spec"]
    rules = {
        (r["apiGroups"][0], resource): set(r["verbs"])
        for r in manifests["Role"]["rules"]
        for resource in r["resources"]
    }
    assert rules[("", "pods")] == {"get", "list", "patch"}  # patch: cancel
    assert rules[("", "pods/log")] == {"get"}
    assert "create" in rules[("batch", "jobs")] and "patch" in rules[("batch", "jobs")]
    assert ("", "pods/exec") not in rules
    subject = manifests["RoleBinding"]["subjects"][0]
    assert (subject["name"], subject["namespace"]) == ("animus-dataplane", "animus")


def test_settings_from_environment():
    settings = KubernetesSettings.from_env(
        {"ANIMUS_K8S_NAMESPACE": "runs-a", "ANIMUS_K8S_RUN_AS_USER": "2000"}
    )
    assert (settings.namespace, settings.run_as_user) == ("runs-a", 2000)
    assert settings.workspace_claim == KubernetesSettings().workspace_claim
    with pytest.raises(ValueError):
        KubernetesSettings.from_env({"ANIMUS_K8S_RUN_AS_USER": "0"})
