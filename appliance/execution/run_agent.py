"""The run agent: the first process of every run container (standard library only).

It runs the user's command as its child and stays its parent for the whole run:

- secrets arrive on stdin (never in the container's configuration), framed as
  ``NAME SIZE\\n`` + SIZE bytes each, and are written to ``/run/secrets/<NAME>`` (mode 0400)
  on a tmpfs that lives as long as the container;
- the child's stdout and stderr (one pipe, so their order is kept) are copied to the
  agent's stdout, which the backend points at the run's log file, with every secret value
  replaced by ``[REDACTED]`` and at most ``--log-limit`` bytes kept;
- the wall-clock ``--timeout`` is enforced here: SIGTERM to the child's process group, then
  SIGKILL after ``--kill-grace`` seconds; a SIGTERM to the agent does the same;
- the outcome ``{"exit_code", "signal", "reason", "started_at", "finished_at"}`` is written
  as JSON to ``--status-fd``, a file the backend opened on the host. No path inside the
  container leads to it, and the agent makes itself non-dumpable so that the user's code
  (same uid) cannot reach its descriptors through /proc/1/fd.

As PID 1 of the container's PID namespace it also reaps orphaned grandchildren; when it
exits, the kernel kills whatever the command left behind.

The image ships no compiled bytecode and its root is read-only, so every module imported
here is compiled from source at each start: until the command runs, the agent imports only
built-in and frozen modules (``os``, ``time``, ``select``, ``_signal``) and ``ctypes``. That
is why it has no argparse, subprocess, signal or json (docs/execution.md, start latency).

Usage: run_agent.py [--timeout=S] [--kill-grace=S] [--log-limit=BYTES] [--status-fd=FD]
                    [--secrets-stdin] [--secrets-dir=DIR] -- COMMAND [ARG...]
"""

import _signal  # the C module behind `signal`, which would import (and compile) enum
import errno
import os
import select
import sys
import time

REDACTED = b"[REDACTED]"
_PR_SET_DUMPABLE = 4
_READ_SIZE = 1 << 16
#: After the command exits, how long grandchildren still holding its output pipe may keep
#: writing before they are killed.
_DRAIN_SECONDS = 2.0
_OPTIONS = {
    "--timeout": ("timeout", float),
    "--kill-grace": ("kill_grace", float),
    "--log-limit": ("log_limit", int),
    "--status-fd": ("status_fd", int),
    "--secrets-dir": ("secrets_dir", str),
}


class Options:
    """The agent's command line."""

    def __init__(self) -> None:
        self.timeout = 0.0
        self.kill_grace = 5.0
        self.log_limit = 1 << 30
        self.status_fd: int | None = None
        self.secrets_dir = "/run/secrets"
        self.secrets_stdin = False


def parse_args(argv: list[str]) -> tuple[Options, list[str]]:
    """The agent's options and the command after ``--``."""
    if "--" not in argv:
        raise SystemExit("run_agent: usage: run_agent.py [--option=value ...] -- COMMAND [ARG...]")
    split = argv.index("--")
    options = Options()
    for item in argv[:split]:
        if item == "--secrets-stdin":
            options.secrets_stdin = True
            continue
        key, _, value = item.partition("=")
        if key not in _OPTIONS:
            raise SystemExit(f"run_agent: unknown option {key}")
        attribute, kind = _OPTIONS[key]
        setattr(options, attribute, kind(value))
    command = argv[split + 1 :]
    if not command:
        raise SystemExit("run_agent: no command given")
    return options, command


def utc_now() -> str:
    """RFC 3339 UTC time with milliseconds."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def make_undumpable() -> None:
    """Keep same-uid processes out of /proc/1/{fd,mem,environ}; best effort."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (ImportError, OSError, AttributeError):
        pass


class Redactor:
    """Streams bytes with every occurrence of the secret values replaced.

    A secret split across two reads is still caught: the shortest tail that could be the
    start of a secret is held back until the next read (or the end).
    """

    def __init__(self, secrets: list[bytes]):
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self.pending = b""

    def feed(self, data: bytes) -> bytes:
        """Redacted bytes that are safe to emit now."""
        if not self.secrets:
            return data
        buffer = self.pending + data
        for secret in self.secrets:
            buffer = buffer.replace(secret, REDACTED)
        hold = 0
        for secret in self.secrets:
            for size in range(min(len(secret) - 1, len(buffer)), hold, -1):
                if buffer.endswith(secret[:size]):
                    hold = size
                    break
        self.pending = buffer[len(buffer) - hold :] if hold else b""
        return buffer[: len(buffer) - hold]

    def flush(self) -> bytes:
        """Whatever is held back, at the end of the stream."""
        rest, self.pending = self.pending, b""
        return rest


