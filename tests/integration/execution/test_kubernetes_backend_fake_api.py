"""The Kubernetes backend against a FAKE API server (fake_kube_api.py): no Kubernetes API
server can run on this machine (DESIGN §10). The official ``kubernetes`` client makes real
HTTP calls; the fake validates every object against the Kubernetes 1.30 schemas and plays
the Job controller and garbage collector just enough. Pods do not run: the tests end them
(``finish_pod``) and write what the run would have written.

With ``ANIMUS_TEST_KUBECONFIG`` set, the tests marked ``real_cluster_too`` run against that
cluster instead, and really run the pods (see docs/kubernetes.md for the other variables);
the tests that need to make a pod fail in a particular way stay on the fake.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import Conflict
from appliance.execution.backend import (
    ExecutionFailed,
    ExecutionRefused,
    RunStatus,
    Workspace,
    checkout_code,
)
from appliance.execution.kubernetes_backend import KubernetesBackend, make_kubernetes_backend
from appliance.execution.kubernetes_manifests import (
    KubernetesSettings,
    job_manifest,
    job_name,
    network_policy_manifest,
)
from tests.integration.execution.fake_kube_api import FakeKubeAPI

KUBECONFIG = os.environ.get("ANIMUS_TEST_KUBECONFIG")
fake_only = pytest.mark.skipif(
    bool(KUBECONFIG), reason="forces a pod to fail in one way: needs the fake API server"
)
INPUT_ROWS = b"a,b\n1,2\n3,4\n"
# What the run does on a real cluster; on the fake the test writes the same effects.
SCRIPT = (
    "import json, os\n"
    "print('rows:', len(open('/inputs/train/data/rows.csv').read().splitlines()))\n"
    "open(os.environ['ANIMUS_METRICS_FILE'], 'a').write("
    "json.dumps({'name': 'loss', 'value': 0.5, 'step': 1}) + '\\n' + 'not json\\n')\n"
    "open(os.path.join(os.environ['ANIMUS_OUTPUT_DIR'], 'model.bin'), 'wb').write(b'weights')\n"
)
SLEEP = "import time; print('started', flush=True); time.sleep(600)\n"


class Cluster:
    """The cluster the tests run against: the fake API server, or a real one."""

    def __init__(self, fake: FakeKubeAPI | None, settings: KubernetesSettings, image: str):
        self.fake = fake
        self.settings = settings
        self.image = image

    def backend(self) -> KubernetesBackend:
        """A fresh backend object — what a restarted Data Plane agent has."""
        if self.fake is not None:
            return make_kubernetes_backend(self.settings, host=self.fake.url)
        return make_kubernetes_backend(self.settings, kubeconfig=KUBECONFIG)

    def wait_running(self, backend: KubernetesBackend, run_id: str) -> None:
        """On the fake the pod runs at once; on a real cluster wait until it printed."""
        if self.fake is None:
            deadline = time.monotonic() + 120
            while b"started" not in backend.read_logs(run_id, 0):
                assert time.monotonic() < deadline, "the pod did not start"
                time.sleep(1)

    def run_script(self, workspace: Workspace, run_id: str) -> None:
        """Let the pod of SCRIPT end: on the fake, do what SCRIPT does and end the pod."""
        if self.fake is None:
            return
        name = job_name(run_id)
        self.fake.write_log(name, b"rows: 3\n")
        metrics = workspace.state_dir / "metrics" / "metrics.jsonl"
        with open(metrics, "a") as handle:
            handle.write(json.dumps({"name": "loss", "value": 0.5, "step": 1}) + "\nnot json\n")
        (workspace.output_dir / "model.bin").write_bytes(b"weights")
        outcome = {"exit_code": 0, "reason": None, "signal": None}
        self.fake.finish_pod(name, 0, message=json.dumps(outcome))

    def left_behind(self, run_id: str) -> dict[str, bool]:
        """Which of the run's objects still exist."""
        backend = self.backend()
        name = job_name(run_id)
        ns = self.settings.namespace

        def exists(read: Callable[..., Any]) -> bool:
            try:
                read(name, ns, _preload_content=False)
                return True
            except Exception:
                return False

        selector = f"animus.io/run={name}"
        pods = json.loads(
            backend.core.list_namespaced_pod(
                ns, label_selector=selector, _preload_content=False
            ).data
        )["items"]
        return {
            "job": exists(backend.batch.read_namespaced_job),
            "secret": exists(backend.core.read_namespaced_secret),
            "network_policy": exists(backend.networking.read_namespaced_network_policy),
            "pods": bool(pods),
        }


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """The fake API server (or the cluster of ANIMUS_TEST_KUBECONFIG) and its settings."""
    if KUBECONFIG:
        settings = KubernetesSettings(
            namespace=os.environ.get("ANIMUS_TEST_KUBE_NAMESPACE", "animus-runs"),
            registry=os.environ["ANIMUS_TEST_KUBE_REGISTRY"],
            workspace_claim=os.environ.get("ANIMUS_TEST_KUBE_CLAIM", "animus-workspaces"),
            workspace_mount=os.environ["ANIMUS_TEST_KUBE_WORKSPACE_MOUNT"],
        )
        yield Cluster(None, settings, os.environ["ANIMUS_TEST_KUBE_IMAGE"])
        return
    settings = KubernetesSettings(
        namespace="animus-runs",
        registry="registry.animus.local:5000",
        workspace_mount=str(tmp_path / "workspaces"),
    )
    image = "registry.animus.local:5000/animus/runner@sha256:" + "ab" * 32
    with FakeKubeAPI() as fake:
        yield Cluster(fake, settings, image)


