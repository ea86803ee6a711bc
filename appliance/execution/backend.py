"""The Data Plane backend interface, and the workspace checks every backend shares.

A backend runs one Run's execution snapshot in a sandbox and answers for it afterwards, even
when the Data Plane agent that started it has been restarted in between: everything a
backend needs to know about a run is kept on disk or in the container runtime, never only in
the backend object. The runc backend (``runc_backend``) is the single-host implementation;
docs/execution.md describes the sandbox and the formats.

Snapshot keys a backend reads: ``run_id``, ``image`` (``REGISTRY/REPO@sha256:…``),
``command``, ``env``, ``resources``, ``network``, ``inputs``, ``code``, ``secrets``.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
import os
import re
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from appliance.errors import AnimusError

#: Run states a backend reports; the control plane's ``queued``/``planned``/``unknown`` are
#: never a backend's business.
STATES = ("running", "succeeded", "failed", "canceled")

#: Why a run ended other than by succeeding (``RunStatus.reason``).
REASONS = (
    "nonzero_exit",  # the command exited with a code other than 0
    "oom",  # the container's memory limit was hit and the kernel killed a process
    "timeout",  # resources.timeout_seconds of wall-clock time passed
    "canceled",  # Backend.cancel
    "killed",  # the command died from a signal that was neither of the above
    "start_failed",  # the container or the command could not be started
    "agent_lost",  # the container ended without the run agent recording an outcome
)

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_HASH_CHUNK = 1 << 20


class ExecutionRefused(AnimusError):
    """The snapshot or the workspace is not safe to run; nothing was started.

    ``details["reason"]`` says which check failed: ``invalid_snapshot``,
    ``input_missing``, ``input_digest_mismatch``, ``commit_unknown``, ``commit_mismatch``,
    ``egress_not_allowed``, ``image_unsupported``.
    """

    code = "validation_failed"


class ExecutionFailed(AnimusError):
    """The sandbox could not be started or controlled (the host's fault, not the run's)."""

    code = "internal_error"


def refused(reason: str, message: str, **details: Any) -> ExecutionRefused:
    """An ExecutionRefused whose details carry REASON (one stable word for callers)."""
    return ExecutionRefused(message, details={"reason": reason, **details})


@dataclass
class Workspace:
    """The host directories of one run, prepared by the Data Plane agent before ``start``.

    ``inputs_dir/<input name>/<path>`` holds each input's files, ``code_dir`` the checkout
    (see ``checkout_code``), ``output_dir`` and ``scratch_dir`` start empty, ``state_dir``
    is the backend's own (logs, metrics, the outcome record). ``secrets`` maps each secret
    name of the snapshot to its value; it is never written to disk nor shown by ``repr``.
    """

    root: Path
    inputs_dir: Path
    code_dir: Path
    output_dir: Path
    scratch_dir: Path
    state_dir: Path
    secrets: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, root: Path, secrets: dict[str, str] | None = None) -> Workspace:
        """The conventional layout below ROOT (``inputs``, ``code``, ``output``, ``scratch``,
        ``state``), with every directory created."""
        workspace = cls(
            root=root,
            inputs_dir=root / "inputs",
            code_dir=root / "code",
            output_dir=root / "output",
            scratch_dir=root / "scratch",
            state_dir=root / "state",
            secrets=dict(secrets or {}),
        )
        for path in (
            workspace.inputs_dir,
            workspace.code_dir,
            workspace.output_dir,
            workspace.scratch_dir,
            workspace.state_dir,
        ):
            path.mkdir(parents=True, exist_ok=True)
        return workspace


@dataclass(frozen=True)
class RunStatus:
    """What a backend knows about one run. Times are UTC, RFC 3339."""

    state: str  # one of STATES
    exit_code: int | None = None
    reason: str | None = None  # one of REASONS, None while running and on success
    started_at: str | None = None
    finished_at: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the run reached a final state."""
        return self.state != "running"


@dataclass(frozen=True)
class OutputFile:
    """One file the run left in its output directory."""

    path: str  # relative, '/'-separated
    sha256: str  # hex
    size: int
    local_path: Path


