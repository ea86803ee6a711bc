"""The Kubernetes inventory's manifests, applied by the ``animus_k8s_apply`` module to a
FAKE API server (``fake_apply_api.py``): no Kubernetes API server can run on this machine
(DESIGN §10).

The play runs for real with ``--tags kubernetes_manifests`` — the tasks that render and
apply the cluster's objects — so every manifest the inventory renders goes through the
official ``kubernetes`` client to the fake, which validates each one against the official
Kubernetes schemas (strict) as it is applied. The registry's CA is a real one made by the
appliance's own code; the release's image layouts are only their ``index.json``.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import kubernetes_validate
import pytest

from appliance.images.registry_server import generate_tls
from tests.integration.ansible.fake_apply_api import KUBERNETES_VERSION, FakeApplyAPI
from tests.integration.ansible.playbook import ANSIBLE_DIR, run_playbook

VERSION = "0.1.0"
REGISTRY = "registry.animus.local:5000"
CONTROL_PLANE_DIGEST = "sha256:" + "c" * 64
RUNNER_DIGEST = "sha256:" + "d" * 64
SECRET_VALUES = ("db-secret-password", "registry-secret-password", "dataplane-credential-value")


def _layout(directory: Path, digest: str) -> None:
    directory.mkdir(parents=True)
    manifest = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest}
    (directory / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "manifests": [{**manifest, "size": 1000}]})
    )


@pytest.fixture
def cluster(tmp_path):
    prefix = tmp_path / "opt-animus"
    release = prefix / "releases" / VERSION
    _layout(release / "images" / "control-plane", CONTROL_PLANE_DIGEST)
    _layout(release / "images" / "runner", RUNNER_DIGEST)
    (release / "venv").symlink_to(Path(sys.prefix))
    generate_tls(prefix / "registry" / "tls", ("registry.animus.local",))
    (prefix / "etc").mkdir()
    (prefix / "etc" / "dataplane.token").write_text(SECRET_VALUES[2] + "\n")
    with FakeApplyAPI() as fake:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(fake.kubeconfig())
        extra_vars = {
            "animus_prefix": str(prefix),
            "animus_release_dir": str(release),
            "animus_version": VERSION,
            "animus_verification_file": str(tmp_path / "verification.json"),
            "animus_k8s_kubeconfig": str(kubeconfig),
            "animus_database_url": f"postgresql://animus:{SECRET_VALUES[0]}@db.example:5432/animus",
            "animus_registry_password": SECRET_VALUES[1],
            "animus_k8s_external_api_url": "https://animus.example",
            "data_plane_k8s_workspace_nfs_server": "10.0.0.5",
            "control_plane_k8s_storage_class": "nfs-rwx",
        }
        yield fake, extra_vars


def apply_manifests(extra_vars: dict[str, str], *args: str):
    return run_playbook(
        ANSIBLE_DIR, "kubernetes", extra_vars, "--tags", "kubernetes_manifests", *args
    )


def test_every_manifest_validates_and_a_second_apply_changes_nothing_fake_api_server(cluster):
    fake, extra_vars = cluster

    first = apply_manifests(extra_vars)
    assert first.returncode == 0, first.output[-6000:]
    assert first.recap()["localhost"]["changed"] == 3  # node trust, control plane, data plane
    for value in SECRET_VALUES:
        assert value not in first.output

    objects = fake.object_keys()
    expected = {
        ("Namespace", "", "animus"),
        ("Namespace", "", "animus-runs"),
        ("Namespace", "", "animus-system"),
        ("ConfigMap", "animus", "animus-settings"),
        ("Secret", "animus", "animus-database"),
        ("Secret", "animus", "animus-registry"),
        ("PersistentVolumeClaim", "animus", "animus-data"),
        ("Deployment", "animus", "animus-api"),
        ("Deployment", "animus", "animus-scheduler"),
        ("Service", "animus", "animus-api"),
        ("ServiceAccount", "animus", "animus-dataplane"),
        ("Secret", "animus", "animus-dataplane"),
        ("Deployment", "animus", "animus-dataplane"),
        ("NetworkPolicy", "animus-runs", "default-deny-all"),
        ("Role", "animus-runs", "animus-dataplane"),
        ("RoleBinding", "animus-runs", "animus-dataplane"),
        ("ResourceQuota", "animus-runs", "animus-runs"),
        ("Secret", "animus-runs", "animus-registry"),
        ("ServiceAccount", "animus-runs", "default"),
        ("PersistentVolume", "", "animus-workspaces-animus-runs"),
        ("PersistentVolume", "", "animus-workspaces-animus"),
        ("PersistentVolumeClaim", "animus-runs", "animus-workspaces"),
        ("PersistentVolumeClaim", "animus", "animus-workspaces"),
        ("ConfigMap", "animus-system", "animus-registry-trust"),
        ("DaemonSet", "animus-system", "animus-registry-trust"),
    }
    assert objects == expected

    # What the fake accepted also validates here, against the official schemas.
    assert fake.applied
    for body in fake.applied:
        kubernetes_validate.validate(body, KUBERNETES_VERSION, strict=True)

    # The control plane's images come from the local registry, by the layouts' digest.
    image = f"{REGISTRY}/animus/control-plane@{CONTROL_PLANE_DIGEST}"
    for name in ("animus-api", "animus-scheduler", "animus-dataplane"):
        pod = fake.objects[("Deployment", "animus", name)]["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"] == image
    runs_namespace = fake.objects[("Namespace", "", "animus-runs")]["metadata"]["labels"]
    assert runs_namespace["pod-security.kubernetes.io/enforce"] == "restricted"
    deny = fake.objects[("NetworkPolicy", "animus-runs", "default-deny-all")]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    binding = fake.objects[("RoleBinding", "animus-runs", "animus-dataplane")]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "animus-dataplane", "namespace": "animus"}
    ]
    agent = fake.objects[("Deployment", "animus", "animus-dataplane")]["spec"]["template"]
    assert agent["spec"]["serviceAccountName"] == "animus-dataplane"
    assert agent["spec"]["containers"][0]["command"][3:6] == [
        "dataplane",
        "--backend",
        "kubernetes",
    ]
    quota = fake.objects[("ResourceQuota", "animus-runs", "animus-runs")]["spec"]["hard"]
    assert quota["count/jobs.batch"] == "100"
    trust = fake.objects[("ConfigMap", "animus-system", "animus-registry-trust")]["data"]
    ca = Path(extra_vars["animus_prefix"], "registry", "tls", "ca.crt").read_text()
    assert trust["ca.crt"] == ca
    host_path = fake.objects[("DaemonSet", "animus-system", "animus-registry-trust")]["spec"][
        "template"
    ]["spec"]["volumes"][1]["hostPath"]["path"]
    assert host_path == f"/etc/containerd/certs.d/{REGISTRY}"

    # Secret values reach the cluster, and only the cluster.
    database = fake.objects[("Secret", "animus", "animus-database")]["data"]
    assert (
        base64.b64decode(database["ANIMUS_DATABASE_URL"]).decode()
        == (extra_vars["animus_database_url"])
    )
    agent_secret = fake.objects[("Secret", "animus", "animus-dataplane")]["data"]
    assert base64.b64decode(agent_secret["ANIMUS_DATAPLANE_TOKEN"]).decode() == SECRET_VALUES[2]
    pull = fake.objects[("Secret", "animus-runs", "animus-registry")]["data"][".dockerconfigjson"]
    auths = json.loads(base64.b64decode(pull))["auths"]
    assert auths[REGISTRY]["password"] == SECRET_VALUES[1]

    writes = len(fake.writes())
    second = apply_manifests(extra_vars)
    assert second.returncode == 0, second.output[-6000:]
    assert second.recap()["localhost"]["changed"] == 0
    assert len(fake.writes()) == writes, "the second run wrote to the cluster"

    third = apply_manifests({**extra_vars, "control_plane_k8s_api_replicas": "3"})
    assert third.returncode == 0, third.output[-6000:]
    assert third.recap()["localhost"]["changed"] == 1
    assert "configured Deployment animus/animus-api" in third.output, third.output[-3000:]
    assert fake.objects[("Deployment", "animus", "animus-api")]["spec"]["replicas"] == 3
    assert fake.writes()[writes:] == [
        ("PATCH", "/apis/apps/v1/namespaces/animus/deployments/animus-api")
    ]


def test_check_mode_changes_nothing_in_the_cluster_fake_api_server(cluster):
    fake, extra_vars = cluster

    result = apply_manifests(extra_vars, "--check")
    assert result.returncode == 0, result.output[-6000:]
    assert result.recap()["localhost"]["changed"] == 3
    assert fake.object_keys() == set()
    assert fake.writes() == []


def test_a_manifest_the_api_server_refuses_fails_the_play_fake_api_server(cluster):
    fake, extra_vars = cluster

    # A quota value that is no quantity: the API server (here the schemas) refuses it.
    result = apply_manifests(extra_vars, "-e", '{"data_plane_k8s_quota": {"pods": ["many"]}}')
    assert result.returncode != 0
    assert "the API server answered 422" in result.output
    assert "ResourceQuota animus-runs" in result.output
    for value in SECRET_VALUES:
        assert value not in result.output
    assert ("ResourceQuota", "animus-runs", "animus-runs") not in fake.object_keys()
