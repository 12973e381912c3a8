"""A damaged disk outbox: bad rows are set aside and the rest delivered; a malformed file is moved
aside and salvaged at open; a file deleted under the running agent is made anew, nothing lost.

The damage is done to the file's bytes, as flash or a careless person would, on files made by
the outbox class itself."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config_schema import BrokerConfig
from edge_agent.instructions.model import Step
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc
from edge_agent.uplink.mqtt import MqttUplink
from edge_agent.uplink.outbox import Keep
from edge_agent.uplink.outbox_sqlite import OutboxError, SqliteOutbox
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import DRILL, running_station
from tests.unit.test_supervisor import until

PAGE = 4096


def damage(path: Path, old: bytes, new: bytes) -> None:
    """Overwrite the one occurrence of ``old`` in the closed file (same length: a bit flip)."""
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1, data.count(old)
    path.write_bytes(data.replace(old, new))


def quarantine(path: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    db.text_factory = bytes
    try:
        return db.execute("SELECT id, topic, held_key, error FROM quarantine").fetchall()
    finally:
        db.close()


def stored(path: Path, topics: list[str]) -> None:
    box = SqliteOutbox(path)
    for n, topic in enumerate(topics):
        box.put(topic, json.dumps({"n": n}).encode(), 1, False)
    box.close()  # checkpoints the WAL into the file


def uplink(broker: EmbeddedBroker, outbox: SqliteOutbox) -> MqttUplink:
    config = BrokerConfig(host=broker.host, port=broker.port, reconnect_min=0.05, reconnect_max=0.2)
    return MqttUplink(config, "gw-d", "edge-agent-gw-d", outbox=outbox)


async def test_a_topic_flipped_into_a_wildcard_is_quarantined_and_delivery_goes_on(
    tmp_path: Path, broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    path = tmp_path / "outbox.sqlite3"
    stored(path, ["edge/gw-d/cycles/a", "edge/gw-d/cycles/b", "edge/gw-d/cycles/c"])
    damage(path, b"cycles/b", b"#ycles/b")  # 'c' 0x63 -> '#' 0x23: one bit

    outbox = SqliteOutbox(path)
    link = uplink(broker, outbox)
    await link.start(lambda: {})
    link.publish("cycles/d", {"n": 3})
    await recorder.wait_for("gw-d/cycles/d", 1)
    seen = [t for t, _, _ in recorder.messages if "/cycles/" in t]
    assert seen == ["edge/gw-d/cycles/a", "edge/gw-d/cycles/c", "edge/gw-d/cycles/d"]
    told = await recorder.wait_for("gw-d/events", 1)
    assert told[0]["event"] == "outbox_quarantined" and told[0]["outbox_id"] == 2
    assert "wildcard '#'" in told[0]["error"] and told[0]["quarantined_total"] == 1
    assert outbox.quarantined == 1
    await link.stop({"state": "offline"})
    outbox.close()
    [(outbox_id, topic, _, error)] = quarantine(path)
    assert (outbox_id, topic) == (2, b"edge/gw-d/#ycles/b")  # kept as stored, for a person
    assert b"wildcard" in error
    assert SqliteOutbox(path).quarantined == 1  # still counted after a restart


def test_a_topic_that_is_not_utf8_is_quarantined_not_the_whole_read(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    stored(path, ["edge/gw/cycles/a", "edge/gw/cycles/b", "edge/gw/cycles/c", "edge/gw/cycles/d"])
    damage(path, b"cycles/b", b"cycl\xffs/b")

    box = SqliteOutbox(path)
    assert set(box.newest_by_topic()) >= {"edge/gw/cycles/a", "edge/gw/cycles/c"}
    # A full batch still: the row set aside is made up by the next one (a short batch would
    # tell the sender that nothing older is left).
    assert [(m.id, m.topic) for m in box.oldest(2)] == [
        (1, "edge/gw/cycles/a"),
        (3, "edge/gw/cycles/c"),
    ]
    assert len(box) == 3 and box.quarantined == 1
    [notice] = box.take_notices()
    assert notice["event"] == "outbox_quarantined" and "not valid UTF-8" in notice["error"]
    box.close()
    assert quarantine(path)[0][:2] == (2, b"edge/gw/cycl\xffs/b")


def test_damaged_held_reports_are_quarantined_at_start_the_others_released(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.db"
    box = SqliteOutbox(path)
    for key in ("r-good", "r-json", "r-topic"):
        box.hold(key, f"edge/gw/cycles/{key}", json.dumps({"id": key}).encode(), 1)
    box.close()
    damage(path, b'{"id": "r-json"}', b'{"id": "r-json"]')
    damage(path, b"cycles/r-topic", b"cycles/r-top\x00c")

    box = SqliteOutbox(path)
    assert [h[0] for h in box.held()] == ["r-good"]
    assert box.quarantined == 2
    assert box.held()[0][1:3] == ("edge/gw/cycles/r-good", b'{"id": "r-good"}')
    box.close()
    kept = {row[2]: row[3] for row in quarantine(path)}
    assert set(kept) == {b"r-json", b"r-topic"}
    assert b"not JSON" in kept[b"r-json"] and b"NUL" in kept[b"r-topic"]


def zero_page_holding(path: Path, marker: bytes, nth: int = 0) -> None:
    data = bytearray(path.read_bytes())
    pages = [at for at in range(0, len(data), PAGE) if marker in data[at : at + PAGE]]
    at = pages[nth]
    data[at : at + PAGE] = bytes(PAGE)  # the sector reads back as zeros
    path.write_bytes(data)


def test_a_malformed_file_is_moved_aside_and_every_readable_row_salvaged(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = SqliteOutbox(path)
    for n in range(300):  # ~40 table pages
        payload = json.dumps({"n": n, "text": f"<{n:04d}>" + "y" * 400}).encode()
        box.put(f"edge/gw/cycles/{n}", payload, 1, False)
    box.hold("r-1", "edge/gw/cycles/held", b'{"id": "r-1"}', 1)
    for n in range(10):
        box.ack(n + 1)  # delivered: the sequence goes on past them
    box.close()
    zero_page_holding(path, b"<0150>")  # a table page in the middle
    original = path.read_bytes()

    box = SqliteOutbox(path)
    [aside] = tmp_path.glob("outbox.sqlite3.corrupt-*")
    assert aside.read_bytes() == original  # kept as it was, for a person
    ids = [m.id for m in box.oldest(1000)]
    assert 250 <= len(ids) < 290 and 151 not in ids and {11, 300} <= set(ids)
    for m in box.oldest(1000):
        assert json.loads(m.payload)["n"] == m.id - 1  # each row as it was stored
    assert [h[0] for h in box.held()] == ["r-1"]
    [notice] = box.take_notices()
    assert notice["event"] == "outbox_salvaged"
    assert (notice["salvaged"], notice["held"], notice["unreadable"]) == (
        len(ids),
        1,
        290 - len(ids),
    )
    message = box.put("edge/gw/cycles/new", b"{}", 1, False)
    assert message is not None and message.id == 301  # the sequence never goes back
    box.close()
    reopened = SqliteOutbox(path)  # the new file is sound: no second salvage
    assert len(reopened) == len(ids) + 1 and not reopened.take_notices()
    reopened.close()


def test_a_zeroed_overflow_page_costs_only_its_message(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = SqliteOutbox(path)
    box.put("edge/gw/events", b'{"small": 1}', 1, False, Keep.EVENT)
    box.put("edge/gw/events", json.dumps({"big": "x" * 20_000}).encode(), 1, False, Keep.EVENT)
    box.put("edge/gw/events", b'{"small": 3}', 1, False, Keep.EVENT)
    box.close()
    zero_page_holding(path, b"x" * 4000, nth=1)

    box = SqliteOutbox(path)
    assert [m.payload for m in box.oldest(10)] == [b'{"small": 1}', b'{"small": 3}']
    [notice] = box.take_notices()
    assert (notice["salvaged"], notice["unreadable"]) == (2, 1)
    box.close()


def test_a_file_that_is_not_an_outbox_is_moved_aside_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not sqlite" * 100)
    box = SqliteOutbox(path)
    assert len(box) == 0
    [aside] = tmp_path.glob("o.db.corrupt-*")
    assert aside.read_bytes() == b"this is not sqlite" * 100
    box.close()


def test_a_file_deleted_under_the_agent_is_made_anew_with_every_row(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = SqliteOutbox(path)
    for n in range(3):
        box.put(f"edge/gw/cycles/{n}", f"{n}".encode(), 1, False)
    box.hold("r-1", "edge/gw/cycles/held", b'{"id": "r-1"}', 1)
    for name in ("outbox.sqlite3", "outbox.sqlite3-wal"):
        (tmp_path / name).unlink()  # rows 0..2 were committed only into the unlinked file
    with pytest.raises(OutboxError, match="deleted while the agent ran"):
        box.put("edge/gw/cycles/3", b"3", 1, False)
    message = box.put("edge/gw/cycles/3", b"3", 1, False)  # the next write makes it anew
    assert message is not None and message.id == 4
    box.ack(1)
    box.close()

    box = SqliteOutbox(path)
    assert [(m.id, m.payload) for m in box.oldest(10)] == [(2, b"1"), (3, b"2"), (4, b"3")]
    assert [h[0] for h in box.held()] == ["r-1"]
    box.close()


def test_a_file_replaced_under_the_agent_is_kept_aside_and_ours_made_anew(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = SqliteOutbox(path)
    box.put("edge/gw/cycles/0", b"0", 1, False)
    path.unlink()
    path.write_bytes(b"an old backup")
    with pytest.raises(OutboxError, match="replaced by another file"):
        box.ack(1)
    box.ack(1)
    assert len(box) == 0
    box.close()
    [aside] = tmp_path.glob("outbox.sqlite3.replaced-*")
    assert aside.read_bytes() == b"an old backup"


async def test_an_outbox_deleted_under_the_station_refuses_parts_untouched_and_loses_nothing(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker
) -> None:
    state = tmp_path / "state"
    extra = f"state_dir: {json.dumps(str(state))}\n"
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=extra) as st:
        routing = [Step("drill", DRILL, "st-10"), Step("drill", DRILL, "st-20")]
        uids = [bytes([4, n, n, n, n, n, n]) for n in range(1, 4)]
        await broker.stop()  # the first report stays in the outbox file, only there
        assert (await st.cycle(st.tag(routing, uid=uids[0], done=1))).status == "ok"
        for name in ("outbox.sqlite3", "outbox.sqlite3-wal"):
            (state / name).unlink()  # a careless clean-up

        refused = await st.cycle(st.tag(routing, uid=uids[1], done=1))
        assert (refused.status, refused.reason, refused.machine_state) == (
            "rejected",
            "not_recording",
            "untouched",
        )
        assert reference_plc.cycles == 1  # the machine was not moved for a part not recorded
        assert "deleted while the agent ran" in st.agent.status()["problems"][0]["error"]
        await until(lambda: st.agent.accepting_parts, 15, "taking parts again")
        assert (state / "outbox.sqlite3").exists()
        assert (await st.cycle(st.tag(routing, uid=uids[2], done=1))).status == "ok"
        # All three reports wait in the new file, the first copied from the deleted one.
        waiting = st.agent.uplink.outbox.oldest(100)
        reports = [json.loads(m.payload) for m in waiting if m.topic.endswith("/cycles")]
        assert [r["tag_uid"] for r in reports] == [uid.hex().upper() for uid in uids]
        told = [json.loads(m.payload)["event"] for m in waiting if m.topic.endswith("/events")]
        assert told == ["outbox_failed", "outbox_recovered"]
        await broker.start()
        await until(lambda: not st.agent.uplink.backlog, 15, "the backlog delivered")
