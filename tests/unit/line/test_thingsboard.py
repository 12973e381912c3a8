"""ThingsBoard IoT Gateway compatibility: real mosquitto, the reference PLC, the whole agent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.publish
import pytest

from edge_agent.instructions.model import Step
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import DRILL, Station, running_station

DEVICE = "Press 20"
TB = f"thingsboard: {{enabled: true, device: {DEVICE!r}}}\n"


@pytest.fixture
async def station(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker, recorder: MqttRecorder
) -> AsyncIterator[Station]:
    # The recorder listens first: the first (full) reports are not missed.
    extra = TB + "commands: {allowed: [status, read, write], adjustments: true}\n"
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=extra) as s:
        yield s


async def send(broker: EmbeddedBroker, topic: str, body: dict[str, Any]) -> None:
    await asyncio.to_thread(
        paho.mqtt.publish.single,
        topic,
        json.dumps(body),
        qos=1,
        hostname=broker.host,
        port=broker.port,
    )


def replies(recorder: MqttRecorder) -> list[dict[str, Any]]:
    """RPC responses on v1/gateway/rpc (the recorder also sees the requests: they have ``data.id``)."""
    found = []
    for topic, payload, _ in list(recorder.messages):
        if topic == "v1/gateway/rpc" and payload.startswith(b"{") and b'"id"' in payload:
            message = json.loads(payload)
            if "id" in message:
                found.append(message)
    return found


async def rpc(
    broker: EmbeddedBroker,
    recorder: MqttRecorder,
    rpc_id: int,
    method: str,
    params: Any = None,
    device: str = DEVICE,
) -> dict[str, Any]:
    await send(
        broker,
        "v1/gateway/rpc",
        {"device": device, "data": {"id": rpc_id, "method": method, "params": params}},
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not (found := [m for m in replies(recorder) if m["id"] == rpc_id]):
        assert loop.time() < deadline, f"no RPC reply with id {rpc_id}"
        await asyncio.sleep(0.01)
    [reply] = found
    return reply


async def test_connect_announces_the_device_and_shutdown_disconnects_it(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=TB):
        [connect] = await recorder.wait_for("v1/gateway/connect", 1)
        assert connect == {"device": DEVICE, "type": "edge-agent station"}
        assert not recorder.json("v1/gateway/disconnect")
    [disconnect] = await recorder.wait_for("v1/gateway/disconnect", 1)
    assert disconnect == {"device": DEVICE}
    # Raw ThingsBoard payloads: the agent's own id/seq are not added.
    assert "seq" not in connect and "id" not in disconnect


async def test_the_device_name_defaults_to_gateway_and_station(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    extra = "thingsboard: {enabled: true}\n"
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=extra):
        [connect] = await recorder.wait_for("v1/gateway/connect", 1)
    assert connect["device"] == "gw-test-st-20"


async def test_telemetry_groups_go_to_the_gateway_telemetry_topic_too(
    station: Station, recorder: MqttRecorder
) -> None:
    [ours] = await recorder.wait_for("gw-test/telemetry/process", 1)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:  # the first full report of the process group, as ThingsBoard telemetry
        tb = [
            m[DEVICE][0]
            for m in recorder.json("v1/gateway/telemetry")
            if "process.quality" in m[DEVICE][0]["values"]
        ]
        if tb:
            break
        assert loop.time() < deadline, recorder.json("v1/gateway/telemetry")
        await asyncio.sleep(0.01)
    entry = tb[0]
    assert set(entry) == {"ts", "values"}
    assert entry["ts"] == int(datetime.fromisoformat(ours["time"]).timestamp() * 1000)
    assert entry["values"] == {**ours["values"], "process.quality": "good"}
    assert isinstance(entry["values"]["cycle_count"], int)


async def test_rpc_runs_the_command_and_replies_in_thingsboard_shape(
    station: Station, broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    reply = await rpc(broker, recorder, 41, "read", {"points": ["spindle_speed", "tool"]})
    assert set(reply) == {"device", "id", "data"}
    assert reply["device"] == DEVICE
    data = reply["data"]
    assert data["ok"] is True and data["command"] == "read" and data["correlation_id"] == 41
    assert set(data["result"]["values"]) == {"spindle_speed", "tool"}

    reply = await rpc(broker, recorder, 42, "write", {"values": {"feed_rate": 250.5}})
    assert reply["data"]["ok"] is True, reply
    reply = await rpc(broker, recorder, 43, "read", {"points": ["feed_rate"]})
    assert reply["data"]["result"]["values"]["feed_rate"] == pytest.approx(250.5)

    status = await rpc(broker, recorder, 44, "status")  # params null: no params
    assert status["data"]["ok"] is True and status["data"]["result"]["station"] == "st-20"


@pytest.mark.parametrize(
    ("method", "params", "code"),
    [
        ("pause", None, "not_allowed"),
        ("explode", None, "unknown_command"),
        ("write", {"values": {"feed_rate": 99999}}, "out_of_limits"),
        ("read", "spindle_speed", "malformed"),
    ],
)
async def test_a_refused_rpc_gets_an_error_reply(
    station: Station,
    broker: EmbeddedBroker,
    recorder: MqttRecorder,
    method: str,
    params: Any,
    code: str,
) -> None:
    reply = await rpc(broker, recorder, 7, method, params)
    assert reply["data"]["ok"] is False
    assert reply["data"]["error"]["code"] == code


async def test_rpcs_for_other_devices_or_without_id_are_not_answered(
    station: Station, broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    await send(broker, "v1/gateway/rpc", {"device": "Other", "data": {"id": 1, "method": "status"}})
    await send(broker, "v1/gateway/rpc", {"device": DEVICE, "data": {"method": "status"}})
    await send(broker, "v1/gateway/rpc", {"device": DEVICE, "data": "status"})
    await asyncio.to_thread(
        paho.mqtt.publish.single,
        "v1/gateway/rpc",
        b"{not json",
        qos=1,
        hostname=broker.host,
        port=broker.port,
    )
    # Delivered in order on one subscription: once this one is answered, the others were seen.
    await rpc(broker, recorder, 2, "status")
    assert [m["id"] for m in replies(recorder)] == [2]


async def test_cycle_reports_go_as_device_telemetry(
    station: Station, recorder: MqttRecorder
) -> None:
    report = await station.cycle(station.tag([Step("drill", DRILL, "st-20")]))
    assert report.status == "ok", report.error
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not (
        found := [
            m[DEVICE][0]
            for m in recorder.json("v1/gateway/telemetry")
            if "cycle.id" in m[DEVICE][0]["values"]
        ]
    ):
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    [entry] = found
    values = entry["values"]
    assert values["cycle.id"] == report.id and values["cycle.status"] == "ok"
    assert values["cycle.part_id"] == "P-1" and values["cycle.operation"] == "drill"
    assert values["cycle.tag_uid"] == report.tag_uid
    assert values["cycle.profile_version"] == "1.0"
    assert values["cycle.duration_ms"] == report.durations_ms["total"]
    assert {k for k in values if k.startswith("cycle.result.")} == {
        f"cycle.result.{k}" for k in report.results
    }
    assert "cycle.reason" not in values  # None values are left out
    assert entry["ts"] == int(report.time.timestamp() * 1000)


async def test_a_shared_attribute_carries_the_adjustment_set(
    station: Station, broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    adjustments = {"version": "tb-1", "rules": [{"parameter": "feed_rate", "scale": 0.9}]}
    await send(
        broker,
        "v1/gateway/attributes",
        {"device": DEVICE, "data": {"adjustments": adjustments, "colour": "red"}},
    )
    [event] = await recorder.wait_for("gw-test/events", 1)
    assert event["event"] == "adjustments_applied" and event["version"] == "tb-1"
    report = await station.cycle(station.tag([Step("drill", DRILL, "st-20")]))
    assert report.adjustments is not None and report.adjustments["version"] == "tb-1"

    # An invalid set is refused like on the retained topic; null clears the set.
    bad = {"version": "tb-2", "rules": [{"parameter": "nope", "scale": 2}]}
    await send(broker, "v1/gateway/attributes", {"device": DEVICE, "data": {"adjustments": bad}})
    events = await recorder.wait_for("gw-test/events", 2)
    assert events[1]["event"] == "adjustments_refused" and events[1]["version"] == "tb-2"
    await send(broker, "v1/gateway/attributes", {"device": DEVICE, "data": {"adjustments": None}})
    events = await recorder.wait_for("gw-test/events", 3)
    assert events[2]["event"] == "adjustments_cleared"
    assert station.agent.adjustments.active is None


def test_the_example_config_documents_the_keys_with_their_defaults() -> None:
    from edge_agent.config import load_config
    from tests.station_harness import REPO

    config = load_config(REPO / "config" / "station.example.yaml")
    assert config.thingsboard.enabled is False
    assert config.commands.allowed == ["status", "read"] and config.commands.adjustments is False
    assert config.telemetry.enabled is True


def test_a_bad_thingsboard_key_is_named_with_file_and_line(tmp_path: Path) -> None:
    from edge_agent.config import load_config
    from edge_agent.errors import ConfigError
    from tests.station_harness import write_config

    path = write_config(tmp_path, 1, 1, extra='thingsboard: {enabled: true, device: ""}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = [str(p) for p in info.value.problems]
    assert problem.startswith(f"{path}:7: thingsboard.device:"), problem


async def test_the_device_is_announced_again_after_a_broker_restart(
    tmp_path: Path, reference_plc: ReferencePlc
) -> None:
    # ThingsBoard forgets a gateway's devices when its session ends: every connect announces.
    broker = EmbeddedBroker(persistent=True)  # the watcher's session outlives the restart
    await broker.start()
    watcher = MqttRecorder(broker.host, broker.port, "v1/gateway/#", session="tb-watch")
    try:
        await watcher.ready()
        async with running_station(tmp_path, reference_plc.port, broker.port, extra=TB) as s:
            await watcher.wait_for("v1/gateway/connect", 1)
            await broker.stop()
            await broker.start()
            assert await s.agent.uplink.wait_connected(10)
            connects = await watcher.wait_for("v1/gateway/connect", 2)
            assert connects == [{"device": DEVICE, "type": "edge-agent station"}] * 2
    finally:
        watcher.close()
        await broker.stop()
        broker.close()


async def test_a_stale_group_is_told_as_quality_in_device_telemetry(
    station: Station, reference_plc: ReferencePlc, recorder: MqttRecorder
) -> None:
    await recorder.wait_for("gw-test/telemetry/process", 1)
    await reference_plc.stop()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not (
        stale := [
            m[DEVICE][0]
            for m in recorder.json("v1/gateway/telemetry")
            if m[DEVICE][0]["values"].get("process.quality") == "stale"
        ]
    ):
        assert loop.time() < deadline, recorder.json("v1/gateway/telemetry")
        await asyncio.sleep(0.01)
    assert stale[0]["values"] == {"process.quality": "stale"}
