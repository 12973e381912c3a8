"""Nothing in the daemon grows with the number of messages: the memory outbox is bounded too."""

from __future__ import annotations

from pathlib import Path

from edge_agent.uplink.outbox import Keep, MemoryOutbox
from edge_agent.uplink.outbox_sqlite import SqliteOutbox


def test_memory_outbox_drops_telemetry_then_events_and_never_records() -> None:
    outbox = MemoryOutbox(max_messages=4)
    for n in range(3):
        assert outbox.put(f"t/{n}", b"x", 1, False, Keep.TELEMETRY) is not None
    assert outbox.put("e/0", b"x", 1, False, Keep.EVENT) is not None
    assert outbox.put("e/1", b"x", 1, False, Keep.EVENT) is not None  # displaces t/0
    assert outbox.put("t/3", b"x", 1, False, Keep.TELEMETRY) is not None  # displaces t/1
    assert [m.topic for m in outbox.oldest(10)] == ["t/2", "e/0", "e/1", "t/3"]
    for n in range(4):
        assert outbox.put(f"r/{n}", b"x", 1, False, Keep.RECORD) is not None
    assert [m.topic for m in outbox.oldest(10)] == ["r/0", "r/1", "r/2", "r/3"]
    assert outbox.put("t/4", b"x", 1, False, Keep.TELEMETRY) is None  # nothing it may displace
    assert outbox.put("e/2", b"x", 1, False, Keep.EVENT) is None
    assert outbox.full  # the station stops taking parts
    assert outbox.put("r/4", b"x", 1, False, Keep.RECORD) is not None  # a record is never lost
    outbox.ack(outbox.oldest(1)[0].id)
    outbox.ack(outbox.oldest(1)[0].id)
    assert not outbox.full and len(outbox) == 3


def test_disk_outbox_forgets_each_report_it_held_once_released(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "outbox.sqlite3")
    for n in range(50):
        key = f"report-{n}"
        outbox.hold(key, "edge/gw/cycles", b"interrupted", 1)
        outbox.hold(key, "edge/gw/cycles", b"ok, tag write unknown", 1)
        outbox.put("edge/gw/cycles", b"ok", 1, False, Keep.RECORD, release=key)
    assert outbox.held() == []
    assert len(outbox._holding) == 0  # nothing kept per cycle: memory does not grow with cycles
    outbox.close()
