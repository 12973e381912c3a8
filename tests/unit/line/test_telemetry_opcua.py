"""Telemetry on OPC UA: groups are subscriptions on the reference machine (a separate process).

No value is Read: the driver counts calls to ``read()`` and every test asserts there were none.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from edge_agent.line.telemetry import Telemetry
from edge_agent.machine.driver import PushingDriver
from edge_agent.machine.opcua import OpcUaSettings
from edge_agent.machine.opcua.driver import OpcUaDriver
from edge_agent.machine.profile import Profile, load_profile
from edge_agent.sim.broker import EmbeddedBroker
from tests.fixtures_broker import MqttRecorder
from tests.fixtures_opcua import OPCUA_PROFILE, OpcUaMachineProcess, machine_yaml, opcua_station
from tests.system.test_opcua_station import PROCESS, routing

Sent = list[tuple[str, dict[str, Any], int]]


class CountingDriver(OpcUaDriver):
    """The real driver, counting Read requests made through it."""

    reads = 0

    async def read(self, points: Sequence[str]) -> dict[str, Any]:
        self.reads += 1
        return await super().read(points)


def profile_with(tmp: Path, telemetry: str) -> Profile:
    """The reference OPC UA profile with its telemetry section replaced."""
    text = OPCUA_PROFILE.read_text()
    text = text[: text.index("\ntelemetry:")] + "\ntelemetry:\n" + telemetry
    path = tmp / "profile.yaml"
    path.write_text(text)
    return load_profile(path)


async def until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def messages(sent: Sent, suffix: str) -> list[dict[str, Any]]:
    return [p for s, p, _ in sent if s == suffix]


def events(sent: Sent, name: str, group: str = "clock") -> list[dict[str, Any]]:
    return [p for p in messages(sent, "events") if p["event"] == name and p["group"] == group]


@pytest.fixture
async def watch(tmp_path: Path) -> AsyncIterator[Any]:
    """A factory: Telemetry on a connected OPC UA driver, messages collected as published."""
    made: list[tuple[Telemetry, OpcUaDriver]] = []

    async def make(
        machine: OpcUaMachineProcess, telemetry: str
    ) -> tuple[Telemetry, CountingDriver, Sent]:
        settings = OpcUaSettings.model_validate(
            {"url": machine.url, "timeout": 1.0, "reconnect_min": 0.05, "reconnect_max": 0.2}
        )
        driver = CountingDriver(settings, profile_with(tmp_path, telemetry))
        await driver.connect()
        sent: Sent = []
        t = Telemetry(
            gateway_id="gw-t",
            profile=driver.profile,
            driver=driver,
            publish=lambda s, p, q: sent.append((s, p, q)),
        )
        made.append((t, driver))
        t.start()
        return t, driver, sent

    yield make
    for t, d in made:
        await t.stop()
        await d.close()


async def cycle(driver: OpcUaDriver, setpoint: float) -> None:
    """One machine cycle: Result := 2 x setpoint, Cycles += 1."""
    await driver.write({"setpoint": driver.encode("setpoint", setpoint)})
    await driver.write({"trigger": driver.encode("trigger", True)})
    await driver.wait_until("done", True, 3)
    await driver.write({"trigger": driver.encode("trigger", False)})
    await driver.wait_until("done", False, 3)


def test_an_opcua_driver_pushes_a_modbus_driver_does_not() -> None:
    from edge_agent.machine.modbus import ModbusDriver

    assert issubclass(OpcUaDriver, PushingDriver)
    assert not issubclass(ModbusDriver, PushingDriver)  # telemetry polls it


async def test_values_arrive_by_subscription_on_change_with_no_read(
    watch: Any, opcua_machine: OpcUaMachineProcess
) -> None:
    _, driver, sent = await watch(
        opcua_machine, "  clock:\n    interval: 0.1\n    points: [counter, cycles]\n"
    )

    def group() -> list[dict[str, Any]]:
        return messages(sent, "telemetry/clock")

    await until(lambda: len(group()) >= 4, 6, "three changes of the 1 Hz counter")

    first, *later = group()[:4]
    assert first["full"] is True and set(first["values"]) == {"counter", "cycles"}
    assert first["quality"] == "good"
    # By exception: only the counter moves, one message per change, a second apart, although the
    # group's interval is 0.1 s (a poll would have looked 10 times a second).
    counts = []
    for m in later:
        assert m["full"] is False and list(m["values"]) == ["counter"]
        counts.append(m["values"]["counter"])
    assert counts == list(range(counts[0], counts[0] + 3))
    stamps = [datetime.fromisoformat(m["time"]).timestamp() for m in later]
    assert [round(b - a) for a, b in itertools.pairwise(stamps)] == [1, 1]
    assert abs(stamps[-1] - time.time()) < 1.0
    assert driver.reads == 0


async def test_deadband_applies_to_pushed_values(
    watch: Any, opcua_machine: OpcUaMachineProcess
) -> None:
    t, driver, sent = await watch(
        opcua_machine, "  results:\n    interval: 0.05\n    points: {result: 0.01, cycles: 0}\n"
    )

    def group() -> list[dict[str, Any]]:
        return messages(sent, "telemetry/results")

    await until(lambda: len(group()) >= 1, 3, "the first full report")
    start = group()[0]["values"]["cycles"]

    def reported(point: str) -> list[Any]:
        return [m["values"][point] for m in group()[1:] if point in m["values"]]

    # The cycles run through a second session, as a station's handshake would: its waits may
    # confirm a value with a Read when a notification is late (a loaded machine), and those
    # Reads are not telemetry's. The watching driver must make none.
    station = OpcUaDriver(driver.settings, driver.profile)
    await station.connect()
    try:
        await cycle(station, 1.0)
        await until(lambda: reported("cycles")[-1:] == [start + 1], 10, "cycle 1 reported")
        await cycle(station, 1.004)  # result 2.008: within the 0.01 deadband of 2.0
        await until(lambda: reported("cycles")[-1:] == [start + 2], 10, "cycle 2 reported")
        await cycle(station, 1.5)
        await until(lambda: reported("cycles")[-1:] == [start + 3], 10, "cycle 3 reported")
        await until(lambda: reported("result")[-1:] == [3.0], 10, "result of cycle 3")
    finally:
        await station.close()

    assert reported("result") == [2.0, 3.0]  # 2.008 was never sent
    assert reported("cycles") == [start + 1, start + 2, start + 3]
    assert t.status()["results"]["quality"] == "good"
    assert driver.reads == 0


async def test_server_killed_goes_stale_then_recovers_when_it_is_back(
    watch: Any, tmp_path: Path
) -> None:
    machine = OpcUaMachineProcess(tmp_path / "server-pki")
    machine.start()
    try:
        connecting = time.time()
        t, driver, sent = await watch(
            machine,
            "  clock:\n    interval: 0.1\n    points: [counter]\n"
            "  idle:\n    interval: 0.1\n    points: [label]\n",
        )

        def group() -> list[dict[str, Any]]:
            return messages(sent, "telemetry/clock")

        await until(lambda: len(group()) >= 2, 5, "the counter ticking")
        # The label was set when the server started: its message carries the server's
        # SourceTimestamp of that moment, not the time the gateway received it.
        (idle,) = messages(sent, "telemetry/idle")
        assert datetime.fromisoformat(idle["time"]).timestamp() < connecting

        machine.kill()
        await until(lambda: events(sent, "telemetry_stale"), 3, "telemetry_stale")
        stale = [m for m in group() if m["quality"] == "stale"]
        assert len(stale) == 1 and stale[0]["points"] == ["counter"]
        assert events(sent, "telemetry_stale")[0]["device"] == driver.device
        assert t.status()["clock"]["quality"] == "stale"
        await asyncio.sleep(0.3)  # still down: silence, no repeated stale messages
        assert len([m for m in group() if m["quality"] == "stale"]) == 1

        before = len(group())
        machine.start()  # a fresh server: its counter starts again from 0
        await until(lambda: events(sent, "telemetry_recovered"), 10, "telemetry_recovered")
        await until(lambda: len(group()) > before, 3, "a report after the recovery")
        back = group()[before]
        assert back["full"] is True and back["quality"] == "good"
        assert back["values"]["counter"] < 5
        # The subscription was restored: the counter keeps coming, still without a Read.
        await until(
            lambda: group()[-1]["values"].get("counter", -1) > back["values"]["counter"],
            3,
            "the counter after the restart",
        )
        assert t.status()["clock"]["quality"] == "good"
        assert len(events(sent, "telemetry_stale")) == 1
        assert driver.reads == 0
    finally:
        machine.stop()


async def test_the_station_publishes_the_reference_profiles_group_over_mqtt(
    tmp_path: Path,
    opcua_machine: OpcUaMachineProcess,
    broker: EmbeddedBroker,
    recorder: MqttRecorder,
) -> None:
    async with opcua_station(tmp_path, broker.port, machine_yaml(opcua_machine.url)) as station:
        (first,) = await recorder.wait_for("/telemetry/machine", 1)
        assert first["full"] is True and set(first["values"]) == {"counter", "result", "cycles"}
        params = {**PROCESS, "setpoint": 33.25}  # result 66.5, new to this machine
        report = await station.cycle(station.tag(routing(params), done=1))
        assert report.status == "ok", report.error

        def reported(point: str) -> list[Any]:
            later = recorder.json("/telemetry/machine")[1:]
            return [m["values"][point] for m in later if point in m["values"]]

        def result_seen() -> bool:
            return 66.5 in reported("result") and report.results["cycles"] in reported("cycles")

        await until(result_seen, 3, "the cycle's result as telemetry")
        status = station.agent.line_status()["telemetry"]["machine"]
        assert status["quality"] == "good"
