"""Telemetry groups against the real reference PLC (pymodbus) and, end to end, a real mosquitto."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import ConfigError
from edge_agent.line.telemetry import Telemetry, moved
from edge_agent.machine import modbus
from edge_agent.machine.profile import Profile, load_profile
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import PROFILE, running_station

FC_READ_HOLDING, FC_READ_INPUT = 3, 4
Sent = list[tuple[str, dict[str, Any], int]]


def profile_with(tmp: Path, telemetry: str) -> Profile:
    """The reference profile with its telemetry section replaced."""
    text = PROFILE.read_text()
    text = text[: text.index("\ntelemetry:")] + "\ntelemetry:\n" + telemetry
    path = tmp / "profile.yaml"
    path.write_text(text)
    return load_profile(path)


@pytest.fixture
async def watch(reference_plc: ReferencePlc) -> AsyncIterator[Any]:
    """A factory: Telemetry on a real Modbus driver, messages collected as the uplink gets them."""
    made: list[modbus.ModbusDriver] = []

    def make(profile: Profile) -> tuple[Telemetry, Sent]:
        driver = modbus.create(
            {
                "host": reference_plc.host,
                "port": reference_plc.port,
                "timeout": 0.3,
                "reconnect_min": 0.05,
                "reconnect_max": 0.1,
            },
            profile,
        )
        made.append(driver)
        sent: Sent = []
        t = Telemetry(
            gateway_id="gw-t",
            profile=profile,
            driver=driver,
            publish=lambda s, p, q: sent.append((s, p, q)),
        )
        return t, sent

    yield make
    for d in made:
        await d.close()


def messages(sent: Sent, suffix: str) -> list[dict[str, Any]]:
    return [p for s, p, _ in sent if s == suffix]


async def test_a_group_is_read_in_one_request_per_register_table(
    watch: Any, reference_plc: ReferencePlc
) -> None:
    t, _ = watch(load_profile(PROFILE))
    await t.poll(t.groups["process"])  # 9 points over input registers 0..10
    await t.poll(t.groups["setpoints"])  # 8 points over holding registers 0..9
    assert reference_plc.requests[FC_READ_INPUT] == 1
    assert reference_plc.requests[FC_READ_HOLDING] == 1


@pytest.mark.parametrize(("gap", "requests"), [(8, 1), (7, 2), (0, 2)])
async def test_the_groups_max_gap_decides_whether_a_hole_is_read_through(
    tmp_path: Path, watch: Any, reference_plc: ReferencePlc, gap: int, requests: int
) -> None:
    # spindle_speed is holding 0, program holding 9: 8 unused registers between them.
    profile = profile_with(
        tmp_path,
        f"  sparse: {{interval: 1, max_gap: {gap}, points: [spindle_speed, program]}}\n",
    )
    reference_plc.poke("holding", 0, [1500])
    reference_plc.poke("holding", 9, [2])
    t, sent = watch(profile)
    await t.poll(t.groups["sparse"])
    assert reference_plc.requests[FC_READ_HOLDING] == requests
    [msg] = messages(sent, "telemetry/sparse")
    assert msg["values"] == {"spindle_speed": 1500, "program": 2}


async def test_report_by_exception_with_a_deadband_per_point(
    watch: Any, reference_plc: ReferencePlc
) -> None:
    t, sent = watch(load_profile(PROFILE))
    g = t.groups["process"]
    reference_plc.poke("input", 0, [1000, 3000])  # speed 1000 rpm, feed 300.0 mm/min
    before = time.time()
    await t.poll(g)
    [first] = messages(sent, "telemetry/process")
    assert first["full"] is True and first["quality"] == "good"
    assert set(first["values"]) == set(g.spec.points)  # the first report carries every point
    assert first["values"]["actual_spindle_speed"] == 1000
    assert first["values"]["actual_feed_rate"] == pytest.approx(300.0)
    # The read time, to the millisecond the message carries.
    assert before - 0.001 <= datetime.fromisoformat(first["time"]).timestamp() <= time.time()

    # Unchanged: nothing sent. Within the deadband (5 rpm, 1.0 mm/min): nothing sent.
    await t.poll(g)
    reference_plc.poke("input", 0, [1004, 3009])
    await t.poll(g)
    assert len(messages(sent, "telemetry/process")) == 1

    # Beyond the deadband of one point: one message with that point only.
    reference_plc.poke("input", 0, [1006])
    await t.poll(g)
    second = messages(sent, "telemetry/process")[-1]
    assert second["values"] == {"actual_spindle_speed": 1006}
    assert second["full"] is False

    # The deadband is measured from the value last reported, so a slow drift is reported too.
    for speed in (1008, 1010, 1012):
        reference_plc.poke("input", 0, [speed])
        await t.poll(g)
    assert [m["values"] for m in messages(sent, "telemetry/process")[2:]] == [
        {"actual_spindle_speed": 1012}
    ]

    # A point without deadband is reported on any change; several changes share one message.
    reference_plc.poke("input", 10, [7])
    reference_plc.poke("input", 7, [4])
    await t.poll(g)
    assert messages(sent, "telemetry/process")[-1]["values"] == {"cycle_count": 7, "actual_tool": 4}
    assert all(q == 1 for s, _, q in sent)


async def test_periodic_full_report(
    tmp_path: Path, watch: Any, reference_plc: ReferencePlc
) -> None:
    profile = profile_with(
        tmp_path, "  fast: {interval: 0.01, full_every: 0.15, points: {cycle_count: 0, tool: 0}}\n"
    )
    t, sent = watch(profile)
    t.start()
    await asyncio.sleep(0.4)
    await t.stop()
    reports = messages(sent, "telemetry/fast")
    # Nothing changed: only full reports, at the start and then every 0.15 s.
    assert [m["full"] for m in reports] == [True] * len(reports)
    assert 2 <= len(reports) <= 4
    assert all(m["values"] == {"cycle_count": 0, "tool": 0} for m in reports)
    assert t.groups["fast"].reads >= 20  # it did read on its interval meanwhile


async def test_a_device_that_stops_answering_goes_stale_then_recovers(
    watch: Any, reference_plc: ReferencePlc
) -> None:
    t, sent = watch(load_profile(PROFILE))
    g = t.groups["process"]
    await t.poll(g)
    await reference_plc.stop()
    for _ in range(3):
        await t.poll(g)
    [stale] = [m for m in messages(sent, "telemetry/process") if m["quality"] == "stale"]
    assert stale["values"] == {} and stale["points"] == list(g.spec.points)
    assert "modbus 127.0.0.1" in stale["error"]
    [event] = messages(sent, "events")
    assert event["event"] == "telemetry_stale" and event["group"] == "process"
    assert event["device"] == t.driver.device and event["error"]
    assert t.status()["process"]["quality"] == "stale"

    reference_plc.poke("input", 10, [42])
    await reference_plc.start(reference_plc.host, reference_plc.port)
    deadline = time.monotonic() + 5
    while t.status()["process"]["quality"] == "stale":  # the driver backs off between connects
        assert time.monotonic() < deadline, "never recovered"
        await asyncio.sleep(0.02)
        await t.poll(g)
    recovered = messages(sent, "events")[-1]
    assert recovered["event"] == "telemetry_recovered" and recovered["stale_s"] > 0
    last = messages(sent, "telemetry/process")[-1]
    assert last["quality"] == "good" and last["full"] is True
    assert last["values"]["cycle_count"] == 42
    assert len(messages(sent, "events")) == 2


def test_moved() -> None:
    assert moved(10, 15, 5) is False and moved(10, 15.5, 5) is True and moved(10, 4, 5) is True
    assert moved(1, 2, 0) is True and moved(2, 2, 0) is False
    assert moved(False, True, 5) is True and moved("a", "a", 0) is False
    assert moved(1.0, float("nan"), 5) is True


def test_profile_telemetry_refers_to_known_points(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        profile_with(tmp_path, "  bad: {interval: 0.1, points: [spindle_speed, nozzle]}\n")
    [problem] = err.value.problems
    assert problem.path == "telemetry.bad.points.nozzle" and problem.line is not None
    assert "no point named 'nozzle'" in problem.message
    with pytest.raises(ConfigError) as err:
        profile_with(tmp_path, "  bad: {interval: 0, points: [tool]}\n")
    assert err.value.problems[0].path == "telemetry.bad.interval"


async def test_end_to_end_over_mqtt(
    tmp_path: Path,
    reference_plc: ReferencePlc,
    broker: EmbeddedBroker,
    recorder: MqttRecorder,
) -> None:
    reference_plc.poke("input", 2, list(struct.unpack(">HH", struct.pack(">f", 12.5))))
    async with running_station(tmp_path, reference_plc.port, broker.port):
        [first] = await recorder.wait_for("gw-test/telemetry/process", 1)
        assert first["schema"] == "edge-agent/telemetry/1" and first["gateway_id"] == "gw-test"
        assert first["values"]["actual_depth"] == 12.5 and first["full"] is True
        [setpoints] = await recorder.wait_for("gw-test/telemetry/setpoints", 1)
        assert set(setpoints["values"]) >= {"spindle_speed", "program"}
        reference_plc.poke("input", 10, [5])
        found = await recorder.wait_for("gw-test/telemetry/process", 2)
        assert found[1]["values"] == {"cycle_count": 5}
        # One message per group per read that had something to say, not one per value.
        await asyncio.sleep(0.3)
        assert len(recorder.json("gw-test/telemetry/process")) == 2


async def test_telemetry_can_be_switched_off_per_station(
    tmp_path: Path,
    reference_plc: ReferencePlc,
    broker: EmbeddedBroker,
    recorder: MqttRecorder,
) -> None:
    extra = "telemetry: {enabled: false}\n"
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=extra) as s:
        await asyncio.sleep(0.3)
        assert s.agent.telemetry.status() == {}
    assert reference_plc.requests[FC_READ_INPUT] == reference_plc.requests[FC_READ_HOLDING] == 0
    assert recorder.json("/telemetry/process") == []
