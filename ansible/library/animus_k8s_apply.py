#!/usr/bin/python
"""Ansible module ``animus_k8s_apply``: server-side apply of Kubernetes objects.

It talks to the API server with the official ``kubernetes`` Python client (a dependency of
the appliance, so the bundle's virtualenv has it). Each object is first applied with
``dryRun=All``; only when the server's answer differs from the live object is it applied
for real. That makes a second run report no change and gives check mode for free.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
---
module: animus_k8s_apply
short_description: Server-side apply Kubernetes objects of Animus Datalab
description:
  - Applies each manifest with server-side apply (field manager O(field_manager)).
  - A server-side dry run decides whether the object would change; unchanged objects are
    not written, so a repeated run reports C(changed=false).
  - Supports check mode (only the dry run is sent).
  - Knows the kinds the installer applies (Namespace, ServiceAccount, ConfigMap, Secret,
    Service, PersistentVolume, PersistentVolumeClaim, ResourceQuota, Deployment, DaemonSet,
    NetworkPolicy, Role, RoleBinding); any other kind is refused.
options:
  manifests:
    description: The objects to apply, in order. Secrets among them carry no values.
    type: list
    elements: dict
    required: true
  secret_data:
    description:
      - The values of the Secrets, kept apart from O(manifests) so that Ansible keeps them
        out of every log and result. Keys are C(namespace/name) of a Secret in
        O(manifests); values are its C(data) (base64 strings by key).
    type: dict
    default: {}
  kubeconfig:
    description: Path of a kubeconfig file. Without it, the in-cluster service account.
    type: path
  context:
    description: The kubeconfig context to use (default its current context).
    type: str
  field_manager:
    description: The field manager name recorded by the API server.
    type: str
    default: animus-installer
author:
  - Animus Datalab
"""

EXAMPLES = r"""
- name: Apply the control plane objects
  animus_k8s_apply:
    kubeconfig: /root/.kube/config
    manifests: "{{ lookup('template', 'control-plane.yml.j2') | from_yaml_all | list }}"
"""

RETURN = r"""
objects:
  description: One entry per manifest with its kind, namespace, name and result
    (C(created), C(configured) or C(unchanged)).
  returned: always
  type: list
  elements: dict
"""

#: (apiVersion, kind) -> (API path prefix, resource plural, namespaced)
RESOURCES: dict[tuple[str, str], tuple[str, str, bool]] = {
    ("v1", "Namespace"): ("/api/v1", "namespaces", False),
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts", True),
    ("v1", "ConfigMap"): ("/api/v1", "configmaps", True),
    ("v1", "Secret"): ("/api/v1", "secrets", True),
    ("v1", "Service"): ("/api/v1", "services", True),
    ("v1", "PersistentVolume"): ("/api/v1", "persistentvolumes", False),
    ("v1", "PersistentVolumeClaim"): ("/api/v1", "persistentvolumeclaims", True),
    ("v1", "ResourceQuota"): ("/api/v1", "resourcequotas", True),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments", True),
    ("apps/v1", "DaemonSet"): ("/apis/apps/v1", "daemonsets", True),
    ("networking.k8s.io/v1", "NetworkPolicy"): (
        "/apis/networking.k8s.io/v1",
        "networkpolicies",
        True,
    ),
    ("rbac.authorization.k8s.io/v1", "Role"): (
        "/apis/rbac.authorization.k8s.io/v1",
        "roles",
        True,
    ),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): (
        "/apis/rbac.authorization.k8s.io/v1",
        "rolebindings",
        True,
    ),
}

#: Fields the API server maintains itself; they never count as a change.
_SERVER_METADATA = (
    "resourceVersion",
    "managedFields",
    "generation",
    "creationTimestamp",
    "uid",
    "selfLink",
)


class ApplyError(Exception):
    """The API server refused a request, or a manifest cannot be applied."""


def object_path(manifest: dict[str, Any]) -> str:
    """The API path of MANIFEST's object."""
    key = (manifest.get("apiVersion"), manifest.get("kind"))
    if key not in RESOURCES:
        raise ApplyError(f"this module does not apply {key[1]} ({key[0]}) objects")
    prefix, plural, namespaced = RESOURCES[key]  # type: ignore[index]
    metadata = manifest.get("metadata") or {}
    name = metadata.get("name")
    if not name:
        raise ApplyError(f"a {key[1]} has no metadata.name")
    if namespaced:
        namespace = metadata.get("namespace")
        if not namespace:
            raise ApplyError(f"{key[1]} {name} has no metadata.namespace")
        return f"{prefix}/namespaces/{namespace}/{plural}/{name}"
    return f"{prefix}/{plural}/{name}"


def comparable(obj: dict[str, Any] | None) -> dict[str, Any] | None:
    """OBJ without what the server changes on its own (status, versions, timestamps)."""
    if obj is None:
        return None
    result = copy.deepcopy(obj)
    result.pop("status", None)
    metadata = result.get("metadata") or {}
    for field in _SERVER_METADATA:
        metadata.pop(field, None)
    annotations = metadata.get("annotations") or {}
    annotations.pop("deployment.kubernetes.io/revision", None)
    if not annotations:
        metadata.pop("annotations", None)
    return result


