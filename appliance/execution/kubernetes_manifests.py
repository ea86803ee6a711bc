"""The Kubernetes objects of one Run, rendered from its execution snapshot (no I/O here).

One Run is a Job (one pod, never retried), a NetworkPolicy selecting that pod, and — when the
Run has secrets — a Secret; the NetworkPolicy and the Secret carry an owner reference to the
Job, so deleting the Job takes them along. The pod gets the sandbox of DESIGN §7 in
Kubernetes terms: non-root, read-only root filesystem, no capabilities, no privilege
escalation, ``RuntimeDefault`` seccomp, no service account token, CPU and memory limits, and
a wall-clock deadline.

Files: the Data Plane agent prepares each run's workspace (``Workspace``) on a volume that
is also a PersistentVolumeClaim in the runs' namespace; the pod mounts the parts it needs
from that claim with ``subPath`` (inputs and code read-only, output and metrics writable).
docs/kubernetes.md describes the layout and what it does not do.

Every function here is pure: the backend (``kubernetes_backend``) and
``animus dataplane render`` call the same ones, and the unit tests validate their results
against the official Kubernetes schemas.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from appliance.errors import AnimusError
from appliance.execution.backend import refused, relative_path
from appliance.execution.runc_backend import frame_secrets
from appliance.images.registry import parse_reference

__all__ = [
    "KubernetesSettings",
    "job_manifest",
    "job_name",
    "namespace_manifests",
    "network_policy_manifest",
    "owner_reference",
    "render_manifests",
    "secret_manifest",
]

AGENT_PATH = "/opt/animus/run_agent.py"
AGENT_PYTHON = "/usr/bin/python3"
CODE_MOUNT = "/code"
INPUTS_MOUNT = "/inputs"
OUTPUT_MOUNT = "/output"
STATE_MOUNT = "/state"
SCRATCH_MOUNT = "/scratch"
SECRETS_MOUNT = "/run/secrets"
#: Where the Secret volume is mounted; only the launcher reads it (see LAUNCHER).
SECRETS_IN_MOUNT = "/var/run/animus/secrets-in"
SECRETS_KEY = "frames"
TERMINATION_LOG = "/dev/termination-log"
METRICS_FILE = "metrics.jsonl"
STATUS_FD = 3

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "animus-dataplane"
RUN_LABEL = "animus.io/run"
RUN_ID_ANNOTATION = "animus.io/run-id"
WORKSPACE_ANNOTATION = "animus.io/workspace"
TIMEOUT_ANNOTATION = "animus.io/timeout-seconds"

#: The run agent reads secrets from stdin and writes its outcome to descriptor 3 (both as
#: under runc). A pod has neither a pipe nor a host file to offer, so this launcher — the
#: container's command, run by the image's Python before the agent — opens the Secret's
#: framed payload as stdin and the termination-message file as descriptor 3, then execs the
#: agent. The kubelet reports that file back as the container's termination message; without
#: it the run still runs (the kubelet's exit code is what decides success anyway).
LAUNCHER = (
    "import os,sys\n"
    "try:\n"
    f"    fd=os.open({TERMINATION_LOG!r},os.O_WRONLY|os.O_TRUNC)\n"
    "except OSError:\n"
    "    fd=os.open('/dev/null',os.O_WRONLY)\n"
    # dup2 onto itself (fd already 3) keeps close-on-exec: mark it inheritable either way.
    f"os.dup2(fd,{STATUS_FD})\n"
    f"os.set_inheritable({STATUS_FD},True)\n"
    "if sys.argv[1]=='--with-secrets':\n"
    f"    s=os.open({SECRETS_IN_MOUNT + '/' + SECRETS_KEY!r},os.O_RDONLY)\n"
    "    os.dup2(s,0)\n"
    "    os.set_inheritable(0,True)\n"
    "os.execv(sys.executable,[sys.executable,'-I','-S',*sys.argv[2:]])\n"
)

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SLUG = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class KubernetesSettings:
    """Where and how the runs of one Data Plane are placed in the cluster.

    ``registry`` is the only registry images may come from (``host[:port]``);
    ``workspace_claim`` the PersistentVolumeClaim holding every workspace, which the Data
    Plane agent itself sees at ``workspace_mount``; ``run_as_user``/``run_as_group`` the
    numeric user of the runner images (Kubernetes can only prove non-root for numeric ids).
    """

    namespace: str = "animus-runs"
    registry: str = "registry.animus.local:5000"
    workspace_claim: str = "animus-workspaces"
    workspace_mount: str = "/var/lib/animus/workspaces"
    run_as_user: int = 1000
    run_as_group: int = 1000
    kill_grace_seconds: int = 5
    log_limit_bytes: int = 1 << 30
    scratch_size: str = "1Gi"
    tmp_size: str = "64Mi"
    #: Extra time after ``timeout_seconds`` before Kubernetes kills the pod itself: the run
    #: agent enforces the timeout and records the outcome; the deadline is the backstop for
    #: a wedged agent and for a pod that never got to start.
    deadline_margin_seconds: int = 60

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> KubernetesSettings:
        """Settings from ``ANIMUS_K8S_*`` variables (docs/kubernetes.md); unset ones keep
        their defaults."""
        defaults = cls()
        text = {
            "namespace": "ANIMUS_K8S_NAMESPACE",
            "registry": "ANIMUS_K8S_REGISTRY",
            "workspace_claim": "ANIMUS_K8S_WORKSPACE_CLAIM",
            "workspace_mount": "ANIMUS_K8S_WORKSPACE_MOUNT",
            "scratch_size": "ANIMUS_K8S_SCRATCH_SIZE",
        }
        numbers = {
            "run_as_user": "ANIMUS_K8S_RUN_AS_USER",
            "run_as_group": "ANIMUS_K8S_RUN_AS_GROUP",
            "kill_grace_seconds": "ANIMUS_K8S_KILL_GRACE_SECONDS",
        }
        values: dict[str, Any] = {
            field: environ.get(variable, getattr(defaults, field))
            for field, variable in text.items()
        }
        for field, variable in numbers.items():
            values[field] = int(environ.get(variable, getattr(defaults, field)))
        if values["run_as_user"] == 0 or values["run_as_group"] == 0:
            raise ValueError("runs never run as root: ANIMUS_K8S_RUN_AS_USER/GROUP must not be 0")
        return cls(**values)


def job_name(run_id: str) -> str:
    """The Job's name for RUN_ID: a readable DNS label with a hash that keeps distinct run
    ids apart (``Run_1`` and ``run-1`` must not collide); pod names add 6 characters."""
    if not _RUN_ID.fullmatch(run_id):
        raise refused("invalid_snapshot", "the run id is not valid")
    slug = _SLUG.sub("-", run_id.lower()).strip("-")[:30].strip("-") or "run"
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:10]
    return f"run-{slug}-{digest}"


def _labels(run_id: str) -> dict[str, str]:
    return {MANAGED_BY: MANAGED_BY_VALUE, RUN_LABEL: job_name(run_id)}


def _metadata(run_id: str, settings: KubernetesSettings, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": settings.namespace,
        "labels": _labels(run_id),
        "annotations": {RUN_ID_ANNOTATION: run_id},
    }


def owner_reference(job: dict[str, Any]) -> dict[str, Any]:
    """An owner reference to JOB (as read back from the API server, with its uid): the
    garbage collector deletes the owned object together with the Job."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": job["metadata"]["name"],
        "uid": job["metadata"]["uid"],
        "controller": False,
        "blockOwnerDeletion": False,
    }


