"""The disk outbox on its own: durable order, sequence numbers, the drop policy, the file lock."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edge_agent.uplink.outbox import Keep, MemoryOutbox
from edge_agent.uplink.outbox_sqlite import OutboxError, SqliteOutbox


def test_messages_survive_reopen_in_order_with_their_sequence(tmp_path: Path) -> None:
    box = SqliteOutbox(tmp_path / "o.db")
    for i in range(5):

        def payload(seq: int, i: int = i) -> bytes:
            return f"{i}:{seq}".encode()

        box.put("edge/gw/cycles", payload, 1, False)
    box.ack(1)
    box.close()

    box = SqliteOutbox(tmp_path / "o.db")
    assert len(box) == 4
    assert [(m.id, m.payload) for m in box.oldest(10)] == [
        (2, b"1:2"),
        (3, b"2:3"),
        (4, b"3:4"),
        (5, b"4:5"),
    ]
    assert [m.id for m in box.oldest(2, after=3)] == [4, 5]
    assert box.oldest_created() is not None
    box.close()


def test_sequence_never_goes_back_even_when_emptied(tmp_path: Path) -> None:
    box = SqliteOutbox(tmp_path / "o.db")
    for _ in range(3):
        message = box.put("t", b"x", 1, False)
        assert message is not None
        box.ack(message.id)
    assert len(box) == 0 and box.oldest_created() is None
    box.close()
    box = SqliteOutbox(tmp_path / "o.db")
    message = box.put("t", b"x", 1, False)
    assert message is not None and message.id == 4
    box.close()


def test_full_outbox_drops_oldest_telemetry_then_events_never_records(tmp_path: Path) -> None:
    drops: list[tuple[int, Keep]] = []
    box = SqliteOutbox(
        tmp_path / "o.db", max_messages=10, on_drop=lambda n, k: drops.append((n, k))
    )
    for i in range(4):
        box.put("edge/gw/telemetry/spindle", f"t{i}".encode(), 1, False, Keep.TELEMETRY)
    for i in range(2):
        box.put("edge/gw/events", f"e{i}".encode(), 1, False, Keep.EVENT)
    for i in range(4):
        box.put("edge/gw/cycles", f"c{i}".encode(), 1, False, Keep.RECORD)
    assert len(box) == 10 and not box.full

    # A new record displaces the oldest telemetry, one for one.
    box.put("edge/gw/cycles", b"c4", 1, False)
    assert drops == [(1, Keep.TELEMETRY)]
    payloads = [m.payload for m in box.oldest(100)]
    assert payloads[:3] == [b"t1", b"t2", b"t3"] and len(payloads) == 10

    # New telemetry displaces only older telemetry.
    box.put("edge/gw/telemetry/spindle", b"t4", 1, False, Keep.TELEMETRY)
    assert [m.payload for m in box.oldest(100)][:3] == [b"t2", b"t3", b"e0"]

    for i in range(5, 10):  # records displace the rest of the telemetry, then the events
        box.put("edge/gw/cycles", f"c{i}".encode(), 1, False)
    assert [m.payload for m in box.oldest(100)] == [f"c{i}".encode() for i in range(10)]
    assert box.full
    assert box.count(Keep.RECORD) == 10

    # Nothing left to displace: telemetry is refused, a record is still kept (over the limit).
    assert box.put("edge/gw/telemetry/spindle", b"t5", 1, False, Keep.TELEMETRY) is None
    assert box.put("edge/gw/cycles", b"c10", 1, False) is not None
    assert len(box) == 11
    assert box.dropped == sum(n for n, _ in drops) == 8  # 7 displaced, 1 refused
    box.ack(box.oldest(1)[0].id)
    box.ack(box.oldest(1)[0].id)
    assert not box.full
    box.close()


def test_telemetry_older_than_the_age_limit_is_dropped(tmp_path: Path) -> None:
    box = SqliteOutbox(tmp_path / "o.db", telemetry_max_age=5)
    box.put("edge/gw/telemetry/a", b"old", 1, False, Keep.TELEMETRY)
    box.put("edge/gw/cycles", b"old record", 1, False)
    box.close()
    db = sqlite3.connect(tmp_path / "o.db")
    db.execute("UPDATE messages SET created = created - 60")
    db.commit()
    db.close()
    box = SqliteOutbox(tmp_path / "o.db", telemetry_max_age=5)
    box.put("edge/gw/telemetry/a", b"new", 1, False, Keep.TELEMETRY)
    assert [m.payload for m in box.oldest(10)] == [b"old record", b"new"]
    box.close()


def test_second_agent_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    box = SqliteOutbox(tmp_path / "o.db")
    with pytest.raises(OutboxError, match="another edge-agent uses this state directory"):
        SqliteOutbox(tmp_path / "o.db")
    box.close()


def test_the_file_is_in_wal_mode(tmp_path: Path) -> None:
    SqliteOutbox(tmp_path / "o.db").close()
    db = sqlite3.connect(tmp_path / "o.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_memory_outbox_has_the_same_interface() -> None:
    box = MemoryOutbox()
    message = box.put("t", lambda seq: str(seq).encode(), 1, False, Keep.TELEMETRY)
    assert message is not None
    assert message.payload == b"1" and not box.full and box.oldest_created() is not None
    box.ack(message.id)
    assert len(box) == 0 and box.oldest_created() is None
