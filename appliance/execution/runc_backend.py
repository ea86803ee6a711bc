"""The single-host Data Plane backend: one runc container per Run (DESIGN §7).

The container runs the locked image (pulled by digest, unpacked into a shared read-only root
filesystem) under the sandbox of ``appliance.images.runtime``, with the run agent of the
image as its first process. It is started with ``runc run --detach``, so it belongs to no
process of ours and survives a restart (or a kill -9) of the Data Plane agent. What a later
backend object needs to answer for the run lives on disk:

    ROOT/runs/<run_id>.json      the record: workspace paths, times, cancel/timeout marks
    ROOT/runc/                   runc's state (``runc --root``), one container per run
    <state_dir>/bundle/          config.json
    <state_dir>/log              the container's stdout+stderr (the agent's redacted copy
                                 of the command's output)
    <state_dir>/outcome.json     written by the run agent through a descriptor it inherited
    <state_dir>/status.json      the final RunStatus, once the run ended
    <state_dir>/metrics/         mounted at /state; the command appends metrics.jsonl

OOM kills are read from the container's cgroup v1 memory controller, which runc keeps until
the container is deleted. Secrets go to the agent through a pipe on its stdin and live only
in a tmpfs inside the container. See docs/execution.md.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path, PurePosixPath
from typing import Any

from appliance.errors import Conflict, NotFound
from appliance.execution.backend import (
    Backend,
    ExecutionFailed,
    OutputFile,
    RunStatus,
    Workspace,
    checkout_code,
    output_files,
    read_metric_records,
    refused,
    relative_path,
    verify_checkout,
    verify_inputs,
)
from appliance.images.registry import RegistryClient, parse_reference
from appliance.images.runtime import Limits, runtime_config, write_bundle
from appliance.images.unpack import pull_and_unpack

__all__ = ["RuncBackend", "checkout_code"]

log = logging.getLogger("appliance.dataplane.runc")

AGENT_PATH = "/opt/animus/run_agent.py"
AGENT_PYTHON = "/usr/bin/python3"
CODE_MOUNT = "/code"
INPUTS_MOUNT = "/inputs"
OUTPUT_MOUNT = "/output"
STATE_MOUNT = "/state"
SECRETS_MOUNT = "/run/secrets"
SCRATCH_MOUNT = "/scratch"
METRICS_FILE = "metrics.jsonl"
#: The descriptor number the run agent writes its outcome to (runc ``--preserve-fds 1``).
STATUS_FD = 3
#: Secrets travel through one pipe written before runc starts: they must fit its buffer.
MAX_SECRETS_BYTES = 60 << 10

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RUNNING = ("creating", "created", "running", "paused")


def _utc_now() -> str:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    return now.replace("+00:00", "Z")


def _parse_time(value: str) -> float:
    return datetime.datetime.fromisoformat(value).timestamp()


def _write_json(path: Path, document: dict[str, Any]) -> None:
    """Replace PATH atomically: a reader never sees half a record, even after a crash."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(document, handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    if not text.strip():
        return None
    try:
        document = json.loads(text)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def frame_secrets(secrets: dict[str, str]) -> bytes:
    """SECRETS as the run agent reads them from its stdin: ``NAME SIZE\\n`` + SIZE bytes."""
    frames = []
    for name, value in secrets.items():
        data = value.encode()
        frames.append(f"{name} {len(data)}\n".encode() + data)
    return b"".join(frames)