class LogSink:
    """Writes to a file descriptor, keeping at most LIMIT bytes."""

    def __init__(self, fd: int, limit: int):
        self.fd = fd
        self.remaining = limit
        self.full = False

    def write(self, data: bytes) -> None:
        """Write DATA, or the part of it that still fits."""
        if self.full or not data:
            return
        if len(data) > self.remaining:
            data = data[: self.remaining]
            self.full = True
        self.remaining -= len(data)
        self._write_all(data)
        if self.full:
            self._write_all(b"\n[animus: log limit reached, further output dropped]\n")

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except InterruptedError:
                continue
            except OSError:
                return  # nowhere to log to: the run itself must go on
            view = view[written:]


def parse_secrets(payload: bytes) -> dict[str, bytes]:
    """``NAME SIZE\\n`` + SIZE bytes, repeated (a framing that needs no json import)."""
    secrets = {}
    position = 0
    while position < len(payload):
        end = payload.index(b"\n", position)
        name, size = payload[position:end].decode().split(" ")
        start = end + 1
        secrets[name] = payload[start : start + int(size)]
        position = start + int(size)
    return secrets


def receive_secrets(secrets_dir: str) -> list[bytes]:
    """Read the secrets from stdin and write each to SECRETS_DIR/NAME (mode 0400); return
    the values for redaction."""
    chunks = []
    while chunk := os.read(0, _READ_SIZE):
        chunks.append(chunk)
    values = []
    for name, value in parse_secrets(b"".join(chunks)).items():
        if not name or "/" in name or name in (".", ".."):
            raise ValueError("a secret name must be one path component")
        path = os.path.join(secrets_dir, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
        try:
            os.write(fd, value)
        finally:
            os.close(fd)
        values.append(value)
    return values


def _signal_group(pgid: int, signum: int) -> None:
    try:  # noqa: SIM105 - contextlib would be one more module to compile at start
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def spawn(command: list[str], output: int) -> int:
    """Fork and exec COMMAND in a new session with stdin from /dev/null and stdout and
    stderr on OUTPUT; raise OSError when it cannot be executed."""
    report_r, report_w = os.pipe()  # close-on-exec: EOF without data means exec worked
    devnull = os.open(os.devnull, os.O_RDONLY)
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            os.dup2(devnull, 0)
            os.dup2(output, 1)
            os.dup2(output, 2)
            # Python ignores these; an exec'd program expects the defaults.
            _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
            _signal.signal(_signal.SIGXFSZ, _signal.SIG_DFL)
            # The OOM killer must pick the user's process, never the agent: only the agent
            # can record what happened. Raising one's own score needs no privilege.
            try:
                fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
                os.write(fd, b"1000")
                os.close(fd)
            except OSError:
                pass
            os.execvp(command[0], command)  # noqa: S606 - the user's argv, never a shell
        except OSError as exc:
            os.write(report_w, str(exc.errno or errno.ENOEXEC).encode())
        finally:
            os._exit(127)
    os.close(report_w)
    os.close(devnull)
    report = os.read(report_r, 64)
    os.close(report_r)
    if report:
        os.waitpid(pid, 0)
        code = int(report)
        raise OSError(code, os.strerror(code))
    return pid


class Supervisor:
    """Runs one command to its end under the agent's rules."""

    def __init__(self, options: Options, secrets: list[bytes]):
        self.options = options
        self.redactor = Redactor(secrets)
        self.sink = LogSink(1, options.log_limit)
        self.terminated = False
        self.timed_out = False
        self.pid: int | None = None
        self.wait_status: int | None = None
        self.kill_at: float | None = None

    def on_sigterm(self, _signum: int, _frame: object) -> None:
        self.terminated = True

    def stop_child(self) -> None:
        """SIGTERM the command's process group now, SIGKILL after the grace period."""
        if self.pid is not None and self.kill_at is None:
            _signal_group(self.pid, _signal.SIGTERM)
            self.kill_at = time.monotonic() + self.options.kill_grace

    def reap(self) -> None:
        """Collect every exited child, remembering the command's own status."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.pid:
                self.wait_status = status

    def run(self, command: list[str]) -> dict[str, object]:
        """Run COMMAND; return the outcome record."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        _signal.signal(_signal.SIGTERM, self.on_sigterm)
        _signal.signal(_signal.SIGINT, self.on_sigterm)
        _signal.signal(_signal.SIGCHLD, lambda *_: None)
        _signal.set_wakeup_fd(wake_w)
        started_at = utc_now()
        output_r, output_w = os.pipe()
        try:
            self.pid = spawn(command, output_w)
        except OSError as exc:
            message = f"animus: cannot start {command[0]!r}: {exc.strerror}\n"
            self.sink.write(message.encode())
            code = 126 if exc.errno in (errno.EACCES, errno.ENOEXEC) else 127
            return self.outcome(code, None, "start_failed", started_at)
        finally:
            os.close(output_w)

        timeout = self.options.timeout
        deadline = time.monotonic() + timeout if timeout else None
        os.set_blocking(output_r, False)
        poller = select.poll()
        poller.register(output_r, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        output_open = True
        drain_until: float | None = None

        while True:
            self.reap()
            now = time.monotonic()
            if self.wait_status is not None and drain_until is None:
                drain_until = now + _DRAIN_SECONDS
            if self.wait_status is None and (
                self.terminated or (deadline is not None and now >= deadline)
            ):
                self.timed_out = self.timed_out or not self.terminated
                self.stop_child()
            if self.kill_at is not None and now >= self.kill_at:
                _signal_group(self.pid, _signal.SIGKILL)
            if self.wait_status is not None and (not output_open or now >= drain_until):
                break
            waits = [t - now for t in (deadline, self.kill_at, drain_until) if t is not None]
            wait_ms = max(0, int(min(waits) * 1000) + 1) if waits else None
            for fd, _events in poller.poll(wait_ms):
                if fd == wake_r:
                    try:  # noqa: SIM105 - see _signal_group
                        os.read(wake_r, 512)
                    except BlockingIOError:
                        pass
                    continue
                try:
                    data = os.read(fd, _READ_SIZE)
                except BlockingIOError:
                    continue
                if data:
                    self.sink.write(self.redactor.feed(data))
                else:
                    poller.unregister(fd)
                    output_open = False

        if output_open:
            try:
                while data := os.read(output_r, _READ_SIZE):
                    self.sink.write(self.redactor.feed(data))
            except OSError:
                pass
        self.sink.write(self.redactor.flush())
        # Whatever the command left running must not outlive the record of its end.
        _signal_group(self.pid, _signal.SIGKILL)

        status = self.wait_status
        signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = 128 + signum if signum is not None else os.WEXITSTATUS(status)
        if self.timed_out:
            reason: str | None = "timeout"
        elif self.terminated:
            reason = "terminated"
        elif signum is not None:
            reason = "killed"
        elif code != 0:
            reason = "nonzero_exit"
        else:
            reason = None
        return self.outcome(code, signum, reason, started_at)

    def outcome(
        self, code: int, signum: int | None, reason: str | None, started_at: str
    ) -> dict[str, object]:
        """The outcome record."""
        return {
            "exit_code": code,
            "signal": signum,
            "reason": reason,
            "started_at": started_at,
            "finished_at": utc_now(),
        }


def render_outcome(outcome: dict[str, object]) -> bytes:
    """OUTCOME as one JSON line. Its values are ints, None and plain ASCII words or times
    of our own, so no escaping is needed (and json, slow to import here, is not)."""
    parts = []
    for key in sorted(outcome):
        value = outcome[key]
        if value is None:
            text = "null"
        elif isinstance(value, int):
            text = str(value)
        else:
            text = '"' + "".join(c for c in str(value) if c.isalnum() or c in ":.-_") + '"'
        parts.append(f'"{key}": {text}')
    return ("{" + ", ".join(parts) + "}\n").encode()


def write_status(fd: int, outcome: dict[str, object]) -> None:
    """Write the outcome record to FD and make it durable."""
    try:
        os.write(fd, render_outcome(outcome))
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the agent; its exit code is the command's."""
    options, command = parse_args(sys.argv[1:] if argv is None else argv)
    make_undumpable()
    if options.status_fd is not None:
        os.set_inheritable(options.status_fd, False)
    secrets: list[bytes] = []
    if options.secrets_stdin:
        try:
            secrets = receive_secrets(options.secrets_dir)
        except (OSError, ValueError) as exc:
            os.write(2, f"animus: cannot receive secrets: {type(exc).__name__}\n".encode())
            outcome = Supervisor(options, []).outcome(127, None, "start_failed", utc_now())
            if options.status_fd is not None:
                write_status(options.status_fd, outcome)
            return 127
    outcome = Supervisor(options, secrets).run(command)
    if options.status_fd is not None:
        write_status(options.status_fd, outcome)
    return int(outcome["exit_code"])  # type: ignore[call-overload]


if __name__ == "__main__":
    sys.exit(main())
