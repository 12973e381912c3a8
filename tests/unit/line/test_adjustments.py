"""Live parameter adjustments: retained on a real mosquitto, applied by the agent to real cycles."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.publish
import pytest

from edge_agent.instructions.model import Step
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import DRILL, MILL, Station, running_station

ON = "commands: {adjustments: true}\n"
V1 = {
    "version": "lot-4711/1",
    "rules": [
        {"parameter": "feed_rate", "scale": 0.9},
        {"parameter": "coolant_temp", "add": 5, "operation": "mill"},
        {"operation": "drill", "program": 2},
        {"parameter": "tool", "set": 9, "variant": "B-short*"},  # this part is a B-long
    ],
}


async def publish(broker: EmbeddedBroker, payload: dict[str, Any] | bytes) -> None:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    await asyncio.to_thread(
        paho.mqtt.publish.single,
        "edge/gw-test/adjustments",
        body,
        qos=1,
        retain=True,
        hostname=broker.host,
        port=broker.port,
    )


async def active_version(station: Station, version: str | None) -> None:
    for _ in range(500):
        if (station.agent.adjustments.state()["version"]) == version:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"adjustment set {version} never became active")


async def events(recorder: MqttRecorder, name: str) -> list[dict[str, Any]]:
    for _ in range(500):
        found = [e for e in recorder.json("gw-test/events") if e["event"] == name]
        if found:
            return found
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {name} event")


@pytest.fixture
async def station(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker
) -> AsyncIterator[Station]:
    await publish(broker, V1)  # retained before the agent starts: it gets it on connect
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=ON) as s:
        await active_version(s, "lot-4711/1")
        yield s


async def test_adjustments_are_applied_and_recorded(
    station: Station, reference_plc: ReferencePlc, recorder: MqttRecorder
) -> None:
    report = await station.cycle(station.tag([Step("drill", DRILL, "st-20")]))
    assert report.status == "ok", report.error
    holding = reference_plc.snapshot()["holding"]
    assert holding[1] == 2885  # 320.5 * 0.9 = 288.45 mm/min at 0.1 resolution, rounded half up
    assert holding[9] == 2  # program replaced for drill
    assert holding[7] == DRILL["tool"]  # the tool rule is for B-short variants only
    assert report.adjustments == {
        "version": "lot-4711/1",
        "changes": [
            {"rule": 0, "parameter": "feed_rate", "was": 320.5, "now": 288.45},
            {"rule": 2, "program": 2, "was": 1},
        ],
    }
    # The report says what the machine holds: 288.45 is 2885 at 0.1 resolution, i.e. 288.5.
    values = {p["name"]: p for p in report.parameters}
    assert values["feed_rate"]["value"] == 288.5 and values["feed_rate"]["requested"] == 288.45
    assert values["spindle_speed"]["value"] == DRILL["spindle_speed"]
    assert "requested" not in values["spindle_speed"]
    [sent] = await recorder.wait_for("gw-test/cycles", 1)
    assert sent["adjustments"]["version"] == "lot-4711/1"

    mill = await station.cycle(station.tag([Step("mill", MILL, "st-20")], uid=b"\x04" * 7))
    assert mill.status == "ok"
    assert [c.get("parameter") for c in (mill.adjustments or {})["changes"]] == [
        "feed_rate",
        "coolant_temp",
    ]
    assert mill.results["actual_coolant_temp"] == pytest.approx(MILL["coolant_temp"] + 5)


async def test_adjusted_values_meet_the_profiles_limits_before_anything_is_written(
    station: Station, broker: EmbeddedBroker, reference_plc: ReferencePlc
) -> None:
    await publish(broker, {"version": "v2", "rules": [{"parameter": "spindle_speed", "scale": 10}]})
    await active_version(station, "v2")
    before = reference_plc.snapshot()
    report = await station.cycle(station.tag([Step("drill", DRILL, "st-20")]))
    assert report.status == "rejected" and report.reason == "out_of_limits"
    assert "spindle_speed=15000" in str(report.error) and "12000" in str(report.error)
    assert report.adjustments is not None and report.adjustments["version"] == "v2"
    assert report.machine_state == "untouched" and reference_plc.snapshot() == before


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"{nope", "not JSON"),
        ({"rules": []}, "version"),
        ({"version": "v3", "rules": [{"parameter": "depth"}]}, "exactly one of"),
        ({"version": "v3", "rules": [{"parameter": "depth", "scale": 2, "add": 1}]}, "exactly one"),
        ({"version": "v3", "rules": [{"parameter": "nozzle", "add": 1}]}, "nozzle"),
        (
            {"version": "v3", "rules": [{"operation": "weld", "parameter": "depth", "add": 1}]},
            "weld",
        ),
        (
            {"version": "v3", "rules": [{"operation": "press", "parameter": "depth", "add": 1}]},
            "press",
        ),
        ({"version": "v3", "rules": [{"program": 7}]}, "program=7 is outside the safe range"),
        ({"version": "v3", "rules": [{"program": 70000}]}, "above maximum 3"),
        ({"version": "v3", "rules": [{"parameter": "depth", "scale": "fast"}]}, "scale"),
    ],
)
async def test_an_invalid_set_is_refused_with_a_reason_and_the_last_one_stays(
    station: Station,
    broker: EmbeddedBroker,
    recorder: MqttRecorder,
    payload: dict[str, Any] | bytes,
    words: str,
) -> None:
    await publish(broker, payload)
    [event] = await events(recorder, "adjustments_refused")
    assert words in "; ".join(event["problems"]), event
    assert event["kept"] == "lot-4711/1"
    assert station.agent.adjustments.state()["version"] == "lot-4711/1"


async def test_an_empty_retained_message_clears_the_set(
    station: Station, broker: EmbeddedBroker, reference_plc: ReferencePlc
) -> None:
    await publish(broker, b"")
    await active_version(station, None)
    report = await station.cycle(station.tag([Step("drill", DRILL, "st-20")]))
    assert report.status == "ok" and report.adjustments is None
    assert reference_plc.snapshot()["holding"][1] == 3205


async def test_off_unless_the_config_enables_them(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker
) -> None:
    await publish(broker, V1)
    async with running_station(tmp_path, reference_plc.port, broker.port) as station:
        await asyncio.sleep(0.2)
        report = await station.cycle(station.tag([Step("drill", DRILL, "st-20")]))
    assert report.status == "ok" and report.adjustments is None
    assert reference_plc.snapshot()["holding"][1] == 3205
