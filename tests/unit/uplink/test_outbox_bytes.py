"""The disk outbox bounded by size (``outbox.max_bytes``): the same policy as by message count.

Telemetry is dropped first, then events, cycle reports never; when only reports are left and they
fill the limit, the station stops taking parts (the machine untouched) until the broker takes them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.instructions.model import Step
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc
from edge_agent.uplink.outbox import Keep
from edge_agent.uplink.outbox_sqlite import SqliteOutbox
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import DRILL, running_station

KB = b"x" * 1000


def test_size_limit_drops_oldest_telemetry_then_events_never_records(tmp_path: Path) -> None:
    drops: list[tuple[int, Keep]] = []
    box = SqliteOutbox(
        tmp_path / "o.db", max_bytes=10_000, on_drop=lambda n, k: drops.append((n, k))
    )
    for n in range(4):
        box.put(f"telemetry/{n}", KB, 1, False, Keep.TELEMETRY)
    for n in range(3):
        box.put(f"events/{n}", KB, 1, False, Keep.EVENT)
    for n in range(3):
        box.put(f"cycles/{n}", KB, 1, False, Keep.RECORD)
    assert box.size == 10_000 and not drops

    # A 2.5 KB report needs three 1 KB messages gone: the three oldest telemetry messages.
    assert box.put("cycles/3", b"r" * 2500, 1, False, Keep.RECORD) is not None
    assert drops == [(3, Keep.TELEMETRY)]
    assert [m.topic for m in box.oldest(20)][:2] == ["telemetry/3", "events/0"]
    # Telemetry displaces only telemetry: one left, a 2 KB reading does not fit: refused.
    assert box.put("telemetry/big", b"t" * 2000, 1, False, Keep.TELEMETRY) is None
    assert drops[-1] == (1, Keep.TELEMETRY) and box.count(Keep.TELEMETRY) == 1
    # An event displaces the last telemetry message, then the oldest event.
    assert box.put("events/3", b"e" * 1500, 1, False, Keep.EVENT) is not None
    assert drops[-1] == (1, Keep.TELEMETRY)
    assert box.count(Keep.TELEMETRY) == 0 and box.size <= 10_000
    assert not box.full

    # Reports alone over the limit: every one is kept, and the outbox says it is full.
    while not box.full:
        assert box.put("cycles/n", KB, 1, False, Keep.RECORD) is not None
    assert box.count(Keep.EVENT) == 0 and box.count(Keep.RECORD) == 9  # 10.5 KB of reports
    records = box.count(Keep.RECORD)
    assert box.put("cycles/over", KB, 1, False, Keep.RECORD) is not None
    assert box.count(Keep.RECORD) == records + 1 and box.size > 10_000
    box.close()

    # The size is counted from the file after a restart; acknowledgements make room.
    box = SqliteOutbox(tmp_path / "o.db", max_bytes=10_000)
    assert box.full and box.size > 10_000
    for message in box.oldest(3):
        box.ack(message.id)
    assert not box.full
    box.close()


def test_count_limit_still_applies_with_a_size_limit(tmp_path: Path) -> None:
    box = SqliteOutbox(tmp_path / "o.db", max_messages=10, max_bytes=1_000_000)
    for _ in range(12):
        box.put("telemetry/t", KB, 1, False, Keep.TELEMETRY)
    assert len(box) == 10 and box.size == 10_000
    box.close()


async def test_reports_filling_the_size_limit_stop_the_station(
    tmp_path: Path, reference_plc: ReferencePlc
) -> None:
    broker = EmbeddedBroker(persistent=True)  # the status watcher's session survives the restart
    await broker.start()
    status = "edge/gw-test/status"
    watch = MqttRecorder(broker.host, broker.port, status, session="status-watch")
    await watch.ready()  # subscribed: from now on the broker keeps what it misses
    watch.close()
    state = tmp_path / "state"
    # A cycle report is about 1.3 KB: ten fill 12 KB. Telemetry off: only reports are queued.
    extra = (
        f"state_dir: {json.dumps(str(state))}\noutbox: {{max_bytes: 12000}}\n"
        "telemetry: {enabled: false}\n"
    )
    steps = [Step("drill", DRILL, "st-10"), Step("drill", DRILL, "st-20")]
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=extra) as station:
        uplink = station.agent.uplink
        await broker.stop()
        for n in range(4):
            uplink.publish("telemetry/spindle", {"rpm": n, "pad": "p" * 500})
        taken = 0
        while not uplink.outbox.full:
            tag = station.tag(steps, uid=bytes([4, 8, 8, 8, 8, 8, taken]), done=1)
            assert (await station.cycle(tag)).status == "ok"
            taken += 1
            assert taken < 50
        assert station.agent.status()["accepting_parts"] is False
        outbox = uplink.outbox
        assert isinstance(outbox, SqliteOutbox)
        assert outbox.count(Keep.TELEMETRY) == 0 and outbox.count(Keep.RECORD) == taken

        # The next part waits at the station: no cycle, no report, the machine untouched.
        machine_before = reference_plc.snapshot()
        station.reader.present(station.tag(steps, uid=bytes([4, 8, 8, 8, 8, 8, 99]), done=1))
        await asyncio.sleep(0.5)
        assert station.reports.empty()
        assert reference_plc.snapshot() == machine_before

        await broker.start()
        watch = MqttRecorder(broker.host, broker.port, status, session="status-watch")
        report = await asyncio.wait_for(station.reports.get(), 15)
        assert report.status == "ok"  # taken once the broker drained the outbox
        assert await uplink.flush(10)
        # The line saw the station stop taking parts, and take them again.

        def online() -> list[dict[str, Any]]:
            return [m for m in watch.json("status") if m["state"] == "online"]

        await until(lambda: len(online()) >= 2 and online()[-1]["backlog"] == 0, 5)
        assert any(not m["accepting_parts"] and m["backlog"] >= taken for m in online())
        assert online()[-1]["accepting_parts"] is True
    watch.close()
    await broker.stop()
    broker.close()


async def until(condition: Callable[[], bool], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)
