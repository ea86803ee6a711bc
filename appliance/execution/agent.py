"""``animus dataplane``: the Data Plane agent.

A separate process with its own credential. It speaks to the control plane only through the
HTTP contract of ``appliance.api.dataplane``: it leases planned Runs, prepares each one's
workspace (inputs fetched and verified by digest, code checked out at the exact commit),
starts it on a backend, and reports state, logs, metrics and artifacts until it ends.
Containers outlive the agent: after a restart it asks the backend what still exists and
carries on reporting, so a Run reaches its true final state exactly once.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import requests

from appliance.execution.backend import Backend, Workspace, checkout_code

log = logging.getLogger("appliance.dataplane")
TERMINAL = {"succeeded", "failed", "canceled"}


class ContractError(RuntimeError):
    """The control plane refused a call (the message says why)."""

    def __init__(self, status: int, body: dict):
        super().__init__(f"{status} {body.get('error')}: {body.get('message')}")
        self.status = status
        self.code = body.get("error")


class ControlPlane:
    """The agent's side of the Data Plane contract (v1)."""

    def __init__(self, base_url: str, credential: str, timeout: float = 30):
        self.base = base_url.rstrip("/") + "/api/v1/dataplane"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {credential}"
        self.timeout = timeout

    def call(self, method: str, path: str, **kwargs) -> dict | requests.Response:
        response = self.session.request(method, self.base + path, timeout=self.timeout, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"error": "http_error", "message": response.text[:200]}
            raise ContractError(response.status_code, body)
        if kwargs.get("stream"):
            return response
        return response.json() if response.content else {}


@dataclass
class Tracked:
    """What the agent knows of one run it is responsible for."""

    run_id: str
    snapshot: dict
    secrets: dict[str, str] = field(default_factory=dict)
    byte_offset: int = 0
    sent_chars: int | None = None  # None until the control plane told us what it has
    metric_count: int | None = None
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    pending_text: str = ""


