"""Report metrics from inside a Run (standard library only; shipped in the runner image).

    import animus_run
    animus_run.log_metric("loss", 0.31, step=1)

Each call appends one JSON line ``{"name", "value", "step", "at"}`` to the file named by
``$ANIMUS_METRICS_FILE`` — the same format any program may write itself (docs/execution.md).
Outside a Run (the variable unset) the call does nothing, so training code runs unchanged on
a laptop.
"""

from __future__ import annotations

import datetime
import json
import math
import os

__all__ = ["log_metric"]

MAX_NAME_LENGTH = 200


def log_metric(name: str, value: float, step: int | None = None) -> None:
    """Record metric NAME = VALUE (at training STEP, if given) for the current Run."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"a metric name is a non-empty string of at most {MAX_NAME_LENGTH}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("a metric value is a number")
    if not math.isfinite(value):
        raise ValueError("a metric value must be finite")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise TypeError("a metric step is an integer")
    path = os.environ.get("ANIMUS_METRICS_FILE")
    if not path:
        return
    at = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    record = {"name": name, "value": float(value), "step": step, "at": at.replace("+00:00", "Z")}
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    # One write of one line on an O_APPEND descriptor: lines from several processes of the
    # same run never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
