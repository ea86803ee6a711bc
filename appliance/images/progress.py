"""Progress reporting for long image operations (DESIGN §11: long operations show progress).

Library code reports through a ``Progress``; the CLI passes one that writes to stderr, tests
and library callers get the silent ``NULL_PROGRESS``.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    """Receives progress of a long operation; this base class ignores everything."""

    def step(self, message: str) -> None:
        """A new phase started (``"writing layer 2/3"``)."""

    def transfer(self, label: str, done: int, total: int) -> None:
        """DONE of TOTAL bytes of LABEL (a blob digest) have moved; may be called from threads."""


NULL_PROGRESS = Progress()


class StreamProgress(Progress):
    """Human-readable progress lines on a stream, byte counts throttled to one line a second."""

    def __init__(self, stream: TextIO | None = None, interval: float = 1.0):
        self.stream = stream or sys.stderr
        self.interval = interval
        self._last = 0.0
        self._lock = threading.Lock()

    def step(self, message: str) -> None:
        """Print MESSAGE on its own line."""
        with self._lock:
            print(message, file=self.stream, flush=True)

    def transfer(self, label: str, done: int, total: int) -> None:
        """Print a byte count for LABEL at most once per interval, and always at the end."""
        now = time.monotonic()
        with self._lock:
            if done < total and now - self._last < self.interval:
                return
            self._last = now
            short = label.split(":")[-1][:12]
            print(f"  {short}: {_mib(done)} / {_mib(total)}", file=self.stream, flush=True)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"
