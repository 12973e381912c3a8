"""One supervisor for every long-lived task: a defect degrades the status, it never stops the
station silently; what cannot recover ends the process for systemd to restart."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import BrokerConfig
from edge_agent.instructions.model import Step
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc
from edge_agent.supervisor import Supervisor
from edge_agent.uplink.mqtt import MqttUplink
from edge_agent.uplink.outbox_sqlite import SqliteOutbox
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import DRILL, running_station


async def until(condition: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_a_failing_component_degrades_the_status_restarts_and_recovers() -> None:
    changes: list[str] = []
    supervisor = Supervisor(settle=0.2, backoff=(0.01, 0.05))
    supervisor.on_change = lambda: changes.append(supervisor.status()["health"])
    runs = 0
    running = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise PermissionError(13, "Permission denied", "/srv/tags/04A1.ndef")
        running.set()
        await asyncio.Event().wait()

    task = supervisor.spawn("reader-events", flaky)
    await asyncio.wait_for(running.wait(), 5)
    problem = supervisor.status()["problems"][0]
    assert problem["component"] == "reader-events"
    assert "Permission denied" in problem["error"] and "/srv/tags/04A1.ndef" in problem["error"]
    await until(lambda: supervisor.healthy, 5, "the problem to clear after the settle time")
    assert changes == ["degraded", "ok"]  # told once when it broke, once when it recovered
    assert supervisor.fatal is None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_component_that_cannot_recover_makes_the_supervisor_fatal() -> None:
    supervisor = Supervisor(restarts=3, window=30, backoff=(0.01, 0.02))

    async def broken() -> None:
        raise RuntimeError("state file unreadable")

    task = supervisor.spawn("mqtt-sender", broken)
    await asyncio.wait_for(supervisor.failed.wait(), 5)
    await task
    assert supervisor.fatal is not None
    assert "mqtt-sender failed 4 times" in supervisor.fatal
    assert "state file unreadable" in supervisor.fatal
    assert supervisor.status()["health"] == "degraded"


@contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """The file cannot be written, even by root: a read-only mode, or the immutable attribute."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        yield
        path.chmod(0o644)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("root, and the file system has no immutable attribute")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


async def test_a_tag_that_cannot_be_written_back_does_not_stop_part_taking(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    tags = tmp_path / "tags"
    reader = f"{{type: simulated, directory: {json.dumps(str(tags))}, poll_interval: 0.02}}"
    async with running_station(tmp_path, reference_plc.port, broker.port, reader=reader) as st:
        routing = [Step("drill", DRILL, "st-10"), Step("drill", DRILL, "st-20")]
        locked = tags / "04A1A2A3A4A5A6.ndef"
        locked.write_bytes(st.tag(routing, uid=bytes.fromhex("04A1A2A3A4A5A6"), done=1).message)
        with unwritable(locked):
            first = await asyncio.wait_for(st.reports.get(), 10)
            # The machine ran: the report says so, and says the tag could not be updated.
            assert first.status == "ok", first.error
            assert first.tag_write.startswith("failed:")
            assert "not permitted" in first.tag_write or "denied" in first.tag_write
            fine = tags / "04B1B2B3B4B5B6.ndef"
            fine.write_bytes(st.tag(routing, uid=bytes.fromhex("04B1B2B3B4B5B6"), done=1).message)
            second = await asyncio.wait_for(st.reports.get(), 10)
        assert (second.status, second.tag_write) == ("ok", "ok")
        assert reference_plc.cycles == 2
        status = st.agent.status()
        assert (status["health"], status["accepting_parts"]) == ("ok", True)
    assert [r["tag_uid"] for r in recorder.json("gw-test/cycles")] == [
        "04A1A2A3A4A5A6",
        "04B1B2B3B4B5B6",
    ]


async def test_a_corrupt_outbox_row_is_quarantined_and_delivery_goes_on(
    tmp_path: Path, broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = SqliteOutbox(path)
    for n in range(3):
        outbox.put(f"edge/gw-c/cycles/{n}", json.dumps({"n": n}).encode(), 1, False)
    outbox.close()
    db = sqlite3.connect(path)  # damaged on disk: a class this version does not know
    db.execute("UPDATE messages SET keep = 42 WHERE id = 2")
    db.commit()
    db.close()

    outbox = SqliteOutbox(path)
    uplink = MqttUplink(
        BrokerConfig(host=broker.host, port=broker.port, reconnect_min=0.05, reconnect_max=0.2),
        "gw-c",
        "edge-agent-gw-c",
        outbox=outbox,
    )
    await uplink.start(lambda: {})
    uplink.publish("cycles/3", {"n": 3})
    found = await recorder.wait_for("gw-c/cycles/3", 1)
    assert found[0]["n"] == 3
    seen = [t for t, _, _ in recorder.messages if "/cycles/" in t]
    assert seen == ["edge/gw-c/cycles/0", "edge/gw-c/cycles/2", "edge/gw-c/cycles/3"]
    await uplink.stop({"state": "offline"})
    outbox.close()
    kept = sqlite3.connect(path).execute("SELECT id, topic FROM quarantine").fetchall()
    assert kept == [(2, "edge/gw-c/cycles/1")]  # set aside for a person, never sent