class Backend(abc.ABC):
    """Runs execution snapshots in sandboxes; one implementation per kind of Data Plane.

    Every method is safe to call again (the Data Plane contract is idempotent) and works on
    a fresh backend object for runs that an earlier object started.
    """

    name: str

    @abc.abstractmethod
    def start(self, snapshot: dict[str, Any], workspace: Workspace) -> None:
        """Verify WORKSPACE against SNAPSHOT and start the run; return once it is running.

        The run is detached: it keeps running if the calling process dies. Raises
        ExecutionRefused (nothing started) when an input's bytes or the code checkout do not
        match the snapshot, and ExecutionFailed when the sandbox cannot be started (the
        run's status is then failed/``start_failed``). Starting a run id that is already
        known does nothing.
        """

    @abc.abstractmethod
    def status(self, run_id: str) -> RunStatus | None:
        """The run's status, or None for a run this backend does not know (never started
        here, or cleaned up). Also enforces the wall-clock timeout on a wedged run."""

    @abc.abstractmethod
    def cancel(self, run_id: str) -> None:
        """Stop the run; its status becomes canceled unless it had already finished."""

    @abc.abstractmethod
    def read_logs(self, run_id: str, offset: int, limit: int | None = None) -> bytes:
        """The run's combined stdout and stderr from byte OFFSET (at most LIMIT bytes; b""
        when nothing is new). Secret values are already redacted."""

    @abc.abstractmethod
    def read_metrics(self, run_id: str, offset: int) -> list[dict[str, Any]]:
        """The metric records from record OFFSET on, each ``{"seq", "name", "value",
        "step", "at"}`` with ``seq`` = OFFSET, OFFSET + 1, …; the next OFFSET is OFFSET +
        the number returned. Malformed lines are not records (and never become ones); a
        line still being written is not read yet."""

    @abc.abstractmethod
    def outputs(self, run_id: str) -> list[OutputFile]:
        """The regular files in the run's output directory, hashed, sorted by path
        (symbolic links and special files are left out). Only after the run finished."""

    @abc.abstractmethod
    def cleanup(self, run_id: str) -> None:
        """Remove the container and the run's scratch and state directories; the backend
        forgets the run. Read logs, metrics and outputs first."""

    @abc.abstractmethod
    def recover(self) -> list[str]:
        """Run ids this backend still holds (running, or finished and not cleaned up);
        what a restarted Data Plane agent reconciles."""


