"""A FAKE Kubernetes API server: no real one can run on this machine (DESIGN §10).

It serves only what the Kubernetes backend calls — create/get/list/patch/delete Job,
create/get/delete Secret and NetworkPolicy, list pods by label, read a pod's log — over
real HTTP, so the official ``kubernetes`` client is exercised end to end. Every created
object is validated against the official Kubernetes 1.30 schemas (``kubernetes-validate``),
as an API server would reject a malformed one. It plays the Job controller, the kubelet and the
garbage collector just enough: resuming a Job makes a running pod, suspending it stops the
pod, a pod given an activeDeadlineSeconds stops, deleting a Job deletes what it owns. Tests end pods with ``finish_pod``.
"""

from __future__ import annotations

import copy
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate

KUBERNETES_VERSION = "1.30.0"
_NOW = "2026-01-01T00:00:00Z"

# (path prefix, plural) → kind of each collection, namespaced below /namespaces/<ns>/.
_COLLECTIONS = {
    ("/apis/batch/v1", "jobs"): "Job",
    ("/api/v1", "secrets"): "Secret",
    ("/apis/networking.k8s.io/v1", "networkpolicies"): "NetworkPolicy",
    ("/api/v1", "pods"): "Pod",
}


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """JSON merge patch (RFC 7386), which is all the backend's patches need."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _matches(obj: dict[str, Any], selector: str | None) -> bool:
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, (selector or "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeKubeAPI:
    """The objects of the fake cluster and the server answering for them."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.logs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        #: Kinds whose creation the fake refuses (HTTP 403), to test partial failures.
        self.refuse: set[str] = set()
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any, raw: bytes | None = None) -> None:
                data = raw if raw is not None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                with fake.lock:
                    fake.requests.append((method, url.path))
                    status, answer, raw = fake.dispatch(method, url.path, query, body)
                self._send(status, answer, raw)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PATCH(self) -> None:
                self._handle("PATCH")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> FakeKubeAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- routing ---------------------------------------------------------------------------

    @staticmethod
    def _status(code: int, reason: str, message: str) -> tuple[int, dict[str, Any], None]:
        body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code}
        return code, {**body, "reason": reason, "message": message}, None

    def dispatch(
        self, method: str, path: str, query: dict[str, str], body: Any
    ) -> tuple[int, Any, bytes | None]:
        """Route one request (under the lock)."""
        for (prefix, plural), kind in _COLLECTIONS.items():
            head = f"{prefix}/namespaces/"
            if not path.startswith(head):
                continue
            parts = path[len(head) :].split("/")
            if len(parts) < 2 or parts[1] != plural:
                continue
            namespace = parts[0]
            if len(parts) == 2 and method == "GET":
                return self._list(kind, namespace, query.get("labelSelector"))
            if len(parts) == 2 and method == "POST":
                return self._create(kind, namespace, body)
            key = (kind, namespace, parts[2])
            if len(parts) == 4 and kind == "Pod" and parts[3] == "log" and method == "GET":
                if key not in self.objects:
                    return self._status(404, "NotFound", "pod not found")
                return 200, None, self.logs.get(parts[2], b"")
            if len(parts) != 3:
                break
            if key not in self.objects:
                return self._status(404, "NotFound", f"{kind} {parts[2]} not found")
            if method == "GET":
                return 200, self.objects[key], None
            if method == "PATCH":
                _merge(self.objects[key], body)
                if kind == "Job":
                    self._control_job(key)
                if kind == "Pod":
                    self._kubelet(key)
                return 200, self.objects[key], None
            if method == "DELETE":
                self._delete(key)
                return 200, {"kind": "Status", "status": "Success"}, None
        return self._status(404, "NotFound", f"the fake API server does not serve {path}")

    def _list(self, kind: str, namespace: str, selector: str | None) -> tuple[int, Any, None]:
        items = [
            obj
            for (k, ns, _), obj in sorted(self.objects.items())
            if k == kind and ns == namespace and _matches(obj, selector)
        ]
        return 200, {"kind": f"{kind}List", "metadata": {}, "items": items}, None

    def _create(self, kind: str, namespace: str, body: dict[str, Any]) -> tuple[int, Any, None]:
        if kind in self.refuse:
            return self._status(403, "Forbidden", f"creating a {kind} is forbidden")
        try:
            kubernetes_validate.validate(body, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return self._status(422, "Invalid", str(exc.message))
        name = body["metadata"]["name"]
        key = (kind, namespace, name)
        if key in self.objects:
            return self._status(409, "AlreadyExists", f"{kind} {name} already exists")
        obj = copy.deepcopy(body)
        obj["metadata"].update(
            {"namespace": namespace, "uid": str(uuid.uuid4()), "creationTimestamp": _NOW}
        )
        self.objects[key] = obj
        if kind == "Job":
            obj["status"] = {}
            self._control_job(key)
        return 201, obj, None

    def _delete(self, key: tuple[str, str, str]) -> None:
        obj = self.objects.pop(key)
        uid = obj["metadata"]["uid"]
        # The garbage collector: whatever the deleted object owned goes with it.
        for other_key, other in list(self.objects.items()):
            owners = other["metadata"].get("ownerReferences") or []
            if other_key in self.objects and any(o.get("uid") == uid for o in owners):
                self._delete(other_key)

    # --- the Job controller, just enough ---------------------------------------------------

    def _pods_of(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        uid = job["metadata"]["uid"]
        return [
            pod
            for (kind, _, _), pod in self.objects.items()
            if kind == "Pod" and pod["metadata"]["ownerReferences"][0]["uid"] == uid
        ]

    def _control_job(self, key: tuple[str, str, str]) -> None:
        job = self.objects[key]
        pods = self._pods_of(job)
        if job["spec"].get("suspend"):
            for pod in pods:
                state = pod["status"]["containerStatuses"][0]["state"]
                if "running" in state:
                    state.clear()
                    state["terminated"] = {"exitCode": 143, "reason": "Error", "finishedAt": _NOW}
                    pod["status"]["phase"] = "Failed"
            job["status"]["active"] = 0
            return
        if pods or job["status"].get("conditions"):
            return
        template = job["spec"]["template"]
        name = f"{job['metadata']['name']}-{uuid.uuid4().hex[:5]}"
        self.objects[("Pod", key[1], name)] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": key[1],
                "uid": str(uuid.uuid4()),
                "creationTimestamp": _NOW,
                "labels": {**template["metadata"]["labels"], "job-name": key[2]},
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": key[2],
                        "uid": job["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": copy.deepcopy(template["spec"]),
            "status": {
                "phase": "Running",
                "containerStatuses": [
                    {"name": "run", "ready": True, "state": {"running": {"startedAt": _NOW}}}
                ],
            },
        }
        job["status"].update({"startTime": _NOW, "active": 1})

    def _kubelet(self, key: tuple[str, str, str]) -> None:
        """A pod whose activeDeadlineSeconds was set is stopped and kept, failed, with its
        Job marked failed (as the kubelet and the Job controller do; the fake's clock is
        always past the deadline)."""
        pod = self.objects[key]
        container = pod["status"]["containerStatuses"][0]
        if "activeDeadlineSeconds" not in pod["spec"] or "running" not in container["state"]:
            return
        container["state"] = {
            "terminated": {"exitCode": 143, "reason": "Error", "finishedAt": _NOW}
        }
        pod["status"].update({"phase": "Failed", "reason": "DeadlineExceeded"})
        job_key = ("Job", key[1], pod["metadata"]["ownerReferences"][0]["name"])
        condition = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}
        self.objects[job_key]["status"].update({"active": 0, "conditions": [condition]})

    # --- what tests do to the fake cluster -------------------------------------------------

    def pod_of(self, job_name: str) -> dict[str, Any]:
        """The (only) pod of the Job called JOB_NAME."""
        with self.lock:
            (pod,) = self._pods_of(self.objects[("Job", self.namespace_of(job_name), job_name)])
            return pod

    def namespace_of(self, job_name: str) -> str:
        """The namespace of the Job called JOB_NAME."""
        return next(ns for (k, ns, name) in self.objects if k == "Job" and name == job_name)

    def write_log(self, job_name: str, data: bytes) -> None:
        """Append DATA to the log of JOB_NAME's pod, as its container would."""
        pod = self.pod_of(job_name)
        with self.lock:
            self.logs[pod["metadata"]["name"]] = self.logs.get(pod["metadata"]["name"], b"") + data

    def finish_pod(
        self,
        job_name: str,
        exit_code: int,
        *,
        reason: str | None = None,
        message: str = "",
        job_failure_reason: str = "BackoffLimitExceeded",
    ) -> None:
        """End the pod of JOB_NAME with EXIT_CODE, and mark the Job as Kubernetes would."""
        pod = self.pod_of(job_name)
        with self.lock:
            container = pod["status"]["containerStatuses"][0]
            container["state"] = {
                "terminated": {
                    "exitCode": exit_code,
                    "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                    "message": message,
                    "startedAt": _NOW,
                    "finishedAt": "2026-01-01T00:00:05Z",
                }
            }
            pod["status"]["phase"] = "Succeeded" if exit_code == 0 else "Failed"
            job = self.objects[("Job", pod["metadata"]["namespace"], job_name)]
            if exit_code == 0:
                condition = {"type": "Complete", "status": "True"}
                job["status"]["completionTime"] = "2026-01-01T00:00:05Z"
            else:
                condition = {"type": "Failed", "status": "True", "reason": job_failure_reason}
            job["status"].update({"active": 0, "conditions": [condition]})

    def names(self, kind: str) -> list[str]:
        """The names of every object of KIND in the fake cluster."""
        with self.lock:
            return sorted(name for (k, _, name) in self.objects if k == kind)
