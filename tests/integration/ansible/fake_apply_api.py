"""A FAKE Kubernetes API server for the installer's ``animus_k8s_apply`` module: no real
one can run on this machine (DESIGN §10).

It serves over real HTTP exactly what the module calls — GET of one object and server-side
apply (``PATCH`` with ``application/apply-patch+yaml``, ``fieldManager``, ``force``,
``dryRun=All``) — so the official ``kubernetes`` client is exercised end to end. Like a
real API server it requires the bearer token, refuses an object that does not validate
against the official Kubernetes schemas (``kubernetes-validate``, strict), refuses a
namespaced object whose namespace does not exist, fills in fields of its own (a Service's
clusterIP, a Deployment's defaults and status, managedFields with the time of each apply)
and changes nothing on a dry run.
"""

from __future__ import annotations

import copy
import json
import threading
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate

KUBERNETES_VERSION = "1.30.0"
TOKEN = "fake-cluster-token"

#: (path prefix, plural) -> (apiVersion, kind, namespaced)
RESOURCES = {
    ("/api/v1", "namespaces"): ("v1", "Namespace", False),
    ("/api/v1", "persistentvolumes"): ("v1", "PersistentVolume", False),
    ("/api/v1", "serviceaccounts"): ("v1", "ServiceAccount", True),
    ("/api/v1", "configmaps"): ("v1", "ConfigMap", True),
    ("/api/v1", "secrets"): ("v1", "Secret", True),
    ("/api/v1", "services"): ("v1", "Service", True),
    ("/api/v1", "persistentvolumeclaims"): ("v1", "PersistentVolumeClaim", True),
    ("/api/v1", "resourcequotas"): ("v1", "ResourceQuota", True),
    ("/apis/apps/v1", "deployments"): ("apps/v1", "Deployment", True),
    ("/apis/apps/v1", "daemonsets"): ("apps/v1", "DaemonSet", True),
    ("/apis/networking.k8s.io/v1", "networkpolicies"): (
        "networking.k8s.io/v1",
        "NetworkPolicy",
        True,
    ),
    ("/apis/rbac.authorization.k8s.io/v1", "roles"): (
        "rbac.authorization.k8s.io/v1",
        "Role",
        True,
    ),
    ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"): (
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
        True,
    ),
}


def _status(code: int, reason: str, message: str) -> tuple[int, dict[str, Any]]:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code}
    return code, {**body, "reason": reason, "message": message}


