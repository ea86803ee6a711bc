"""The hash chain of DESIGN §6, in Python's standard library only.

This module is shared by the appliance and by the standalone verifier that auditors run
offline, so it imports nothing from ``appliance``.

``hash = SHA-256(prev_hash || canonical)`` where ``prev_hash`` is the previous event's hash as
64 lowercase hex characters (ASCII) and ``canonical`` is the UTF-8 canonical JSON of the event
without its ``hash``: sorted keys, no insignificant whitespace. The first event chains from
``genesis_hash(installation_id)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

#: The fields of an event that are hashed, in the order they are documented.
EVENT_FIELDS = (
    "seq",
    "at",
    "actor",
    "action",
    "project_id",
    "object_type",
    "object_id",
    "request_id",
    "payload",
    "prev_hash",
)


def canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def genesis_hash(installation_id: str) -> str:
    return hashlib.sha256(f"animus-audit-genesis:{installation_id}".encode()).hexdigest()


def event_hash(prev_hash: str, canonical_text: str) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical_text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    count: int
    head_hash: str
    broken_seq: int | None = None
    reason: str = ""

    def __str__(self) -> str:
        if self.ok:
            return f"OK {self.count} events, head {self.head_hash}"
        return f"BROKEN at seq {self.broken_seq}: {self.reason}"


def verify_chain(
    rows: Iterable[tuple[int, dict | None, str, str, str]], genesis: str, *, first_seq: int = 1
) -> Verdict:
    """Check a run of events in ``seq`` order.

    Each row is ``(seq, columns, canonical, prev_hash, hash)``. ``columns`` are the event's
    fields as stored beside the canonical text (``None`` when only the canonical text exists,
    as in an export); when given, they must say exactly what the hashed text says, so an edit
    to a column that leaves the text alone is caught at its own ``seq``.
    """
    expected_prev = genesis
    expected_seq = first_seq
    count = 0
    for seq, columns, text, prev_hash, stored_hash in rows:
        if seq != expected_seq:
            problem = "missing" if seq > expected_seq else "duplicate or out of order"
            return Verdict(
                False, count, expected_prev, expected_seq, f"event {expected_seq} is {problem}"
            )
        try:
            hashed = json.loads(text)
        except ValueError:
            return Verdict(False, count, expected_prev, seq, "canonical text is not JSON")
        if not isinstance(hashed, dict) or canonical(hashed) != text:
            return Verdict(False, count, expected_prev, seq, "canonical text is not canonical JSON")
        if hashed.get("seq") != seq:
            return Verdict(False, count, expected_prev, seq, "seq differs from the hashed seq")
        if prev_hash != expected_prev or hashed.get("prev_hash") != expected_prev:
            return Verdict(
                False, count, expected_prev, seq, "prev_hash does not match the previous event"
            )
        if event_hash(prev_hash, text) != stored_hash:
            return Verdict(
                False, count, expected_prev, seq, "hash does not match the event's content"
            )
        if columns is not None:
            for field in EVENT_FIELDS:
                if columns.get(field) != hashed.get(field):
                    return Verdict(
                        False,
                        count,
                        expected_prev,
                        seq,
                        f"stored {field} differs from the hashed event",
                    )
        expected_prev = stored_hash
        expected_seq += 1
        count += 1
    return Verdict(True, count, expected_prev)
