"""The run agent's pieces, and the agent itself as a host process (no container needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.execution import animus_run, run_agent
from appliance.execution.backend import parse_metric_line
from appliance.execution.runc_backend import frame_secrets

AGENT = Path(run_agent.__file__)


@pytest.mark.parametrize("split", range(1, 12))
def test_redactor_catches_a_secret_split_across_reads(split: int) -> None:
    redactor = run_agent.Redactor([b"hunter2", b"swordfish"])
    stream = b"pw=hunter2; also swordfish!"
    out = redactor.feed(stream[:split]) + redactor.feed(stream[split:]) + redactor.flush()
    assert out == b"pw=[REDACTED]; also [REDACTED]!"


def test_redactor_holds_back_only_a_possible_secret_prefix() -> None:
    redactor = run_agent.Redactor([b"hunter2"])
    assert redactor.feed(b"line\n") == b"line\n"
    assert redactor.feed(b"a hun") == b"a "
    assert redactor.feed(b"gry\n") == b"hungry\n"


def test_log_sink_stops_at_its_limit(tmp_path: Path) -> None:
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    sink = run_agent.LogSink(fd, 10)
    sink.write(b"12345")
    sink.write(b"6789abcdef")
    sink.write(b"more")
    os.close(fd)
    assert path.read_bytes() == b"123456789a\n[animus: log limit reached, further output dropped]\n"


def run_agent_process(tmp_path: Path, *args: str, stdin: bytes = b"") -> tuple[dict, bytes]:
    status = tmp_path / "status.json"
    fd = os.open(status, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        result = subprocess.run(
            [sys.executable, "-I", "-S", str(AGENT), f"--status-fd={fd}", *args],
            input=stdin,
            capture_output=True,
            pass_fds=(fd,),
            timeout=30,
            check=False,
        )
    finally:
        os.close(fd)
    outcome = json.loads(status.read_text())
    assert result.returncode == outcome["exit_code"]
    return outcome, result.stdout + result.stderr


def test_agent_reports_exit_code_and_copies_output(tmp_path: Path) -> None:
    outcome, output = run_agent_process(
        tmp_path, "--", sys.executable, "-c", "import sys; print('hi'); sys.exit(4)"
    )
    assert (outcome["exit_code"], outcome["reason"], outcome["signal"]) == (4, "nonzero_exit", None)
    assert output == b"hi\n"


def test_agent_enforces_the_timeout_on_the_whole_process_group(tmp_path: Path) -> None:
    script = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    outcome, _ = run_agent_process(
        tmp_path, "--timeout=0.5", "--kill-grace=0.5", "--", sys.executable, "-c", script
    )
    assert outcome["reason"] == "timeout"
    assert outcome["exit_code"] == 128 + 15


def test_agent_writes_secret_files_and_redacts_them(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    script = f"print(open({str(secrets_dir / 'TOKEN')!r}).read())"
    outcome, output = run_agent_process(
        tmp_path,
        "--secrets-stdin",
        f"--secrets-dir={secrets_dir}",
        "--",
        sys.executable,
        "-c",
        script,
        stdin=frame_secrets({"TOKEN": "tok-123456"}),
    )
    assert outcome["reason"] is None
    assert output == b"[REDACTED]\n"
    assert oct((secrets_dir / "TOKEN").stat().st_mode & 0o777) == "0o400"


def test_secret_framing_round_trips_any_bytes() -> None:
    secrets = {"A": "x y\nz", "B": "", "C": "ünïcode"}
    parsed = run_agent.parse_secrets(frame_secrets(secrets))
    assert parsed == {name: value.encode() for name, value in secrets.items()}


def test_outcome_is_valid_json() -> None:
    outcome = {"exit_code": 3, "signal": None, "reason": "nonzero_exit", "started_at": "x"}
    outcome["finished_at"] = run_agent.utc_now()
    assert json.loads(run_agent.render_outcome(outcome)) == outcome


def test_metric_lines_written_by_animus_run_parse_back(tmp_path, monkeypatch) -> None:
    path = tmp_path / "metrics.jsonl"
    monkeypatch.setenv("ANIMUS_METRICS_FILE", str(path))
    animus_run.log_metric("loss", 1, step=3)
    animus_run.log_metric("acc", 0.5)
    lines = path.read_bytes().splitlines(keepends=True)
    parsed = [parse_metric_line(line) for line in lines]
    assert [(p["name"], p["value"], p["step"]) for p in parsed] == [
        ("loss", 1.0, 3),
        ("acc", 0.5, None),
    ]
    with pytest.raises(ValueError):
        animus_run.log_metric("loss", float("nan"))
    with pytest.raises(TypeError):
        animus_run.log_metric("loss", 1.0, step=1.5)


@pytest.mark.parametrize(
    "line",
    [
        b"not json\n",
        b"[1]\n",
        b'{"name": "", "value": 1}\n',
        b'{"name": "x", "value": true}\n',
        b'{"name": "x", "value": "1"}\n',
        b'{"name": "x", "value": NaN}\n',
        b'{"name": "x", "value": 1, "step": 1.5}\n',
    ],
)
def test_malformed_metric_lines_are_not_records(line: bytes) -> None:
    assert parse_metric_line(line) is None


def test_animus_run_outside_a_run_does_nothing(monkeypatch) -> None:
    monkeypatch.delenv("ANIMUS_METRICS_FILE", raising=False)
    animus_run.log_metric("loss", 0.1)


def test_the_runc_backend_implements_the_whole_interface() -> None:
    from appliance.execution.backend import Backend
    from appliance.execution.runc_backend import RuncBackend

    assert issubclass(RuncBackend, Backend)
    assert not RuncBackend.__abstractmethods__