def _without_server_fields(obj: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(obj)
    result.pop("status", None)
    for name in ("resourceVersion", "managedFields", "uid", "creationTimestamp", "generation"):
        result["metadata"].pop(name, None)
    return result


class FakeApplyAPI:
    """The fake cluster's objects and the HTTP server answering for them."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        #: (method, path, query) of every request, in order.
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        #: Every object body the server accepted in an apply (dry run or not).
        self.applied: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._version = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                with fake.lock:
                    fake.requests.append((method, url.path, query))
                    if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                        status, answer = _status(401, "Unauthorized", "Unauthorized")
                    else:
                        status, answer = fake.dispatch(
                            method, url.path, query, self.headers.get("Content-Type", ""), raw
                        )
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_PATCH(self) -> None:
                self._handle("PATCH")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> FakeApplyAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self) -> str:
        """A kubeconfig naming this server and its bearer token."""
        return json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                "users": [{"name": "installer", "user": {"token": TOKEN}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "installer"}}],
                "current-context": "fake",
            }
        )

    # --- routing -----------------------------------------------------------------------------

    def _route(self, path: str) -> tuple[str, str, str, str, bool] | None:
        """(apiVersion, kind, namespace, name, namespaced) of an object path."""
        for (prefix, plural), (api_version, kind, namespaced) in RESOURCES.items():
            if namespaced:
                head = f"{prefix}/namespaces/"
                if not path.startswith(head):
                    continue
                parts = path[len(head) :].split("/")
                if len(parts) == 3 and parts[1] == plural:
                    return api_version, kind, parts[0], parts[2], True
            else:
                parts = path[len(prefix) + 1 :].split("/") if path.startswith(prefix) else []
                if len(parts) == 2 and parts[0] == plural:
                    return api_version, kind, "", parts[1], False
        return None

    def dispatch(
        self, method: str, path: str, query: dict[str, str], content_type: str, raw: bytes
    ) -> tuple[int, dict[str, Any]]:
        """Answer one request (under the lock)."""
        route = self._route(path)
        if route is None:
            return _status(404, "NotFound", f"the fake API server does not serve {path}")
        api_version, kind, namespace, name, namespaced = route
        key = (kind, namespace, name)
        if method == "GET":
            if key not in self.objects:
                return _status(404, "NotFound", f"{kind} {name} not found")
            return 200, self.objects[key]
        if content_type != "application/apply-patch+yaml":
            return _status(415, "UnsupportedMediaType", f"{content_type} is not an apply patch")
        if not query.get("fieldManager"):
            return _status(422, "Invalid", "fieldManager is required for apply requests")
        body = json.loads(raw)
        metadata = body.get("metadata") or {}
        if (body.get("apiVersion"), body.get("kind"), metadata.get("name")) != (
            api_version,
            kind,
            name,
        ) or metadata.get("namespace", "") != namespace:
            return _status(400, "BadRequest", "the object does not match the request path")
        if namespaced and ("Namespace", "", namespace) not in self.objects:
            return _status(404, "NotFound", f'namespaces "{namespace}" not found')
        try:
            kubernetes_validate.validate(body, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return _status(422, "Invalid", f"{kind} {name}: {exc.message}")
        self.applied.append(copy.deepcopy(body))
        existed = key in self.objects
        stored = self._apply(key, body, query.get("fieldManager", ""))
        if query.get("dryRun") != "All":
            self.objects[key] = stored
        return (200 if existed else 201), stored

    def _apply(self, key: tuple[str, str, str], body: dict[str, Any], manager: str):
        """The object as it is after applying BODY (one field manager: BODY replaces it)."""
        live = self.objects.get(key)
        result = copy.deepcopy(body)
        now = datetime.now(UTC).isoformat()
        metadata = result["metadata"]
        if live is None:
            self._version += 1
            metadata.update(
                {
                    "uid": str(uuid.uuid4()),
                    "creationTimestamp": now,
                    "resourceVersion": str(self._version),
                    "generation": 1,
                }
            )
        else:
            for name in ("uid", "creationTimestamp", "resourceVersion", "generation"):
                metadata[name] = live["metadata"][name]
        metadata["managedFields"] = [
            {
                "manager": manager,
                "operation": "Apply",
                "apiVersion": body["apiVersion"],
                "time": now,
            }
        ]
        kind = key[0]
        if kind == "Service":
            cluster_ip = (live or {}).get("spec", {}).get("clusterIP") or "10.96.0.10"
            result["spec"]["clusterIP"] = cluster_ip
        if kind == "Deployment":
            result["spec"].setdefault("revisionHistoryLimit", 10)
            result["spec"].setdefault("progressDeadlineSeconds", 600)
        if live is not None and _without_server_fields(live) != _without_server_fields(result):
            self._version += 1
            metadata["resourceVersion"] = str(self._version)
            metadata["generation"] = live["metadata"]["generation"] + 1
        if kind == "Deployment":
            result["status"] = {"observedGeneration": metadata["generation"], "replicas": 0}
        return result

    # --- what tests read -------------------------------------------------------------------

    def object_keys(self) -> set[tuple[str, str, str]]:
        """(kind, namespace, name) of every object in the fake cluster."""
        with self.lock:
            return set(self.objects)

    def writes(self) -> list[tuple[str, str]]:
        """(method, path) of every request that changed the cluster (an apply, not dry run)."""
        with self.lock:
            return [(m, p) for m, p, q in self.requests if m == "PATCH" and "dryRun" not in q]