@pytest.fixture
def prepare(
    cluster: Cluster, code_repo: tuple[str, str]
) -> Callable[..., tuple[dict[str, Any], Workspace]]:
    """A snapshot and its workspace on the shared volume, as the Data Plane agent makes them."""

    def make(
        command: list[str],
        *,
        secrets: dict[str, str] | None = None,
        egress: list[str] | None = None,
    ) -> tuple[dict[str, Any], Workspace]:
        run_id = "run_" + uuid.uuid4().hex[:12]
        repo_url, sha = code_repo
        root = Path(cluster.settings.workspace_mount) / run_id
        workspace = Workspace.create(root, secrets)
        data = workspace.inputs_dir / "train" / "data" / "rows.csv"
        data.parent.mkdir(parents=True)
        data.write_bytes(INPUT_ROWS)
        checkout_code(repo_url, sha, workspace.code_dir)
        files = [
            {
                "path": "data/rows.csv",
                "sha256": hashlib.sha256(INPUT_ROWS).hexdigest(),
                "size": len(INPUT_ROWS),
            }
        ]
        snapshot = {
            "run_id": run_id,
            "image": cluster.image,
            "command": command,
            "env": {},
            "resources": {"cpu": 0.5, "memory_mb": 256, "pids": 128, "timeout_seconds": 300},
            "network": {"egress": egress or []},
            "inputs": [{"name": "train", "files": files}],
            "code": {"repo_url": repo_url, "commit_sha": sha, "path": ""},
            "secrets": sorted(secrets or {}),
        }
        return snapshot, workspace

    return make


def wait_finished(backend: KubernetesBackend, run_id: str, seconds: float = 180) -> RunStatus:
    """Poll until the run reaches a final state."""
    deadline = time.monotonic() + seconds
    while True:
        status = backend.status(run_id)
        assert status is not None
        if status.finished:
            return status
        assert time.monotonic() < deadline, f"run still {status.state} after {seconds} s"
        time.sleep(0.05 if KUBECONFIG is None else 1)


