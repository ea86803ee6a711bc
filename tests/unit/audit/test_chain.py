"""The hash chain's rules, on hand-built events (no database)."""

from __future__ import annotations

import hashlib

from appliance.audit import chain


def build(count: int, genesis: str) -> list[tuple[int, dict, str, str, str]]:
    rows, prev = [], genesis
    for seq in range(1, count + 1):
        event = {
            "seq": seq,
            "at": f"2026-01-01T00:00:{seq:02d}.000000Z",
            "actor": "user:alice",
            "action": "project:record:created",
            "project_id": "prj_1",
            "object_type": "project",
            "object_id": "prj_1",
            "request_id": f"req_{seq}",
            "payload": {"n": seq, "é": "ü"},
            "prev_hash": prev,
        }
        text = chain.canonical(event)
        digest = chain.event_hash(prev, text)
        rows.append((seq, dict(event), text, prev, digest))
        prev = digest
    return rows


def test_hash_is_sha256_of_prev_hash_then_canonical_bytes():
    genesis = chain.genesis_hash("inst_x")
    seq, _, text, prev, digest = build(1, genesis)[0]
    assert digest == hashlib.sha256(prev.encode() + text.encode("utf-8")).hexdigest()
    assert text.startswith('{"action":') and ", " not in text  # sorted, no whitespace
    assert "é" in text  # UTF-8, not \u escapes


def test_intact_chain_verifies_with_count_and_head():
    genesis = chain.genesis_hash("inst_x")
    rows = build(5, genesis)
    verdict = chain.verify_chain(rows, genesis)
    assert verdict.ok and verdict.count == 5 and verdict.head_hash == rows[-1][4]
    assert str(verdict) == f"OK 5 events, head {rows[-1][4]}"


def test_genesis_depends_on_installation():
    rows = build(2, chain.genesis_hash("inst_a"))
    verdict = chain.verify_chain(rows, chain.genesis_hash("inst_b"))
    assert not verdict.ok and verdict.broken_seq == 1


def test_edited_column_is_caught_at_its_seq():
    genesis = chain.genesis_hash("inst_x")
    rows = build(5, genesis)
    seq, columns, text, prev, digest = rows[2]
    rows[2] = (seq, {**columns, "actor": "user:mallory"}, text, prev, digest)
    verdict = chain.verify_chain(rows, genesis)
    assert (verdict.ok, verdict.broken_seq) == (False, 3)
    assert "actor" in verdict.reason


def test_edited_canonical_text_is_caught_at_its_seq():
    genesis = chain.genesis_hash("inst_x")
    rows = build(5, genesis)
    seq, columns, text, prev, digest = rows[3]
    rows[3] = (seq, None, text.replace('"n":4', '"n":5'), prev, digest)
    verdict = chain.verify_chain(rows, genesis)
    assert (verdict.broken_seq, verdict.reason) == (4, "hash does not match the event's content")


def test_missing_and_duplicate_events_are_named():
    genesis = chain.genesis_hash("inst_x")
    rows = build(5, genesis)
    gap = chain.verify_chain(rows[:2] + rows[3:], genesis)
    assert (gap.broken_seq, gap.reason) == (3, "event 3 is missing")
    dup = chain.verify_chain(rows[:3] + rows[2:], genesis)
    assert dup.broken_seq == 4 and "duplicate" in dup.reason


def test_rehashed_event_breaks_the_link_to_the_next():
    genesis = chain.genesis_hash("inst_x")
    rows = build(4, genesis)
    seq, columns, text, prev, _ = rows[1]
    forged_text = text.replace("user:alice", "user:eve")
    rows[1] = (seq, None, forged_text, prev, chain.event_hash(prev, forged_text))
    verdict = chain.verify_chain(rows, genesis)
    assert (verdict.broken_seq, verdict.reason) == (
        3,
        "prev_hash does not match the previous event",
    )


def test_non_canonical_text_is_refused():
    genesis = chain.genesis_hash("inst_x")
    rows = build(2, genesis)
    seq, columns, text, prev, _ = rows[0]
    spaced = text.replace(":", ": ", 1)
    rows[0] = (seq, None, spaced, prev, chain.event_hash(prev, spaced))
    assert chain.verify_chain(rows, genesis).reason == "canonical text is not canonical JSON"
