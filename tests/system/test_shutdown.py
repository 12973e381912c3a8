"""Stopping the agent never leaves the machine half-programmed: the cycle finishes, or aborts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.instructions.model import Step
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.station.report import CycleReport
from edge_agent.tag.simulated import SimulatedReader
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import DRILL, PRESS, Station, write_config

ROUTING = [
    Step("drill", DRILL, "st-10"),
    Step("drill", DRILL, "st-20"),
    Step("press", PRESS, "st-30"),
]


async def _station(
    tmp: Path, plc: Any, broker: EmbeddedBroker, drain: float
) -> tuple[Station, asyncio.Event, asyncio.Task[None]]:
    from edge_agent.instructions.signing import KeyRing, load_private_key

    path = write_config(
        tmp,
        plc.port,
        broker.port,
        extra=f"cycle: {{drain_timeout: {drain}}}\ntelemetry: {{enabled: false}}\n",
    )
    reader = SimulatedReader()
    reports: asyncio.Queue[CycleReport] = asyncio.Queue()
    agent = Agent(load_config(path), reader=reader, on_report=reports.put_nowait)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    assert await agent.uplink.wait_connected(5)
    key = load_private_key(tmp / "mes.key")
    keyring = KeyRing({"mes": key.public_key()})
    return Station(agent, key, keyring, tmp, reports), stop, task


async def _until(condition: Any, timeout: float = 5) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


async def test_stop_lets_the_cycle_in_flight_finish(
    tmp_path: Path, reference_plc: Any, broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    reference_plc.done_delay = 0.5
    station, stop, task = await _station(tmp_path, reference_plc, broker, drain=10)
    tag = station.tag(ROUTING, done=1)
    station.reader.present(tag)
    await _until(lambda: reference_plc.snapshot()["coil"][0])  # the machine is working
    stop.set()
    await asyncio.wait_for(task, 10)
    [report] = await recorder.wait_for("gw-test/cycles", 1)
    assert report["status"] == "ok" and report["machine_state"] == "cycle complete"
    assert report["tag_write"] == "ok"
    assert reference_plc.snapshot()["coil"][0] is False
    statuses = await recorder.wait_for("gw-test/status", 2)
    assert statuses[-1]["state"] == "offline" and statuses[-1]["reason"] == "shutdown"


async def test_stop_past_the_drain_timeout_aborts_and_reports(
    tmp_path: Path, reference_plc: Any, broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    reference_plc.done_delay = 30  # done will not come in time
    station, stop, task = await _station(tmp_path, reference_plc, broker, drain=0.3)
    station.reader.present(station.tag(ROUTING, done=1))
    await _until(lambda: reference_plc.snapshot()["coil"][0])
    stop.set()
    await asyncio.wait_for(task, 10)
    [report] = await recorder.wait_for("gw-test/cycles", 1)
    assert (report["status"], report["reason"]) == ("failed", "shutdown")
    assert report["machine_state"] == "aborted (trigger reset)"
    assert reference_plc.snapshot()["coil"][0] is False  # trigger reset: the machine is idle


async def test_no_new_part_is_taken_once_stopping(
    tmp_path: Path, reference_plc: Any, broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    reference_plc.done_delay = 0.3
    station, stop, task = await _station(tmp_path, reference_plc, broker, drain=10)
    first = station.tag(ROUTING, done=1)
    second = station.tag(ROUTING, uid=b"\x04\x09\x08\x07\x06\x05\x04", done=1)
    station.reader.present(first)
    await _until(lambda: reference_plc.snapshot()["coil"][0])
    station.reader.present(second)  # arrives while the first is in the machine
    stop.set()
    await asyncio.wait_for(task, 10)
    reports = await recorder.wait_for("gw-test/cycles", 1)
    await asyncio.sleep(0.2)
    assert [r["tag_uid"] for r in recorder.json("gw-test/cycles")] == [first.uid.hex().upper()]
    assert reference_plc.snapshot()["input"][10] == 1  # only one part was run
    assert reports[0]["status"] == "ok"