def test_run_lifecycle_with_agent_restart_against_fake_api_server(cluster, prepare):
    """create → status → logs → the agent restarts mid-run → recover finds the Job, status
    continues → metrics, outputs → cleanup leaves nothing (Job, pod, Secret, policy)."""
    snapshot, workspace = prepare(["python3", "-c", SCRIPT], secrets={"API_TOKEN": "s3cr3t"})
    run_id = snapshot["run_id"]
    backend = cluster.backend()
    backend.start(snapshot, workspace)
    backend.start(snapshot, workspace)  # idempotent
    assert cluster.left_behind(run_id)["secret"] is True
    assert cluster.left_behind(run_id)["network_policy"] is True
    if cluster.fake is not None:
        job = cluster.fake.objects[("Job", "animus-runs", job_name(run_id))]
        assert job["spec"]["suspend"] is False  # resumed after its NetworkPolicy existed
        # Nothing was lost on the way through the client's models: what the API server got
        # is exactly the rendered Job, every security setting included.
        relative = workspace.root.relative_to(cluster.settings.workspace_mount).as_posix()
        rendered = job_manifest(snapshot, cluster.settings, relative)
        assert job["spec"]["template"] == rendered["spec"]["template"]
        policy = cluster.fake.objects[("NetworkPolicy", "animus-runs", job_name(run_id))]
        assert policy["spec"] == network_policy_manifest(snapshot, cluster.settings)["spec"]
        assert policy["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
        secret = cluster.fake.objects[("Secret", "animus-runs", job_name(run_id))]
        assert secret["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
        assert cluster.fake.requests.index(
            ("POST", "/apis/networking.k8s.io/v1/namespaces/animus-runs/networkpolicies")
        ) < cluster.fake.requests.index(
            ("PATCH", f"/apis/batch/v1/namespaces/animus-runs/jobs/{job_name(run_id)}")
        )
        assert backend.status(run_id).state == "running"
        with pytest.raises(Conflict):
            backend.outputs(run_id)

    del backend  # the Data Plane agent restarts while the pod runs
    restarted = cluster.backend()
    assert run_id in restarted.recover()
    if cluster.fake is not None:
        assert restarted.status(run_id).state == "running"
    cluster.run_script(workspace, run_id)
    status = wait_finished(restarted, run_id)
    assert (status.state, status.exit_code, status.reason) == ("succeeded", 0, None)
    assert status.started_at and status.finished_at
    assert restarted.status(run_id) == status  # recorded on the Job: stable from now on
    assert cluster.left_behind(run_id)["secret"] is False  # deleted as soon as it ended

    assert b"rows: 3\n" in restarted.read_logs(run_id, 0)
    assert restarted.read_logs(run_id, 4, 3) == b": 3"
    metrics = restarted.read_metrics(run_id, 0)
    assert [(m["seq"], m["name"], m["value"]) for m in metrics] == [(0, "loss", 0.5)]
    assert restarted.read_metrics(run_id, 1) == []
    (output,) = restarted.outputs(run_id)
    assert (output.path, output.size) == ("model.bin", 7)
    assert output.sha256 == hashlib.sha256(b"weights").hexdigest()

    restarted.cleanup(run_id)
    assert cluster.left_behind(run_id) == {
        "job": False,
        "secret": False,
        "network_policy": False,
        "pods": False,
    }
    assert restarted.status(run_id) is None
    assert run_id not in restarted.recover()
    assert not workspace.state_dir.exists() and workspace.output_dir.exists()
    restarted.cleanup(run_id)  # idempotent


def test_cancel_suspends_the_job_and_reports_canceled_against_fake_api_server(cluster, prepare):
    snapshot, workspace = prepare(["python3", "-c", SLEEP])
    run_id = snapshot["run_id"]
    backend = cluster.backend()
    backend.start(snapshot, workspace)
    cluster.wait_running(backend, run_id)
    backend.cancel(run_id)
    status = cluster.backend().status(run_id)
    assert (status.state, status.reason) == ("canceled", "canceled")
    if cluster.fake is not None:
        # The kubelet stops the pod and keeps it, so its log can still be read.
        pod = cluster.fake.pod_of(job_name(run_id))
        assert pod["spec"]["activeDeadlineSeconds"] == 1
        assert pod["status"]["phase"] == "Failed"
        cluster.fake.write_log(job_name(run_id), b"started\n")
    assert b"started" in backend.read_logs(run_id, 0)
    assert cluster.backend().status(run_id) == status
    backend.cancel(run_id)  # idempotent
    backend.cleanup(run_id)
    assert not any(cluster.left_behind(run_id).values())


def test_garbage_collector_takes_owned_objects_with_the_job_against_fake_api_server(
    cluster, prepare
):
    """Deleting only the Job (as an operator might) removes the Secret and the policy too."""
    snapshot, workspace = prepare(["python3", "-c", SLEEP], secrets={"API_TOKEN": "x"})
    run_id = snapshot["run_id"]
    backend = cluster.backend()
    backend.start(snapshot, workspace)
    backend.batch.delete_namespaced_job(
        job_name(run_id), "animus-runs", propagation_policy="Background", _preload_content=False
    )
    if cluster.fake is not None:
        assert cluster.left_behind(run_id) == {
            "job": False,
            "secret": False,
            "network_policy": False,
            "pods": False,
        }
    backend.cleanup(run_id)


@fake_only
@pytest.mark.parametrize(
    ("exit_code", "kubelet_reason", "outcome", "job_reason", "expected"),
    [
        (3, "Error", {"exit_code": 3, "reason": None}, "BackoffLimitExceeded", "nonzero_exit"),
        (137, "OOMKilled", None, "BackoffLimitExceeded", "oom"),
        (143, "Error", {"exit_code": 143, "reason": "timeout"}, "BackoffLimitExceeded", "timeout"),
        (137, "Error", None, "DeadlineExceeded", "timeout"),
        (137, "Error", None, "BackoffLimitExceeded", "killed"),
        (137, "Error", {"exit_code": 137, "reason": "killed"}, "BackoffLimitExceeded", "killed"),
        # A forged outcome (the run's code can write the termination log) cannot turn a
        # failed exit into anything but what the kubelet saw.
        (1, "Error", {"exit_code": 0, "reason": None}, "BackoffLimitExceeded", "nonzero_exit"),
    ],
)
def test_failure_reasons_against_fake_api_server(
    cluster, prepare, exit_code, kubelet_reason, outcome, job_reason, expected
):
    snapshot, workspace = prepare(["python3", "-c", SLEEP])
    run_id = snapshot["run_id"]
    backend = cluster.backend()
    backend.start(snapshot, workspace)
    cluster.fake.finish_pod(
        job_name(run_id),
        exit_code,
        reason=kubelet_reason,
        message=json.dumps(outcome) if outcome else "",
        job_failure_reason=job_reason,
    )
    status = backend.status(run_id)
    assert (status.state, status.exit_code, status.reason) == ("failed", exit_code, expected)
    backend.cleanup(run_id)


@fake_only
def test_image_that_cannot_be_pulled_fails_the_start_against_fake_api_server(cluster, prepare):
    snapshot, workspace = prepare(["python3", "-c", SLEEP])
    run_id = snapshot["run_id"]
    backend = cluster.backend()
    backend.start(snapshot, workspace)
    pod = cluster.fake.pod_of(job_name(run_id))
    pod["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": "ImagePullBackOff"}}
    status = backend.status(run_id)
    assert (status.state, status.reason) == ("failed", "start_failed")
    assert cluster.fake.objects[("Job", "animus-runs", job_name(run_id))]["spec"]["suspend"]
    backend.cleanup(run_id)


def test_refused_snapshots_create_nothing_against_fake_api_server(cluster, prepare):
    backend = cluster.backend()
    refused_ids = []
    snapshot, workspace = prepare(["python3", "-c", SLEEP], egress=["pypi.org:443"])
    refused_ids.append(snapshot["run_id"])
    with pytest.raises(ExecutionRefused) as caught:
        backend.start(snapshot, workspace)
    assert caught.value.details["reason"] == "egress_not_allowed"

    snapshot, workspace = prepare(["python3", "-c", SLEEP])
    refused_ids.append(snapshot["run_id"])
    (workspace.inputs_dir / "train" / "data" / "rows.csv").write_bytes(b"tampered")
    with pytest.raises(ExecutionRefused) as caught:
        backend.start(snapshot, workspace)
    assert caught.value.details["reason"] == "input_digest_mismatch"

    snapshot, workspace = prepare(["python3", "-c", SLEEP], secrets={"API_TOKEN": "x"})
    refused_ids.append(snapshot["run_id"])
    workspace.secrets.clear()
    with pytest.raises(ExecutionRefused):
        backend.start(snapshot, workspace)
    assert not set(refused_ids) & set(backend.recover())
    if cluster.fake is not None:
        assert not any(method == "POST" for method, _ in cluster.fake.requests)


@fake_only
def test_start_failing_half_way_leaves_a_failed_suspended_job_against_fake_api_server(
    cluster, prepare
):
    """The NetworkPolicy cannot be created: no pod may ever run, the status says
    start_failed (Backend.start), the Secret is gone, and cleanup removes the rest."""
    cluster.fake.refuse.add("NetworkPolicy")
    snapshot, workspace = prepare(["python3", "-c", SLEEP], secrets={"API_TOKEN": "x"})
    run_id = snapshot["run_id"]
    backend = cluster.backend()
    with pytest.raises(ExecutionFailed):
        backend.start(snapshot, workspace)
    job = cluster.fake.objects[("Job", "animus-runs", job_name(run_id))]
    assert job["spec"]["suspend"] is True
    assert cluster.fake.names("Pod") == []
    status = cluster.backend().status(run_id)
    assert (status.state, status.reason) == ("failed", "start_failed")
    assert run_id in backend.recover()
    backend.cleanup(run_id)
    assert not any(cluster.left_behind(run_id).values())


def test_unknown_runs_against_fake_api_server(cluster):
    backend = cluster.backend()
    assert backend.status("run_never_started") is None
    backend.cleanup("run_never_started")


@fake_only
def test_unreachable_api_server_is_an_execution_failure_against_fake_api_server(cluster):
    """The fake is stopped: every call fails as ExecutionFailed, never a client exception."""
    cluster.fake.__exit__(None, None, None)
    backend = cluster.backend()
    backend.api_client.configuration.retries = 0
    with pytest.raises(ExecutionFailed):
        backend.recover()
