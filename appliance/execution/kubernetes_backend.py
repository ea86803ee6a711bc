"""The Kubernetes Data Plane backend: one Job per Run in a locked-down namespace (DESIGN §7).

The objects come from ``kubernetes_manifests`` (the same execution snapshot as runc). The
backend keeps nothing that matters in memory: what a restarted Data Plane agent needs is on
the Job itself — the run id, the workspace and the timeout in annotations, a cancel mark
and, once the run ended, its final RunStatus — and the workspace files on the shared
volume. ``recover`` lists the Jobs by label.

Order of creation: the Job is created suspended, then the NetworkPolicy and the Secret with
an owner reference to it, and only then is the Job resumed — no pod runs before its network
rule exists. The Secret is deleted as soon as the run is seen finished; ``cleanup`` deletes
the Job with its pods, NetworkPolicy and Secret (explicitly too, not only through the
garbage collector). See docs/kubernetes.md.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from appliance.errors import Conflict, NotFound
from appliance.execution import kubernetes_manifests as manifests
from appliance.execution.backend import (
    Backend,
    ExecutionFailed,
    ExecutionRefused,
    OutputFile,
    RunStatus,
    Workspace,
    output_files,
    read_metric_records,
    refused,
    relative_path,
    verify_checkout,
    verify_inputs,
)
from appliance.execution.kubernetes_manifests import KubernetesSettings
from appliance.execution.runc_backend import MAX_SECRETS_BYTES, frame_secrets

__all__ = ["KubernetesBackend", "make_kubernetes_backend"]

log = logging.getLogger("appliance.dataplane.kubernetes")

CANCEL_ANNOTATION = "animus.io/cancel-requested"
FINAL_ANNOTATION = "animus.io/final-status"
#: Waiting reasons of a container that will never start by itself.
_START_FAILURES = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
)
_AGENT_REASONS = {
    "terminated": "killed",
    "killed": "killed",
    "timeout": "timeout",
    "start_failed": "start_failed",
    "nonzero_exit": "nonzero_exit",
}


def _annotations(obj: dict[str, Any]) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


class KubernetesBackend(Backend):
    """Runs snapshots as Kubernetes Jobs through the API server behind API_CLIENT."""

    name = "kubernetes"

    def __init__(self, api_client: k8s.ApiClient, settings: KubernetesSettings):
        """API_CLIENT is a configured ``kubernetes.client.ApiClient`` (see
        ``make_kubernetes_backend``); SETTINGS place the runs in the cluster."""
        self.api_client = api_client
        self.settings = settings
        self.batch = k8s.BatchV1Api(api_client)
        self.core = k8s.CoreV1Api(api_client)
        self.networking = k8s.NetworkingV1Api(api_client)
        self.workspace_mount = Path(settings.workspace_mount)
        # read_metrics resumes where it stopped: run id → (records seen, bytes consumed).
        self._metric_positions: dict[str, tuple[int, int]] = {}

    # --- API calls -------------------------------------------------------------------------

    @property
    def _ns(self) -> str:
        return self.settings.namespace

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        # Raw JSON instead of the client's models: the manifests are plain dicts, and the
        # fields read back (annotations, conditions, container states) stay plain too.
        return json.loads(response.data)

    def _call(self, what: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, _preload_content=False, **kwargs)
        except ApiException as exc:
            if exc.status in (404, 409):
                raise
            log.warning(
                "kubernetes API call failed",
                extra={"fields": {"call": what, "status": exc.status, "reason": exc.reason}},
            )
            raise ExecutionFailed(f"the Kubernetes API refused {what}") from None
        except (OSError, urllib3.exceptions.HTTPError):
            raise ExecutionFailed("the Kubernetes API server cannot be reached") from None

    def _read_job(self, run_id: str) -> dict[str, Any] | None:
        try:
            name = manifests.job_name(run_id)
        except ExecutionRefused:
            return None
        try:
            return self._json(
                self._call("read job", self.batch.read_namespaced_job, name, self._ns)
            )
        except ApiException:
            return None

    def _patch_job(self, run_id: str, patch: dict[str, Any]) -> None:
        name = manifests.job_name(run_id)
        with contextlib.suppress(ApiException):
            self._call("patch job", self.batch.patch_namespaced_job, name, self._ns, patch)

    def _pod(self, run_id: str) -> dict[str, Any] | None:
        """The run's pod (the newest, should a controller ever have made two)."""
        selector = f"{manifests.RUN_LABEL}={manifests.job_name(run_id)}"
        listing = self._json(
            self._call(
                "list pods", self.core.list_namespaced_pod, self._ns, label_selector=selector
            )
        )
        pods = listing.get("items") or []
        pods.sort(key=lambda p: p["metadata"].get("creationTimestamp") or "")
        return pods[-1] if pods else None

    def _delete(self, what: str, function: Callable[..., Any], name: str) -> None:
        with contextlib.suppress(ApiException):
            self._call(what, function, name, self._ns, propagation_policy="Background")

    def _workspace_dir(self, job: dict[str, Any]) -> Path:
        relative = relative_path(_annotations(job)[manifests.WORKSPACE_ANNOTATION], "workspace")
        return self.workspace_mount / relative

    def _known(self, run_id: str) -> dict[str, Any]:
        job = self._read_job(run_id)
        if job is None:
            raise NotFound("the backend does not know this run", details={"run_id": run_id})
        return job

    # --- start -----------------------------------------------------------------------------

    def _relative_workspace(self, workspace: Workspace) -> str:
        try:
            relative = workspace.root.resolve().relative_to(self.workspace_mount.resolve())
        except ValueError:
            raise refused(
                "invalid_snapshot", "the workspace is not on the Data Plane's shared volume"
            ) from None
        expected = {"inputs", "code", "output", "scratch", "state"}
        actual = {
            p.name
            for p in (
                workspace.inputs_dir,
                workspace.code_dir,
                workspace.output_dir,
                workspace.scratch_dir,
                workspace.state_dir,
            )
            if p.parent == workspace.root
        }
        if actual != expected or not relative.parts:
            # The pod mounts fixed sub-paths of the workspace root (Workspace.create).
            raise refused("invalid_snapshot", "the workspace does not have the standard layout")
        return PurePosixPath(*relative.parts).as_posix()

    def start(self, snapshot: dict[str, Any], workspace: Workspace) -> None:
        """See Backend.start. Everything is checked and rendered before the first API call."""
        run_id = str(snapshot.get("run_id", ""))
        name = manifests.job_name(run_id)
        if self._read_job(run_id) is not None:
            return
        relative = self._relative_workspace(workspace)
        names = manifests.secret_names(snapshot)
        values = {}
        for secret in names:
            if secret not in workspace.secrets:
                raise refused("invalid_snapshot", f"no value was provided for secret {secret}")
            values[secret] = workspace.secrets[secret]
        if len(frame_secrets(values)) > MAX_SECRETS_BYTES:
            raise refused("invalid_snapshot", "the run's secrets exceed 60 KiB together")
        job = manifests.job_manifest(snapshot, self.settings, relative, suspend=True)
        # Rendered now only to refuse a bad snapshot before anything exists in the cluster.
        manifests.network_policy_manifest(snapshot, self.settings)
        code = snapshot.get("code") or {}
        code_path = relative_path(str(code.get("path") or ""), "the code path")
        verify_inputs(snapshot, workspace.inputs_dir)
        verify_checkout(workspace.code_dir, str(code.get("commit_sha", "")))
        if not (workspace.code_dir / code_path).is_dir():
            raise refused("invalid_snapshot", "the code path is not a directory of the commit")
        self._prepare_state(workspace)

        try:
            response = self._call(
                "create job",
                self.batch.create_namespaced_job,
                self._ns,
                k8s.V1Job.from_dict(job),
            )
        except ApiException as exc:
            if exc.status == 409:
                return  # another call of start won the race: the run exists
            raise ExecutionFailed("the Job could not be created") from None
        created = self._json(response)
        try:
            policy = manifests.network_policy_manifest(snapshot, self.settings, owner=created)
            self._call(
                "create network policy",
                self.networking.create_namespaced_network_policy,
                self._ns,
                k8s.V1NetworkPolicy.from_dict(policy),
            )
            secret = manifests.secret_manifest(snapshot, self.settings, values, owner=created)
            if secret is not None:
                self._call(
                    "create secret",
                    self.core.create_namespaced_secret,
                    self._ns,
                    k8s.V1Secret.from_dict(secret),
                )
            self._call(
                "resume job",
                self.batch.patch_namespaced_job,
                name,
                self._ns,
                {"spec": {"suspend": False}},
            )
        except (ApiException, ExecutionFailed):
            # The Job never left suspension, so nothing ran. It stays, with its final status,
            # for status() and recover() to answer (Backend.start); its Secret goes now.
            self._conclude(run_id, created, None, RunStatus("failed", None, "start_failed"))
            raise ExecutionFailed(
                "the run's Kubernetes objects could not be created", details={"run_id": run_id}
            ) from None

    def _prepare_state(self, workspace: Workspace) -> None:
        """The metrics file and the output directory, writable by the run's user (the
        kubelet applies fsGroup to a volume's root, not reliably to a subPath)."""
        metrics_dir = workspace.state_dir / "metrics"
        metrics_dir.mkdir(parents=True, exist_ok=True)
        (metrics_dir / manifests.METRICS_FILE).touch()
        if os.geteuid() == 0:
            uid, gid = self.settings.run_as_user, self.settings.run_as_group
            for path in (metrics_dir, metrics_dir / manifests.METRICS_FILE, workspace.output_dir):
                os.chown(path, uid, gid)

    # --- status ----------------------------------------------------------------------------

    def status(self, run_id: str) -> RunStatus | None:
        """See Backend.status. Kubernetes enforces the deadline (activeDeadlineSeconds)."""
        job = self._read_job(run_id)
        if job is None:
            return None
        final = _annotations(job).get(FINAL_ANNOTATION)
        if final:
            return RunStatus(**json.loads(final))
        conditions = {
            c.get("type"): c
            for c in (job.get("status") or {}).get("conditions") or []
            if c.get("status") == "True"
        }
        pod = self._pod(run_id)
        started = (job.get("status") or {}).get("startTime")
        if _annotations(job).get(CANCEL_ANNOTATION):
            return self._conclude(run_id, job, pod, RunStatus("canceled", None, "canceled"))
        if "Complete" in conditions:
            return self._conclude(run_id, job, pod, RunStatus("succeeded", 0))
        if "Failed" in conditions:
            deadline = conditions["Failed"].get("reason") == "DeadlineExceeded"
            return self._conclude(run_id, job, pod, self._failure(pod, deadline))
        waiting = (self._container(pod).get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _START_FAILURES:
            # The pod would wait until the deadline; the run cannot start, so say so now.
            self._patch_job(run_id, {"spec": {"suspend": True}})
            return self._conclude(run_id, job, pod, RunStatus("failed", None, "start_failed"))
        return RunStatus("running", started_at=started)

    @staticmethod
    def _container(pod: dict[str, Any] | None) -> dict[str, Any]:
        for container in ((pod or {}).get("status") or {}).get("containerStatuses") or []:
            if container.get("name") == "run":
                return container
        return {}

    def _failure(self, pod: dict[str, Any] | None, deadline: bool) -> RunStatus:
        """Why the run's Job failed, from the kubelet's record of the container.

        The exit code and an OOM kill come from the kubelet; the run agent's outcome (its
        termination message) only refines the reason, since the run's code could write to
        the same file.
        """
        terminated = (self._container(pod).get("state") or {}).get("terminated")
        if terminated is None:
            return RunStatus("failed", None, "timeout" if deadline else "agent_lost")
        exit_code = terminated.get("exitCode")
        outcome: dict[str, Any] = {}
        with contextlib.suppress(ValueError, TypeError):
            parsed = json.loads(terminated.get("message") or "")
            outcome = parsed if isinstance(parsed, dict) else {}
        if terminated.get("reason") == "OOMKilled":
            reason = "oom"
        elif deadline:
            reason = "timeout"
        elif outcome.get("exit_code") == exit_code and outcome.get("reason"):
            reason = _AGENT_REASONS.get(str(outcome["reason"]), "nonzero_exit")
        elif isinstance(exit_code, int) and exit_code > 128:
            reason = "killed"
        else:
            reason = "nonzero_exit"
        return RunStatus("failed", exit_code, reason)

    def _conclude(
        self, run_id: str, job: dict[str, Any], pod: dict[str, Any] | None, status: RunStatus
    ) -> RunStatus:
        """Record STATUS on the Job (so it never changes again) and delete the Secret."""
        terminated = (self._container(pod).get("state") or {}).get("terminated") or {}
        exit_code = status.exit_code
        if status.state == "canceled" and exit_code is None:
            exit_code = terminated.get("exitCode")
        final = RunStatus(
            status.state,
            exit_code,
            status.reason,
            terminated.get("startedAt") or (job.get("status") or {}).get("startTime"),
            terminated.get("finishedAt")
            or (job.get("status") or {}).get("completionTime")
            or _utc_now(),
        )
        record = json.dumps(final.__dict__, sort_keys=True)
        self._patch_job(run_id, {"metadata": {"annotations": {FINAL_ANNOTATION: record}}})
        self._delete(
            "delete secret", self.core.delete_namespaced_secret, manifests.job_name(run_id)
        )
        return final

    def cancel(self, run_id: str) -> None:
        """See Backend.cancel. A running pod gets a one-second ``activeDeadlineSeconds``:
        the kubelet stops it (SIGTERM, SIGKILL after the grace period) and keeps the pod, so
        its log stays readable. Suspending the Job would stop it too, but the Job controller
        deletes the pod and its log with it; that is only done when no pod exists yet, so
        that none is ever made."""
        job = self._known(run_id)
        current = self.status(run_id)
        if current is not None and current.finished:
            return
        self._patch_job(run_id, {"metadata": {"annotations": {CANCEL_ANNOTATION: "true"}}})
        pod = self._pod(run_id)
        if pod is None:
            self._patch_job(run_id, {"spec": {"suspend": True}})
        else:
            with contextlib.suppress(ApiException):
                self._call(
                    "stop pod",
                    self.core.patch_namespaced_pod,
                    pod["metadata"]["name"],
                    self._ns,
                    {"spec": {"activeDeadlineSeconds": 1}},
                )
        self._conclude(run_id, job, pod, RunStatus("canceled", None, "canceled"))

    # --- results ---------------------------------------------------------------------------

    def read_logs(self, run_id: str, offset: int, limit: int | None = None) -> bytes:
        """See Backend.read_logs: the pod's log as the kubelet keeps it (the run agent's
        redacted copy of the command's output)."""
        self._known(run_id)
        pod = self._pod(run_id)
        if pod is None:
            return b""
        try:
            response = self._call(
                "read log",
                self.core.read_namespaced_pod_log,
                pod["metadata"]["name"],
                self._ns,
                container="run",
            )
        except ApiException:
            return b""
        # The API has no byte offset: read all and cut (kubelet rotation bounds the size).
        data = response.data
        data = data[max(0, offset) :]
        return data if limit is None else data[:limit]

    def read_metrics(self, run_id: str, offset: int) -> list[dict[str, Any]]:
        """See Backend.read_metrics (the metrics file is on the shared volume)."""
        job = self._known(run_id)
        path = self._workspace_dir(job) / "state" / "metrics" / manifests.METRICS_FILE
        records, self._metric_positions[run_id] = read_metric_records(
            path, offset, self._metric_positions.get(run_id, (0, 0))
        )
        return records

    def outputs(self, run_id: str) -> list[OutputFile]:
        """See Backend.outputs (the output directory is on the shared volume)."""
        job = self._known(run_id)
        current = self.status(run_id)
        if current is None or not current.finished:
            raise Conflict("the run has not finished", details={"run_id": run_id})
        root = self._workspace_dir(job) / "output"
        return output_files(root)

    # --- lifecycle -------------------------------------------------------------------------

    def _remove(self, run_id: str) -> None:
        name = manifests.job_name(run_id)
        self._delete("delete job", self.batch.delete_namespaced_job, name)
        # Owned by the Job, so the garbage collector would delete them too — but not at once,
        # and a Secret must not outlive its run by a collector's delay.
        self._delete(
            "delete network policy", self.networking.delete_namespaced_network_policy, name
        )
        self._delete("delete secret", self.core.delete_namespaced_secret, name)

    def cleanup(self, run_id: str) -> None:
        """See Backend.cleanup: delete the Job (its pod with it), the NetworkPolicy and the
        Secret, and the workspace's scratch and state directories."""
        job = self._read_job(run_id)
        if job is None:
            return
        self._remove(run_id)
        workspace = self._workspace_dir(job)
        for part in ("scratch", "state"):
            shutil.rmtree(workspace / part, ignore_errors=True)
        self._metric_positions.pop(run_id, None)

    def recover(self) -> list[str]:
        """See Backend.recover: the run ids of every Job of ours in the namespace."""
        selector = f"{manifests.MANAGED_BY}={manifests.MANAGED_BY_VALUE}"
        listing = self._json(
            self._call(
                "list jobs", self.batch.list_namespaced_job, self._ns, label_selector=selector
            )
        )
        run_ids = {
            _annotations(job).get(manifests.RUN_ID_ANNOTATION) for job in listing.get("items", [])
        }
        return sorted(r for r in run_ids if r)


def _utc_now() -> str:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    return now.replace("+00:00", "Z")


def make_kubernetes_backend(
    settings: KubernetesSettings,
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    host: str | None = None,
) -> KubernetesBackend:
    """A backend talking to the cluster of KUBECONFIG (and CONTEXT), or — inside a pod with
    neither given — to the cluster the Data Plane agent runs in (its service account).
    HOST alone (no credentials, plain HTTP) is for the tests' fake API server."""
    from kubernetes import config

    configuration = k8s.Configuration()
    if host is not None:
        configuration.host = host
    elif kubeconfig is not None:
        config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=configuration
        )
    else:
        config.load_incluster_config(client_configuration=configuration)
    return KubernetesBackend(k8s.ApiClient(configuration), settings)