class RuncBackend(Backend):
    """Runs snapshots as runc containers on this host (must run as root)."""

    name = "runc"

    def __init__(
        self,
        root: Path,
        registry: RegistryClient,
        *,
        cache: Path | None = None,
        runc: str = "runc",
        allow_host_network: bool = False,
        kill_grace_seconds: float = 5.0,
        log_limit_bytes: int = 1 << 30,
        cgroup_parent: str = "animus",
        memory_cgroup_root: Path = Path("/sys/fs/cgroup/memory"),
    ):
        """ROOT holds run records and runc's state; REGISTRY is the only registry images are
        pulled from; CACHE is the image cache (``$ANIMUS_CACHE_DIR`` by default).

        ALLOW_HOST_NETWORK lets a run whose snapshot allows egress share the host's network
        namespace (there is no finer egress filter); without it such a run is refused.
        """
        self.root = root
        self.registry = registry
        self.cache = cache
        self.runc = shutil.which(runc) or runc
        self.allow_host_network = allow_host_network
        self.kill_grace = kill_grace_seconds
        self.log_limit = log_limit_bytes
        self.cgroup_parent = cgroup_parent
        self.memory_cgroup_root = memory_cgroup_root
        self.runs_dir = root / "runs"
        self.runc_root = root / "runc"
        self.runs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.runc_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # read_metrics resumes where it stopped: run id → (records seen, bytes consumed).
        self._metric_positions: dict[str, tuple[int, int]] = {}

    # --- records ---------------------------------------------------------------------------

    def _record_path(self, run_id: str) -> Path:
        if not _RUN_ID.fullmatch(run_id):
            raise NotFound("no such run")
        return self.runs_dir / f"{run_id}.json"

    def _record(self, run_id: str) -> dict[str, Any] | None:
        return _read_json(self._record_path(run_id))

    def _known(self, run_id: str) -> dict[str, Any]:
        record = self._record(run_id)
        if record is None:
            raise NotFound("the backend does not know this run", details={"run_id": run_id})
        return record

    # --- runc ------------------------------------------------------------------------------

    def _runc(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.runc, "--root", str(self.runc_root), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if check and result.returncode != 0:
            log.warning("runc failed", extra={"fields": {"args": args, "stderr": result.stderr}})
            raise ExecutionFailed(f"runc {args[0]} failed")
        return result

    def _container_state(self, run_id: str) -> str | None:
        """runc's status of the run's container, or None when there is no container."""
        result = self._runc("state", run_id)
        if result.returncode != 0:
            return None
        try:
            return str(json.loads(result.stdout)["status"])
        except (ValueError, KeyError):
            return None

    def _wait_stopped(self, run_id: str, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            if self._container_state(run_id) not in _RUNNING:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _kill(self, run_id: str) -> None:
        """SIGTERM the container (the agent stops the command), SIGKILL after the grace."""
        self._runc("kill", run_id, "TERM")
        if not self._wait_stopped(run_id, self.kill_grace):
            self._runc("kill", run_id, "KILL")
            self._wait_stopped(run_id, 10)

    def _oom_kills(self, run_id: str) -> int:
        path = self.memory_cgroup_root / self.cgroup_parent / run_id / "memory.oom_control"
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    # --- start -----------------------------------------------------------------------------

    def start(self, snapshot: dict[str, Any], workspace: Workspace) -> None:
        """See Backend.start."""
        run_id = str(snapshot.get("run_id", ""))
        if not _RUN_ID.fullmatch(run_id):
            raise refused("invalid_snapshot", "the run id is not a valid container name")
        if self._record(run_id) is not None:
            return
        command = snapshot.get("command")
        if not command or not all(isinstance(a, str) for a in command):
            raise refused("invalid_snapshot", "the command must be a non-empty list of strings")
        env = self._plain_env(snapshot)
        secrets = self._secret_values(snapshot, workspace)
        host_network = self._host_network(snapshot)
        resources = snapshot.get("resources") or {}
        timeout = float(resources.get("timeout_seconds") or 0)
        code = snapshot.get("code") or {}
        code_path = relative_path(str(code.get("path") or ""), "the code path")

        verify_inputs(snapshot, workspace.inputs_dir)
        verify_checkout(workspace.code_dir, str(code.get("commit_sha", "")))
        if not (workspace.code_dir / code_path).is_dir():
            raise refused("invalid_snapshot", "the code path is not a directory of the commit")

        reference = parse_reference(str(snapshot.get("image", "")))
        reference.pinned()
        if reference.registry != self.registry.registry:
            raise refused("invalid_snapshot", "the image is not in this Data Plane's registry")
        image, rootfs = pull_and_unpack(str(reference), self.registry, cache=self.cache)
        if not (rootfs / AGENT_PATH.lstrip("/")).is_file():
            raise refused("image_unsupported", "the image has no run agent (build it FROM runner)")

        limits = Limits(
            memory_bytes=int(resources.get("memory_mb") or 2048) << 20,
            cpus=float(resources.get("cpu") or 1),
            pids=int(resources.get("pids") or 256),
        )
        agent_args = [f"--timeout={timeout}", f"--kill-grace={self.kill_grace}"]
        agent_args += [f"--log-limit={self.log_limit}", f"--status-fd={STATUS_FD}"]
        if secrets:
            agent_args += ["--secrets-stdin", f"--secrets-dir={SECRETS_MOUNT}"]
        env.update(
            {
                "ANIMUS_RUN_ID": run_id,
                "ANIMUS_OUTPUT_DIR": OUTPUT_MOUNT,
                "ANIMUS_METRICS_FILE": f"{STATE_MOUNT}/{METRICS_FILE}",
                "ANIMUS_INPUTS_DIR": INPUTS_MOUNT,
                "ANIMUS_CODE_DIR": CODE_MOUNT,
                "ANIMUS_SECRETS_DIR": SECRETS_MOUNT,
            }
        )
        config = runtime_config(
            image.config,
            rootfs,
            entrypoint=[AGENT_PYTHON, "-I", "-S", AGENT_PATH],
            args=[*agent_args, "--", *command],
            env=env,
            scratch=workspace.scratch_dir,
            limits=limits,
        )
        self._shape_config(config, snapshot, workspace, code_path, host_network)

        state = workspace.state_dir
        state.mkdir(parents=True, exist_ok=True)
        os.chmod(state, 0o700)
        metrics_dir = state / "metrics"
        metrics_dir.mkdir(exist_ok=True)
        (metrics_dir / METRICS_FILE).touch()
        user = config["process"]["user"]
        for path in (metrics_dir, metrics_dir / METRICS_FILE, workspace.output_dir):
            os.chown(path, user["uid"], user["gid"])
        bundle = state / "bundle"
        write_bundle(bundle, config)

        record = {
            "run_id": run_id,
            "state_dir": str(state),
            "scratch_dir": str(workspace.scratch_dir),
            "output_dir": str(workspace.output_dir),
            "timeout_seconds": timeout,
            "created_at": _utc_now(),
            "started_at": None,
        }
        _write_json(self._record_path(run_id), record)
        try:
            self._run_detached(run_id, bundle, state, secrets)
        except ExecutionFailed:
            self._finish(run_id, record, RunStatus("failed", None, "start_failed"))
            raise
        record["started_at"] = _utc_now()
        _write_json(self._record_path(run_id), record)

    @staticmethod
    def _plain_env(snapshot: dict[str, Any]) -> dict[str, str]:
        env = {"HOME": SCRATCH_MOUNT, "TMPDIR": SCRATCH_MOUNT}
        for name, value in (snapshot.get("env") or {}).items():
            if not _ENV_NAME.fullmatch(str(name)) or not isinstance(value, str):
                raise refused("invalid_snapshot", "an environment variable is malformed")
            if name.startswith("ANIMUS_"):
                raise refused("invalid_snapshot", "ANIMUS_* environment variables are reserved")
            env[name] = value
        return env

    @staticmethod
    def _secret_values(snapshot: dict[str, Any], workspace: Workspace) -> dict[str, str]:
        secrets = {}
        for name in snapshot.get("secrets") or []:
            if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
                raise refused("invalid_snapshot", "a secret name is malformed")
            if name not in workspace.secrets:
                raise refused("invalid_snapshot", f"no value was provided for secret {name}")
            secrets[name] = workspace.secrets[name]
        if len(frame_secrets(secrets)) > MAX_SECRETS_BYTES:
            raise refused("invalid_snapshot", "the run's secrets exceed 60 KiB together")
        return secrets

    def _host_network(self, snapshot: dict[str, Any]) -> bool:
        egress = (snapshot.get("network") or {}).get("egress") or []
        if not egress:
            return False
        if not self.allow_host_network:
            raise refused(
                "egress_not_allowed",
                "this Data Plane runs containers without network; it cannot allow egress",
            )
        return True

    def _shape_config(
        self,
        config: dict[str, Any],
        snapshot: dict[str, Any],
        workspace: Workspace,
        code_path: PurePosixPath,
        host_network: bool,
    ) -> None:
        """Add the run's mounts, working directory, cgroup and network to CONFIG."""
        run_id = snapshot["run_id"]
        process = config["process"]
        uid, gid = process["user"]["uid"], process["user"]["gid"]
        # Later entries win: the image's HOME must not shadow the run's.
        env: dict[str, str] = {}
        for item in process["env"]:
            key, _, value = item.partition("=")
            env.pop(key, None)
            env[key] = value
        process["env"] = [f"{k}={v}" for k, v in env.items()]
        process["cwd"] = str(Path(CODE_MOUNT) / code_path)

        bind = ["rbind", "nosuid", "nodev"]
        mounts = config["mounts"]
        mounts.append(
            {
                "destination": CODE_MOUNT,
                "type": "bind",
                "source": str(workspace.code_dir),
                "options": [*bind, "ro"],
            }
        )
        mounts.append(
            {
                "destination": OUTPUT_MOUNT,
                "type": "bind",
                "source": str(workspace.output_dir),
                "options": [*bind, "rw"],
            }
        )
        mounts.append(
            {
                "destination": STATE_MOUNT,
                "type": "bind",
                "source": str(workspace.state_dir / "metrics"),
                "options": [*bind, "rw", "noexec"],
            }
        )
        # A tmpfs under the inputs: runc creates the per-input mount points in it instead of
        # in the shared, cached root filesystem.
        mounts.append(
            {
                "destination": INPUTS_MOUNT,
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "noexec", "mode=755", "size=64k"],
            }
        )
        for item in sorted(snapshot.get("inputs") or [], key=lambda i: i["name"]):
            mounts.append(
                {
                    "destination": f"{INPUTS_MOUNT}/{item['name']}",
                    "type": "bind",
                    "source": str(workspace.inputs_dir / item["name"]),
                    "options": [*bind, "ro", "noexec"],
                }
            )
        mounts.append(
            {
                "destination": SECRETS_MOUNT,
                "type": "tmpfs",
                "source": "tmpfs",
                "options": [
                    "nosuid",
                    "nodev",
                    "noexec",
                    "mode=700",
                    f"uid={uid}",
                    f"gid={gid}",
                    "size=1m",
                ],
            }
        )
        linux = config["linux"]
        linux["cgroupsPath"] = f"/{self.cgroup_parent}/{run_id}"
        if host_network:
            linux["namespaces"] = [n for n in linux["namespaces"] if n["type"] != "network"]

    def _run_detached(
        self, run_id: str, bundle: Path, state: Path, secrets: dict[str, str]
    ) -> None:
        """``runc run --detach`` with the container's stdio and status descriptor on files
        of STATE and the secrets in a pipe on its stdin; return once it runs."""
        log_fd = os.open(state / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        status_fd = os.open(state / "outcome.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        if secrets:
            stdin_fd, pipe_w = os.pipe()
            try:
                os.write(pipe_w, frame_secrets(secrets))
            finally:
                os.close(pipe_w)
        else:
            stdin_fd = os.open(os.devnull, os.O_RDONLY)
        args = [
            self.runc,
            "--root",
            str(self.runc_root),
            "--log",
            str(state / "runc.log"),
            "--log-format",
            "json",
            "run",
            "--detach",
            "--bundle",
            str(bundle),
            "--preserve-fds",
            "1",
            run_id,
        ]
        try:
            # posix_spawn places the descriptors at fixed numbers without running Python in
            # the child (safe in a threaded agent); runc hands 0, 1, 2 and 3 to the container.
            pid = os.posix_spawn(
                self.runc,
                args,
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, stdin_fd, 0),
                    (os.POSIX_SPAWN_DUP2, log_fd, 1),
                    (os.POSIX_SPAWN_DUP2, log_fd, 2),
                    (os.POSIX_SPAWN_DUP2, status_fd, STATUS_FD),
                ],
            )
        finally:
            for fd in (stdin_fd, log_fd, status_fd):
                os.close(fd)
        _, wait_status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(wait_status) != 0:
            log.warning("runc run failed", extra={"fields": {"run_id": run_id}})
            self._runc("delete", "--force", run_id)
            raise ExecutionFailed("the container could not be started", details={"run_id": run_id})

    # --- status ----------------------------------------------------------------------------

    def _finish(self, run_id: str, record: dict[str, Any], status: RunStatus) -> RunStatus:
        final = RunStatus(
            status.state,
            status.exit_code,
            status.reason,
            status.started_at or record.get("started_at"),
            status.finished_at or _utc_now(),
        )
        _write_json(Path(record["state_dir"]) / "status.json", final.__dict__)
        return final

    def status(self, run_id: str) -> RunStatus | None:
        """See Backend.status."""
        record = self._record(run_id)
        if record is None:
            return None
        final = _read_json(Path(record["state_dir"]) / "status.json")
        if final is not None:
            return RunStatus(**final)
        container = self._container_state(run_id)
        if container in _RUNNING:
            if self._overdue(record):
                # The agent enforces the timeout itself; a container still up this long
                # after it has a wedged agent, and is stopped from outside.
                record["timed_out"] = True
                _write_json(self._record_path(run_id), record)
                self._kill(run_id)
                return self._conclude(run_id, record)
            return RunStatus("running", started_at=record.get("started_at"))
        return self._conclude(run_id, record)

    def _overdue(self, record: dict[str, Any]) -> bool:
        timeout = record.get("timeout_seconds") or 0
        started = record.get("started_at")
        if not timeout or not started:
            return False
        return time.time() - _parse_time(started) > timeout + 2 * self.kill_grace + 10

    def _conclude(self, run_id: str, record: dict[str, Any]) -> RunStatus:
        """The final status of a run whose container stopped (or never existed)."""
        outcome = _read_json(Path(record["state_dir"]) / "outcome.json")
        oom = self._oom_kills(run_id) > 0
        started = (outcome or {}).get("started_at") or record.get("started_at")
        finished = (outcome or {}).get("finished_at")
        exit_code = (outcome or {}).get("exit_code")
        agent_reason = (outcome or {}).get("reason")
        if record.get("cancel_requested"):
            status = RunStatus("canceled", exit_code, "canceled", started, finished)
        elif outcome is None:
            if record.get("started_at") is None:
                reason = "start_failed"
            elif oom:
                reason = "oom"
            elif record.get("timed_out"):
                reason = "timeout"
            else:
                reason = "agent_lost"
            status = RunStatus("failed", None, reason, started, finished)
        elif agent_reason is None and exit_code == 0:
            status = RunStatus("succeeded", 0, None, started, finished)
        else:
            reason = {"terminated": "killed"}.get(agent_reason, agent_reason)
            if oom and reason in ("killed", "nonzero_exit"):
                reason = "oom"
            status = RunStatus("failed", exit_code, reason or "nonzero_exit", started, finished)
        return self._finish(run_id, record, status)

    def cancel(self, run_id: str) -> None:
        """See Backend.cancel: SIGTERM, SIGKILL after the grace period, then delete."""
        record = self._known(run_id)
        current = self.status(run_id)
        if current is not None and current.finished:
            return
        record["cancel_requested"] = True
        _write_json(self._record_path(run_id), record)
        self._kill(run_id)
        self._conclude(run_id, record)
        self._runc("delete", "--force", run_id)

    # --- results ---------------------------------------------------------------------------

    def read_logs(self, run_id: str, offset: int, limit: int | None = None) -> bytes:
        """See Backend.read_logs."""
        record = self._known(run_id)
        try:
            with open(Path(record["state_dir"]) / "log", "rb") as handle:
                handle.seek(max(0, offset))
                return handle.read(-1 if limit is None else limit)
        except FileNotFoundError:
            return b""

    def read_metrics(self, run_id: str, offset: int) -> list[dict[str, Any]]:
        """See Backend.read_metrics."""
        record = self._known(run_id)
        path = Path(record["state_dir"]) / "metrics" / METRICS_FILE
        records, self._metric_positions[run_id] = read_metric_records(
            path, offset, self._metric_positions.get(run_id, (0, 0))
        )
        return records

    def outputs(self, run_id: str) -> list[OutputFile]:
        """See Backend.outputs."""
        record = self._known(run_id)
        current = self.status(run_id)
        if current is None or not current.finished:
            raise Conflict("the run has not finished", details={"run_id": run_id})
        root = Path(record["output_dir"])
        return output_files(root)

    # --- lifecycle -------------------------------------------------------------------------

    def cleanup(self, run_id: str) -> None:
        """See Backend.cleanup."""
        record = self._record(run_id)
        if record is None:
            return
        self._runc("delete", "--force", run_id)
        for key in ("scratch_dir", "state_dir"):
            shutil.rmtree(record[key], ignore_errors=True)
        self._metric_positions.pop(run_id, None)
        with contextlib.suppress(FileNotFoundError):
            self._record_path(run_id).unlink()

    def recover(self) -> list[str]:
        """See Backend.recover."""
        return sorted(path.stem for path in self.runs_dir.glob("*.json"))