class DataPlaneAgent:
    def __init__(
        self,
        control: ControlPlane,
        backend: Backend,
        work_dir: Path,
        *,
        capacity: int = 4,
        interval: float = 0.25,
        long_poll: float = 5.0,
    ):
        self.control = control
        self.backend = backend
        self.work_dir = Path(work_dir)
        self.capacity = capacity
        self.interval = interval
        self.long_poll = long_poll
        self.tracked: dict[str, Tracked] = {}

    # --- start-up ------------------------------------------------------------------------

    def recover(self) -> None:
        """Tell the control plane which runs this agent's backend still knows, and adopt them."""
        known = self.backend.recover()
        self.control.call("POST", "/reconcile", json={"known_run_ids": known})
        leases = self.control.call("POST", "/leases", json={"capacity": 0})["runs"]
        snapshots = {lease["run_id"]: lease["snapshot"] for lease in leases}
        for run_id in known:
            self.tracked[run_id] = Tracked(run_id, snapshots.get(run_id, {}))
        log.info("recovered runs", extra={"fields": {"runs": known}})

    # --- one pass --------------------------------------------------------------------------

    def tick(self) -> None:
        free = self.capacity - len(self.tracked)
        if free > 0:
            # With nothing to follow, wait at the control plane for work instead of sleeping.
            wait = 0 if self.tracked else self.long_poll
            answer = self.control.call(
                "POST", "/leases", json={"capacity": self.capacity, "wait_seconds": wait}
            )
            for lease in answer["runs"]:
                fresh = lease["run_id"] not in self.tracked and lease["state"] == "planned"
                if fresh and len(self.tracked) < self.capacity:
                    self.launch(lease)
        for tracked in list(self.tracked.values()):
            try:
                self.follow(tracked)
            except ContractError as exc:
                if exc.code == "lease_lost":
                    log.warning(
                        "lease lost; stopping the run", extra={"fields": {"run_id": tracked.run_id}}
                    )
                    self.backend.cancel(tracked.run_id)
                    self.backend.cleanup(tracked.run_id)
                    self.tracked.pop(tracked.run_id, None)
                else:
                    raise

    def launch(self, lease: dict) -> None:
        snapshot = lease["snapshot"]
        run_id = lease["run_id"]
        tracked = Tracked(run_id, snapshot)
        try:
            workspace = self.prepare(snapshot, tracked)
            self.backend.start(snapshot, workspace)
        except Exception as exc:  # the run cannot start: report why, never retry silently
            log.exception("run could not start", extra={"fields": {"run_id": run_id}})
            shutil.rmtree(self.work_dir / run_id, ignore_errors=True)
            self.control.call(
                "POST",
                f"/runs/{run_id}/state",
                json={"state": "failed", "exit_code": None, "reason": f"start_failed: {exc}"[:200]},
            )
            return
        self.tracked[run_id] = tracked
        self.control.call("POST", f"/runs/{run_id}/state", json={"state": "running"})

    def prepare(self, snapshot: dict, tracked: Tracked) -> Workspace:
        """Fetch and verify inputs, check out the code, fetch granted secrets."""
        root = self.work_dir / snapshot["run_id"]
        workspace = Workspace.create(root)
        for item in snapshot["inputs"]:
            for entry in item["files"]:
                target = workspace.inputs_dir / item["name"] / entry["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                if "artifact_id" in item:  # an upstream pipeline step's output
                    source = f"/runs/{snapshot['run_id']}/artifact-inputs/{item['artifact_id']}"
                else:
                    source = (
                        f"/runs/{snapshot['run_id']}/inputs/{item['dataset_version_id']}"
                        f"/files/{quote(entry['path'])}"
                    )
                self._download(source, entry, target)
        code = snapshot["code"]
        checkout_code(code["repo_url"], code["commit_sha"], workspace.code_dir)
        self._fetch_secrets(tracked)
        workspace.secrets = dict(tracked.secrets)
        return workspace

    def _fetch_secrets(self, tracked: Tracked) -> None:
        for name in tracked.snapshot.get("secrets", []):
            response = self.control.call(
                "GET", f"/runs/{tracked.run_id}/secrets/{quote(name)}", stream=True
            )
            tracked.secrets[name] = response.text

    def _download(self, source: str, entry: dict, target: Path) -> None:
        response = self.control.call("GET", source, stream=True)
        digest = hashlib.sha256()
        with open(target, "wb") as out:
            for chunk in response.iter_content(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != entry["sha256"]:
            raise RuntimeError(f"input {entry['path']} does not match its digest")

    def follow(self, tracked: Tracked) -> None:
        run_id = tracked.run_id
        beat = self.control.call("POST", f"/runs/{run_id}/heartbeat")
        if tracked.sent_chars is None:
            # First contact after a restart: learn what was received, and the secret values
            # again, so redaction and the output check keep working.
            tracked.sent_chars = beat["log_size"]
            tracked.metric_count = beat["metric_count"]
            if not tracked.secrets:
                self._fetch_secrets(tracked)
            self._skip_sent_log(tracked)
        if beat["cancel_requested"]:
            self.backend.cancel(run_id)
        status = self.backend.status(run_id)
        self.ship_logs(tracked, final=status is not None and status.state in TERMINAL)
        self.ship_metrics(tracked)
        if status is None:
            self.control.call(
                "POST",
                f"/runs/{run_id}/state",
                json={"state": "failed", "exit_code": None, "reason": "lost"},
            )
            self.tracked.pop(run_id, None)
            return
        if status.state not in TERMINAL:
            return
        outputs = self.backend.outputs(run_id)
        leaking = [o.path for o in outputs if self._holds_secret(tracked, o.local_path)]
        if leaking:
            # An output holding a secret value is never uploaded; the run fails and says why.
            log.warning(
                "output holds a secret value; not uploaded",
                extra={"fields": {"run_id": run_id, "paths": leaking}},
            )
            self._finish(tracked, "failed", status.exit_code, "secret_in_output")
            return
        for output in outputs:
            with open(output.local_path, "rb") as handle:
                self.control.call(
                    "PUT",
                    f"/runs/{run_id}/artifacts/{quote(output.path)}",
                    data=handle,
                    headers={
                        "X-Content-SHA256": output.sha256,
                        "Content-Type": "application/octet-stream",
                    },
                )
        self._finish(tracked, status.state, status.exit_code, status.reason)

    def _finish(self, tracked: Tracked, state: str, exit_code: int | None, reason: str | None):
        run_id = tracked.run_id
        self.control.call(
            "POST",
            f"/runs/{run_id}/state",
            json={"state": state, "exit_code": exit_code, "reason": reason},
        )
        self.backend.cleanup(run_id)
        shutil.rmtree(self.work_dir / run_id, ignore_errors=True)
        self.tracked.pop(run_id, None)

    @staticmethod
    def _holds_secret(tracked: Tracked, path: Path) -> bool:
        values = [v.encode() for v in tracked.secrets.values() if v]
        if not values:
            return False
        keep = max(len(v) for v in values) - 1
        tail = b""
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                window = tail + chunk
                if any(v in window for v in values):
                    return True
                tail = window[-keep:] if keep else b""
        return False

    def _skip_sent_log(self, tracked: Tracked) -> None:
        """After a restart: re-read the log from the start and skip what was already sent."""
        if tracked.sent_chars:
            raw = self.backend.read_logs(tracked.run_id, 0)
            tracked.byte_offset = len(raw)
            text = self._redact(tracked, tracked.decoder.decode(raw))
            tracked.pending_text = text[tracked.sent_chars :]

    def _redact(self, tracked: Tracked, text: str) -> str:
        for value in tracked.secrets.values():
            if value:
                text = text.replace(value, "[REDACTED]")
        return text

    def ship_logs(self, tracked: Tracked, *, final: bool) -> None:
        """Send new log text, with every granted secret value replaced before it leaves."""
        data = self.backend.read_logs(tracked.run_id, tracked.byte_offset)
        tracked.byte_offset += len(data)
        text = self._redact(tracked, tracked.pending_text + tracked.decoder.decode(data, final))
        # Complete secrets are replaced above; a secret still arriving is shorter than the
        # longest one, so holding back that many characters keeps every part of it here.
        hold = 0 if final else max((len(v) - 1 for v in tracked.secrets.values()), default=0)
        cut = max(0, len(text) - hold)
        ready, tracked.pending_text = text[:cut], text[cut:]
        if not ready:
            return
        self.control.call(
            "POST",
            f"/runs/{tracked.run_id}/logs",
            json={"offset": tracked.sent_chars, "data": ready},
        )
        tracked.sent_chars += len(ready)

    def ship_metrics(self, tracked: Tracked) -> None:
        records = self.backend.read_metrics(tracked.run_id, tracked.metric_count or 0)
        if not records:
            return
        start = tracked.metric_count or 0
        payload = [
            {
                "seq": start + i,
                "name": str(r["name"]),
                "value": float(r["value"]),
                "step": r.get("step"),
                "at": r.get("at"),
            }
            for i, r in enumerate(records)
        ]
        self.control.call("POST", f"/runs/{tracked.run_id}/metrics", json={"records": payload})
        tracked.metric_count = start + len(records)

    def run_forever(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        self.recover()
        while not stop.is_set():
            try:
                self.tick()
            except (requests.RequestException, ContractError):
                log.exception("control plane call failed; retrying")
            stop.wait(self.interval if self.tracked else 0)


def main_loop(
    base_url: str,
    credential: str,
    backend: Backend,
    work_dir: Path,
    capacity: int,
    interval: float = 0.25,
) -> None:
    agent = DataPlaneAgent(
        ControlPlane(base_url, credential), backend, work_dir, capacity=capacity, interval=interval
    )
    while True:
        try:
            agent.run_forever()
            return
        except (requests.RequestException, ContractError):
            log.exception("cannot reach the control plane; retrying in 2 s")
            time.sleep(2)