def _plain_env(snapshot: dict[str, Any]) -> list[dict[str, str]]:
    env = {"HOME": SCRATCH_MOUNT, "TMPDIR": SCRATCH_MOUNT}
    for name, value in (snapshot.get("env") or {}).items():
        if not _ENV_NAME.fullmatch(str(name)) or not isinstance(value, str):
            raise refused("invalid_snapshot", "an environment variable is malformed")
        if name.startswith("ANIMUS_"):
            raise refused("invalid_snapshot", "ANIMUS_* environment variables are reserved")
        env[name] = value
    env.update(
        {
            "ANIMUS_RUN_ID": str(snapshot["run_id"]),
            "ANIMUS_OUTPUT_DIR": OUTPUT_MOUNT,
            "ANIMUS_METRICS_FILE": f"{STATE_MOUNT}/{METRICS_FILE}",
            "ANIMUS_INPUTS_DIR": INPUTS_MOUNT,
            "ANIMUS_CODE_DIR": CODE_MOUNT,
            "ANIMUS_SECRETS_DIR": SECRETS_MOUNT,
        }
    )
    return [{"name": k, "value": v} for k, v in env.items()]


def secret_names(snapshot: dict[str, Any]) -> list[str]:
    """The snapshot's secret names, checked."""
    names = []
    for name in snapshot.get("secrets") or []:
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise refused("invalid_snapshot", "a secret name is malformed")
        names.append(name)
    return names