def with_secret_data(
    manifests: list[dict[str, Any]], secret_data: dict[str, dict[str, str]]
) -> list[dict[str, Any]]:
    """MANIFESTS with each Secret's ``data`` filled from SECRET_DATA (``namespace/name`` →
    data); every entry of SECRET_DATA must name a Secret of MANIFESTS."""
    result, used = [], set()
    for manifest in manifests:
        metadata = manifest.get("metadata") or {}
        key = f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"
        if manifest.get("kind") == "Secret" and key in secret_data:
            manifest = copy.deepcopy(manifest)
            manifest["data"] = {**(manifest.get("data") or {}), **secret_data[key]}
            used.add(key)
        result.append(manifest)
    unknown = sorted(set(secret_data) - used)
    if unknown:
        raise ApplyError(f"secret_data names no Secret of the manifests: {', '.join(unknown)}")
    return result


class Cluster:
    """The few API calls server-side apply needs, on the official client."""

    def __init__(self, kubeconfig: str | None, context: str | None, field_manager: str):
        from kubernetes import client, config

        configuration = client.Configuration()
        if kubeconfig:
            config.load_kube_config(
                config_file=kubeconfig, context=context, client_configuration=configuration
            )
        else:
            config.load_incluster_config(client_configuration=configuration)
        self.api = client.ApiClient(configuration)
        self.field_manager = field_manager

    def _call(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]] | None = None,
        body: dict[str, Any] | None = None,
    ) -> tuple[int, dict[str, Any] | None]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/apply-patch+yaml"
        request = self.api.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*request)
        raw = response.read()
        data = json.loads(raw) if raw else None
        return response.status, data

    def get(self, path: str) -> dict[str, Any] | None:
        """The live object at PATH, or None."""
        status, data = self._call("GET", path)
        if status == 404:
            return None
        if status != 200:
            raise ApplyError(_failure("reading", path, status, data))
        return data

    def apply(self, path: str, manifest: dict[str, Any], *, dry_run: bool) -> dict[str, Any]:
        """Server-side apply MANIFEST at PATH; the object as the server stores (or would
        store) it."""
        query = [("fieldManager", self.field_manager), ("force", "true")]
        if dry_run:
            query.append(("dryRun", "All"))
        status, data = self._call("PATCH", path, query, manifest)
        if status not in (200, 201) or data is None:
            raise ApplyError(_failure("applying", path, status, data))
        return data


def _failure(action: str, path: str, status: int, data: dict[str, Any] | None) -> str:
    message = (data or {}).get("message") or ""
    return f"{action} {path}: the API server answered {status} {message}".rstrip()


def apply_all(
    cluster: Cluster, manifests: list[dict[str, Any]], *, check_mode: bool
) -> list[dict[str, Any]]:
    """Apply MANIFESTS in order; one result entry per manifest."""
    results = []
    namespaces: dict[str, bool] = {}
    for manifest in manifests:
        path = object_path(manifest)
        metadata = manifest["metadata"]
        namespace = metadata.get("namespace")
        if check_mode and namespace and namespace not in namespaces:
            namespaces[namespace] = cluster.get(f"/api/v1/namespaces/{namespace}") is not None
        if check_mode and namespace and not namespaces[namespace]:
            # Check mode created no namespace, and the API server refuses even a dry run in
            # a namespace that does not exist: everything in it is still to be created.
            action = "created"
        else:
            live = cluster.get(path)
            predicted = cluster.apply(path, manifest, dry_run=True)
            if live is None:
                action = "created"
            elif comparable(predicted) != comparable(live):
                action = "configured"
            else:
                action = "unchanged"
            if action != "unchanged" and not check_mode:
                cluster.apply(path, manifest, dry_run=False)
        results.append(
            {
                "kind": manifest["kind"],
                "namespace": metadata.get("namespace", ""),
                "name": metadata["name"],
                "result": action,
            }
        )
    return results


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "manifests": {"type": "list", "elements": "dict", "required": True},
            "secret_data": {"type": "dict", "default": {}, "no_log": True},
            "kubeconfig": {"type": "path"},
            "context": {"type": "str"},
            "field_manager": {"type": "str", "default": "animus-installer"},
        },
        supports_check_mode=True,
    )
    try:
        cluster = Cluster(
            module.params["kubeconfig"], module.params["context"], module.params["field_manager"]
        )
        manifests = with_secret_data(module.params["manifests"], module.params["secret_data"])
        results = apply_all(cluster, manifests, check_mode=module.check_mode)
    except ApplyError as exc:
        module.fail_json(msg=str(exc))
    except Exception as exc:
        # A kubeconfig that does not load, a server that does not answer: one clear line.
        module.fail_json(msg=f"cannot reach the Kubernetes API server: {exc}")
    changed = any(r["result"] != "unchanged" for r in results)
    module.exit_json(changed=changed, objects=results)


if __name__ == "__main__":
    main()