def sha256_file(path: Path) -> tuple[str, int]:
    """Hex SHA-256 and size of the regular file at PATH (a symbolic link is refused)."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def relative_path(value: str, what: str) -> PurePosixPath:
    """VALUE as a relative path that stays below its directory, or ExecutionRefused."""
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or "\x00" in value:
        raise refused("invalid_snapshot", f"{what} must be a relative path without '..'")
    return path


def verify_inputs(snapshot: dict[str, Any], inputs_dir: Path) -> None:
    """Re-hash every input file under INPUTS_DIR against the snapshot's manifest.

    The files were fetched by someone else, possibly long ago: what is mounted into the
    container must be exactly what the Run records.
    """
    for item in snapshot.get("inputs") or []:
        name = str(item["name"])
        relative_path(name, "an input name")
        if "/" in name or name in ("", "."):
            raise refused("invalid_snapshot", "an input name must be one path component")
        for entry in item.get("files") or []:
            rel = relative_path(entry["path"], "an input file path")
            expected = str(entry["sha256"]).removeprefix("sha256:")
            if not _SHA256_HEX.fullmatch(expected):
                raise refused("invalid_snapshot", "an input file's sha256 is malformed")
            try:
                actual, size = sha256_file(inputs_dir / name / rel)
            except (FileNotFoundError, NotADirectoryError):
                raise refused(
                    "input_missing",
                    f"input {name!r} is missing file {str(rel)!r}",
                    input=name,
                    path=str(rel),
                ) from None
            except OSError:
                raise refused(
                    "input_missing",
                    f"input {name!r} file {str(rel)!r} is not a regular file",
                    input=name,
                    path=str(rel),
                ) from None
            if actual != expected or ("size" in entry and size != int(entry["size"])):
                raise refused(
                    "input_digest_mismatch",
                    f"input {name!r} file {str(rel)!r} does not match its recorded sha256",
                    input=name,
                    path=str(rel),
                )


def _git(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # Hooks and templates from the host's git configuration have no business in a checkout
    # of untrusted code; prompts would hang an unattended agent.
    env = {
        **os.environ,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
    }
    return subprocess.run(
        ["git", "-c", "core.hooksPath=/dev/null", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def head_commit(checkout: Path) -> str | None:
    """The commit SHA checked out in CHECKOUT, or None when it is not a git work tree."""
    result = _git("rev-parse", "--verify", "HEAD^{commit}", cwd=checkout)
    return result.stdout.strip() if result.returncode == 0 else None


def checkout_code(repo_url: str, commit_sha: str, dest: Path) -> None:
    """Clone REPO_URL into DEST (which must not exist or be empty) and check out exactly
    COMMIT_SHA, detached; refuse when the commit is unknown or HEAD ends up elsewhere."""
    if not _COMMIT_SHA.fullmatch(commit_sha):
        raise refused("invalid_snapshot", "the code commit must be a 40-hex SHA")
    cloned = _git("clone", "--quiet", "--no-checkout", "--", repo_url, str(dest))
    if cloned.returncode != 0:
        raise refused("commit_unknown", "the code repository could not be cloned")
    checked_out = _git("checkout", "--quiet", "--detach", commit_sha, cwd=dest)
    if checked_out.returncode != 0:
        raise refused(
            "commit_unknown",
            f"commit {commit_sha} is not in the code repository",
            commit_sha=commit_sha,
        )
    verify_checkout(dest, commit_sha)


def verify_checkout(checkout: Path, commit_sha: str) -> None:
    """Refuse unless CHECKOUT's HEAD is COMMIT_SHA."""
    head = head_commit(checkout)
    if head != commit_sha:
        raise refused(
            "commit_mismatch",
            f"the code checkout is not at commit {commit_sha}",
            commit_sha=commit_sha,
        )


_MAX_METRIC_LINE = 64 << 10
_MAX_METRIC_NAME = 200


def parse_metric_line(line: bytes) -> dict[str, Any] | None:
    """One metric record from one JSON line, or None when the line is not a valid one."""
    if len(line) > _MAX_METRIC_LINE:
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    name, value, step, at = (record.get(k) for k in ("name", "value", "step", "at"))
    if not isinstance(name, str) or not 0 < len(name) <= _MAX_METRIC_NAME:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        return None
    if at is not None and not isinstance(at, str):
        return None
    return {"name": name, "value": float(value), "step": step, "at": at}


def read_metric_records(
    path: Path, offset: int, position: tuple[int, int]
) -> tuple[list[dict[str, Any]], tuple[int, int]]:
    """Valid metric records from record number OFFSET of the JSON-lines file at PATH.

    POSITION is ``(records seen, bytes consumed)`` from the previous call for the same file,
    so a follower reads only what is new; the new position is returned with the records.
    A line still being written (no newline yet) is left for the next call.
    """
    seen, consumed = position
    if seen > offset:
        seen, consumed = 0, 0
    records: list[dict[str, Any]] = []
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below, after the loop
    except FileNotFoundError:
        return [], (seen, consumed)
    with handle:
        handle.seek(consumed)
        for line in handle:
            if not line.endswith(b"\n"):
                break
            consumed += len(line)
            parsed = parse_metric_line(line)
            if parsed is None:
                continue
            if seen >= offset:
                records.append({"seq": seen, **parsed})
            seen += 1
    return records, (seen, consumed)


def output_files(root: Path) -> list[OutputFile]:
    """Every regular file under ROOT, hashed, sorted by path; links are never followed,
    because the run's code chose these names."""
    files = []
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for filename in filenames:
            path = Path(directory) / filename
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            digest, size = sha256_file(path)
            files.append(OutputFile(path.relative_to(root).as_posix(), digest, size, path))
    return sorted(files, key=lambda f: f.path)