def _image(snapshot: dict[str, Any], settings: KubernetesSettings) -> str:
    try:
        reference = parse_reference(str(snapshot.get("image", "")))
        reference.pinned()
    except AnimusError:
        raise refused("invalid_snapshot", "the image must be pinned by digest") from None
    if reference.registry != settings.registry or reference.tag:
        raise refused("invalid_snapshot", "the image is not in this Data Plane's registry")
    return f"{reference.registry}/{reference.repository}@{reference.digest}"


def _quantities(resources: dict[str, Any]) -> dict[str, str]:
    cpu = float(resources.get("cpu") or 1)
    memory_mb = int(resources.get("memory_mb") or 2048)
    return {"cpu": f"{max(1, math.ceil(cpu * 1000))}m", "memory": f"{memory_mb}Mi"}


def _timeout(snapshot: dict[str, Any]) -> float:
    return float((snapshot.get("resources") or {}).get("timeout_seconds") or 0)


def _workspace_path(workspace: str, *parts: str) -> str:
    return str(PurePosixPath(workspace, *parts))


def job_manifest(
    snapshot: dict[str, Any],
    settings: KubernetesSettings,
    workspace: str,
    *,
    suspend: bool = True,
) -> dict[str, Any]:
    """The Job running SNAPSHOT. WORKSPACE is the run's workspace directory relative to the
    root of ``settings.workspace_claim`` (the ``subPath`` prefix of every mount).

    Rendered suspended by default: the backend creates the NetworkPolicy and the Secret,
    which need the Job's uid for their owner reference, before any pod may start.
    """
    run_id = str(snapshot.get("run_id", ""))
    name = job_name(run_id)
    relative_path(workspace, "the workspace path")
    command = snapshot.get("command")
    if not command or not all(isinstance(a, str) for a in command):
        raise refused("invalid_snapshot", "the command must be a non-empty list of strings")
    code = snapshot.get("code") or {}
    code_path = relative_path(str(code.get("path") or ""), "the code path")
    timeout = _timeout(snapshot)
    secrets = secret_names(snapshot)
    quantities = _quantities(snapshot.get("resources") or {})

    agent_args = [f"--timeout={timeout}", f"--kill-grace={settings.kill_grace_seconds}"]
    agent_args += [f"--log-limit={settings.log_limit_bytes}", f"--status-fd={STATUS_FD}"]
    if secrets:
        agent_args += ["--secrets-stdin", f"--secrets-dir={SECRETS_MOUNT}"]
    launcher_mode = "--with-secrets" if secrets else "--without-secrets"

    mounts: list[dict[str, Any]] = [
        {
            "name": "workspace",
            "mountPath": CODE_MOUNT,
            "subPath": _workspace_path(workspace, "code"),
            "readOnly": True,
        },
        {
            "name": "workspace",
            "mountPath": OUTPUT_MOUNT,
            "subPath": _workspace_path(workspace, "output"),
        },
        {
            "name": "workspace",
            "mountPath": STATE_MOUNT,
            "subPath": _workspace_path(workspace, "state", "metrics"),
        },
        {"name": "scratch", "mountPath": SCRATCH_MOUNT},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a private emptyDir
        {"name": "run-secrets", "mountPath": SECRETS_MOUNT},
    ]
    for item in sorted(snapshot.get("inputs") or [], key=lambda i: str(i["name"])):
        input_name = str(item["name"])
        relative_path(input_name, "an input name")
        if "/" in input_name or input_name in ("", "."):
            raise refused("invalid_snapshot", "an input name must be one path component")
        mounts.append(
            {
                "name": "workspace",
                "mountPath": f"{INPUTS_MOUNT}/{input_name}",
                "subPath": _workspace_path(workspace, "inputs", input_name),
                "readOnly": True,
            }
        )
    volumes: list[dict[str, Any]] = [
        {
            "name": "workspace",
            "persistentVolumeClaim": {"claimName": settings.workspace_claim},
        },
        {"name": "scratch", "emptyDir": {"sizeLimit": settings.scratch_size}},
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": settings.tmp_size}},
        # The run agent writes each secret here; memory-backed, gone with the pod.
        {"name": "run-secrets", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
    ]
    if secrets:
        mounts.append({"name": "secrets-in", "mountPath": SECRETS_IN_MOUNT, "readOnly": True})
        volumes.append(
            {
                "name": "secrets-in",
                # 0440 plus fsGroup: readable by the run's group only, never writable.
                "secret": {"secretName": name, "defaultMode": 0o440, "optional": False},
            }
        )

    seccomp = {"type": "RuntimeDefault"}
    container = {
        "name": "run",
        "image": _image(snapshot, settings),
        "imagePullPolicy": "IfNotPresent",
        "command": [AGENT_PYTHON, "-I", "-S", "-c", LAUNCHER, launcher_mode],
        "args": [AGENT_PATH, *agent_args, "--", *command],
        "workingDir": str(PurePosixPath(CODE_MOUNT, code_path)),
        "env": _plain_env(snapshot),
        "resources": {"requests": dict(quantities), "limits": dict(quantities)},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_group,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": seccomp,
        },
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
    }
    metadata = _metadata(run_id, settings, name)
    metadata["annotations"][WORKSPACE_ANNOTATION] = workspace
    metadata["annotations"][TIMEOUT_ANNOTATION] = str(timeout)
    spec: dict[str, Any] = {
        "suspend": suspend,
        "backoffLimit": 0,
        "completions": 1,
        "parallelism": 1,
        "template": {
            "metadata": {"labels": _labels(run_id), "annotations": {RUN_ID_ANNOTATION: run_id}},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "hostNetwork": False,
                "hostPID": False,
                "hostIPC": False,
                "terminationGracePeriodSeconds": settings.kill_grace_seconds + 5,
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": settings.run_as_user,
                    "runAsGroup": settings.run_as_group,
                    "fsGroup": settings.run_as_group,
                    "seccompProfile": seccomp,
                },
                "containers": [container],
                "volumes": volumes,
            },
        },
    }
    if timeout:
        spec["activeDeadlineSeconds"] = math.ceil(
            timeout + 2 * settings.kill_grace_seconds + settings.deadline_margin_seconds
        )
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def _egress_rules(snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    """The snapshot's egress allow-list as NetworkPolicy rules.

    A NetworkPolicy matches addresses, not names: an entry that is not an IP address
    (``10.1.2.3`` or ``10.1.2.3:443``) cannot be enforced here and is refused.
    """
    rules = []
    for entry in (snapshot.get("network") or {}).get("egress") or []:
        host, _, port = str(entry).partition(":")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise refused(
                "egress_not_allowed",
                "a Kubernetes NetworkPolicy can only allow egress to IP addresses",
                entry=str(entry),
            ) from None
        prefix = 32 if address.version == 4 else 128
        rule: dict[str, Any] = {"to": [{"ipBlock": {"cidr": f"{address}/{prefix}"}}]}
        if port:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise refused("invalid_snapshot", "an egress port is malformed")
            rule["ports"] = [{"protocol": "TCP", "port": int(port)}]
        rules.append(rule)
    return rules


def network_policy_manifest(
    snapshot: dict[str, Any],
    settings: KubernetesSettings,
    owner: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The NetworkPolicy of the run's pod: no ingress, and no egress except the snapshot's
    ``network.egress`` addresses (none by default). OWNER is the created Job."""
    run_id = str(snapshot.get("run_id", ""))
    metadata = _metadata(run_id, settings, job_name(run_id))
    if owner is not None:
        metadata["ownerReferences"] = [owner_reference(owner)]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": {
            "podSelector": {"matchLabels": {RUN_LABEL: job_name(run_id)}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": _egress_rules(snapshot),
        },
    }


def secret_manifest(
    snapshot: dict[str, Any],
    settings: KubernetesSettings,
    values: dict[str, str] | None = None,
    owner: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The run's Secret (immutable, one key holding every value framed for the run agent),
    or None when the run has no secrets. Without VALUES the data is empty frames: the shape
    only, for ``animus dataplane render``."""
    names = secret_names(snapshot)
    if not names:
        return None
    run_id = str(snapshot.get("run_id", ""))
    if values is None:
        chosen = dict.fromkeys(names, "")
    else:
        missing = [n for n in names if n not in values]
        if missing:
            raise refused("invalid_snapshot", f"no value was provided for secret {missing[0]}")
        chosen = {n: values[n] for n in names}
    metadata = _metadata(run_id, settings, job_name(run_id))
    if owner is not None:
        metadata["ownerReferences"] = [owner_reference(owner)]
    payload = base64.b64encode(frame_secrets(chosen)).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": "Opaque",
        "immutable": True,
        "data": {SECRETS_KEY: payload},
    }


def render_manifests(
    snapshot: dict[str, Any],
    settings: KubernetesSettings | None = None,
    workspace: str | None = None,
) -> list[dict[str, Any]]:
    """Every object of the run — Job, NetworkPolicy, Secret (if any) — as the backend would
    create them, with placeholders for what only the cluster knows (the Job's uid) and
    without secret values. For ``animus dataplane render --backend kubernetes``."""
    settings = settings or KubernetesSettings()
    run_id = str(snapshot.get("run_id", ""))
    workspace = workspace or job_name(run_id)
    job = job_manifest(snapshot, settings, workspace, suspend=False)
    placeholder = {"metadata": {"name": job["metadata"]["name"], "uid": "<job uid>"}}
    manifests = [job, network_policy_manifest(snapshot, settings, owner=placeholder)]
    secret = secret_manifest(snapshot, settings, owner=placeholder)
    if secret is not None:
        manifests.append(secret)
    return manifests


def namespace_manifests(
    settings: KubernetesSettings,
    *,
    agent_namespace: str = "animus",
    agent_service_account: str = "animus-dataplane",
) -> list[dict[str, Any]]:
    """The runs' namespace, once per Data Plane (applied by the installer, not the agent):
    Pod Security ``restricted`` enforced, a default deny-all NetworkPolicy under the
    per-run ones, and a Role letting the Data Plane agent's service account do exactly
    what the backend does — nothing like exec, attach or reading other namespaces."""
    namespace = settings.namespace
    labels = {MANAGED_BY: MANAGED_BY_VALUE}
    security = {
        f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "audit", "warn")
    }
    crud = ["create", "get", "list", "patch", "delete"]
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": namespace, "labels": {**labels, **security}},
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "default-deny-all", "namespace": namespace, "labels": labels},
            # No rules with both policy types: nothing in or out for any pod in the namespace.
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "animus-dataplane", "namespace": namespace, "labels": labels},
            "rules": [
                {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": crud},
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "delete"]},
                {
                    "apiGroups": ["networking.k8s.io"],
                    "resources": ["networkpolicies"],
                    "verbs": ["create", "get", "delete"],
                },
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "patch"]},
                {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "animus-dataplane", "namespace": namespace, "labels": labels},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "animus-dataplane",
            },
            "subjects": [
                {
                    "kind": "ServiceAccount",
                    "name": agent_service_account,
                    "namespace": agent_namespace,
                }
            ],
        },
    ]
