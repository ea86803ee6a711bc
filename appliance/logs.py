"""Structured logs: one JSON object per line on stderr (DESIGN §11)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

# Bearer tokens and passwords must never reach a log line, whatever a caller put in a message.
_SECRET_PATTERNS = (
    re.compile(r"anm_[A-Za-z0-9_-]{8,}"),
    re.compile(r"(?i)(password|secret|token)(\"?\s*[:=]\s*\"?)[^\s\",}]+"),
)


def redact(text: str) -> str:
    text = _SECRET_PATTERNS[0].sub("anm_[REDACTED]", text)
    return _SECRET_PATTERNS[1].sub(r"\1\2[REDACTED]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in getattr(record, "fields", {}).items():
            entry[key] = value
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: str = "INFO") -> None:
    root = logging.getLogger()
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        root.setLevel(level.upper())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The development server's own access log would duplicate ours in another format.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
