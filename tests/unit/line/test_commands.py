"""Commands from the line: a real mosquitto, the real reference PLC, the whole agent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client
import paho.mqtt.publish
import pytest

from edge_agent.instructions.model import Step
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import DRILL, PROFILE, Station, certified, running_station

ALL = (
    "commands: {allowed: [status, read, write, pause, resume, reload, push_profile, "
    "rollback_profile]}\n"
)


@pytest.fixture
async def station(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker
) -> AsyncIterator[Station]:
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=ALL) as s:
        yield s


class Line:
    """The line's side: publishes a command, waits for the reply with the same id."""

    def __init__(self, broker: EmbeddedBroker, recorder: MqttRecorder) -> None:
        self.broker, self.recorder = broker, recorder
        self.n = 0

    async def send(self, name: str, payload: bytes | str) -> None:
        await asyncio.to_thread(
            paho.mqtt.publish.single,
            f"edge/gw-test/cmd/{name}",
            payload,
            qos=1,
            hostname=self.broker.host,
            port=self.broker.port,
        )

    async def reply(self, name: str, index: int = 0, timeout: float = 5) -> dict[str, Any]:
        return (await self.recorder.wait_for(f"gw-test/reply/{name}", index + 1, timeout))[index]

    async def call(self, name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self.n += 1
        cid = f"c-{self.n}"
        before = len(self.recorder.json(f"gw-test/reply/{name}"))
        body: dict[str, Any] = {"correlation_id": cid}
        if params is not None:
            body["params"] = params
        await self.send(name, json.dumps(body))
        reply = await self.reply(name, before)
        assert reply["correlation_id"] == cid and reply["command"] == name
        return reply


@pytest.fixture
def line(broker: EmbeddedBroker, recorder: MqttRecorder) -> Line:
    return Line(broker, recorder)


async def in_cycle(station: Station, timeout: float = 5) -> None:
    """Return once the station's cycle holds the machine."""
    for _ in range(int(timeout / 0.005)):
        if station.agent.machine_lock.locked():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("no cycle started")


def edit(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


def error(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    assert reply["error"]["message"]
    return str(reply["error"]["code"])


async def test_status(station: Station, line: Line) -> None:
    reply = await line.call("status")
    assert reply["ok"] is True and reply["schema"] == "edge-agent/reply/1"
    result = reply["result"]
    assert result["gateway_id"] == "gw-test" and result["profile"]["name"] == "reference-plc"
    assert result["paused"] is False and result["cycle_running"] is False
    assert result["machine_connected"] is True
    assert set(result["telemetry"]) == {"process", "setpoints"}
    assert result["adjustments"] == {"version": None, "rules": 0}


async def test_read_named_points_with_scaling(
    station: Station, line: Line, reference_plc: ReferencePlc
) -> None:
    reference_plc.poke("holding", 0, [1500, 3205])
    reply = await line.call("read", {"points": ["spindle_speed", "feed_rate", "trigger"]})
    assert reply["ok"] is True
    assert reply["result"]["values"] == {
        "spindle_speed": 1500,
        "feed_rate": pytest.approx(320.5),
        "trigger": False,
    }
    assert error(await line.call("read", {"points": ["nozzle"]})) == "unknown_point"


async def test_write_named_points_with_scaling(
    station: Station, line: Line, reference_plc: ReferencePlc
) -> None:
    reply = await line.call("write", {"values": {"feed_rate": 250.5, "tool": 7}})
    assert reply["ok"] is True, reply
    assert reply["result"]["written"]["feed_rate"] == {"value": 250.5, "raw": [2505]}
    holding = reference_plc.snapshot()["holding"]
    assert holding[1] == 2505 and holding[7] == 7


@pytest.mark.parametrize(
    ("values", "code", "words"),
    [
        ({"spindle_speed": 12001}, "out_of_limits", "above maximum 12000"),
        ({"coolant_temp": 4.9}, "out_of_limits", "below minimum 5"),
        ({"tool": "three"}, "invalid_value", "must be a number"),
        ({"actual_tool": 3}, "read_only", "read-only"),
        ({"done": True}, "read_only", "read-only"),
        ({"trigger": True}, "cycle_point", "handshake"),
        ({"program": 2}, "cycle_point", "handshake"),
        ({"nozzle": 1}, "unknown_point", "nozzle"),
    ],
)
async def test_write_refusals_leave_the_machine_untouched(
    station: Station,
    line: Line,
    reference_plc: ReferencePlc,
    values: dict[str, Any],
    code: str,
    words: str,
) -> None:
    before = reference_plc.snapshot()
    writes = sum(reference_plc.requests[fc] for fc in (5, 6, 15, 16))
    reply = await line.call("write", {"values": {"dwell": 100, **values}})
    assert error(reply) == code
    assert words in reply["error"]["message"]
    assert reference_plc.snapshot() == before
    assert sum(reference_plc.requests[fc] for fc in (5, 6, 15, 16)) == writes


async def test_write_is_refused_while_a_cycle_runs(
    station: Station, line: Line, reference_plc: ReferencePlc
) -> None:
    reference_plc.done_delay = 0.6
    tag = station.tag([Step("drill", DRILL, "st-20")])
    station.reader.present(tag)
    await in_cycle(station)
    reply = await line.call("write", {"values": {"dwell": 999}})
    assert error(reply) == "busy"
    report = await asyncio.wait_for(station.reports.get(), 5)
    assert report.status == "ok" and report.results["actual_dwell"] == DRILL["dwell"]
    assert reference_plc.snapshot()["holding"][8] == DRILL["dwell"]
    # Between cycles the same write goes through.
    assert (await line.call("write", {"values": {"dwell": 999}}))["ok"] is True
    assert reference_plc.snapshot()["holding"][8] == 999


async def test_a_read_sent_during_a_cycle_goes_to_the_machine_once_the_cycle_ends(
    station: Station, line: Line, reference_plc: ReferencePlc
) -> None:
    # Sent into the cycle, its request would hold up the cycle's next one by a round trip.
    reference_plc.done_delay = 0.4
    tag = station.tag([Step("drill", DRILL, "st-20")])
    station.reader.present(tag)
    await in_cycle(station)
    reply = await line.call("read", {"points": ["tool"]})
    assert reply["ok"] is True and reply["result"]["values"] == {"tool": DRILL["tool"]}
    assert not station.reports.empty(), "the read was answered while the cycle still ran"
    assert (await station.reports.get()).status == "ok"


async def test_pause_lets_the_part_in_the_machine_finish_and_refuses_new_parts(
    station: Station, line: Line, reference_plc: ReferencePlc, recorder: MqttRecorder
) -> None:
    reference_plc.done_delay = 0.4
    first = station.tag([Step("drill", DRILL, "st-20")], uid=b"\x04\x00\x00\x00\x00\x00\x01")
    station.reader.present(first)
    await in_cycle(station)
    reply = await line.call("pause")
    assert reply["result"] == {"paused": True, "cycle_running": True}
    report = await asyncio.wait_for(station.reports.get(), 5)
    assert report.status == "ok"  # the part in the machine finished
    station.reader.remove(first.uid)

    cycles = reference_plc.cycles
    second = station.tag([Step("drill", DRILL, "st-20")], uid=b"\x04\x00\x00\x00\x00\x00\x02")
    refused = await station.cycle(second)
    assert refused.status == "rejected" and refused.reason == "paused"
    assert refused.machine_state == "untouched" and reference_plc.cycles == cycles
    sent = await recorder.wait_for("gw-test/cycles", 2)
    assert sent[1]["reason"] == "paused" and sent[1]["tag_uid"] == "04000000000002"
    assert sent[1]["part"]["id"] == "P-1" and sent[1]["key_id"] == "mes"  # which part it was
    assert second.writes == 0  # the tag is read, not written
    assert (await line.call("status"))["result"]["paused"] is True

    assert (await line.call("resume"))["result"] == {"paused": False}
    assert (await station.cycle(second)).status == "ok"
    assert reference_plc.cycles == cycles + 1


async def test_malformed_and_unknown_commands_get_an_error_reply(
    station: Station, line: Line
) -> None:
    await line.send("status", b"{not json")
    reply = await line.reply("status")
    assert error(reply) == "malformed" and reply["correlation_id"] is None
    await line.send("status", b"[1, 2]")
    assert error(await line.reply("status", 1)) == "malformed"
    await line.send("status", json.dumps({"params": {}}))  # no correlation id
    assert "correlation_id" in (await line.reply("status", 2))["error"]["message"]
    await line.send("status", b"\xff\xfe")
    assert error(await line.reply("status", 3)) == "malformed"

    assert error(await line.call("self_destruct")) == "unknown_command"
    reply = await line.call("read", {"point": ["tool"]})
    assert error(reply) == "invalid_params" and "params.point" in reply["error"]["message"]
    assert error(await line.call("pause", {"now": True})) == "invalid_params"
    # And the agent is still there.
    assert (await line.call("status"))["ok"] is True


async def test_commands_not_allowed_by_the_config(
    tmp_path: Path,
    reference_plc: ReferencePlc,
    broker: EmbeddedBroker,
    line: Line,
) -> None:
    async with running_station(tmp_path, reference_plc.port, broker.port):  # default: read-only
        reply = await line.call("write", {"values": {"tool": 4}})
        assert error(reply) == "not_allowed" and "read, status" in reply["error"]["message"]
        assert error(await line.call("pause")) == "not_allowed"
        assert reference_plc.snapshot()["holding"][7] == 0
        assert (await line.call("read", {"points": ["tool"]}))["ok"] is True


async def test_reload_applies_a_valid_config_and_refuses_an_invalid_one(
    station: Station, line: Line
) -> None:
    path = Path(station.agent.config.source)
    edit(path, ALL, "commands: {allowed: [status, reload]}\n")
    reply = await line.call("reload")
    assert reply["ok"] is True, reply
    assert reply["result"]["machine_reloaded"] is False
    assert reply["result"]["restart_required"] == []
    assert error(await line.call("read", {"points": ["tool"]})) == "not_allowed"

    edit(path, "[status, reload]", "[status, reload, fly]")
    reply = await line.call("reload")
    assert error(reply) == "invalid_config"
    assert (
        f"{path}:" in reply["error"]["message"] and "commands.allowed" in reply["error"]["message"]
    )
    assert (await line.call("status"))["ok"] is True  # still running on the last good config


def narrower_profile() -> str:
    """The reference profile as version 1.1 with a narrower spindle envelope."""
    text = PROFILE.read_text().replace('version: "1.0"', 'version: "1.1"')
    old = "spindle_speed: {table: holding, address: 0, type: u16, unit: rpm, min: 0, max: 12000}"
    assert old in text
    return text.replace(old, old.replace("max: 12000", "max: 1000"))


async def test_profile_push_activates_between_cycles_and_rolls_back(
    station: Station, line: Line, reference_plc: ReferencePlc
) -> None:
    reference_plc.done_delay = 0.4
    tag = station.tag([Step("drill", DRILL, "st-20")], uid=b"\x04\x00\x00\x00\x00\x00\x01")
    station.reader.present(tag)
    await in_cycle(station)
    params = certified(station.tmp, narrower_profile())
    push = asyncio.create_task(line.call("push_profile", params))
    first = await asyncio.wait_for(station.reports.get(), 5)
    reply = await push
    # The cycle in the machine finished on the profile it started with; then 1.1 took over.
    assert first.status == "ok" and first.profile["version"] == "1.0"
    assert reply["ok"] is True, reply
    assert reply["result"]["profile"]["version"] == "1.1"
    assert reply["result"]["previous"]["version"] == "1.0"
    status = (await line.call("status"))["result"]
    assert status["profile"]["version"] == "1.1"
    assert set(status["telemetry"]) == {"process", "setpoints"}
    station.reader.remove(tag.uid)
    reference_plc.done_delay = 0

    # DRILL's 1500 rpm is outside the pushed envelope: refused before anything is written.
    second = station.tag([Step("drill", DRILL, "st-20")], uid=b"\x04\x00\x00\x00\x00\x00\x02")
    refused = await station.cycle(second)
    assert refused.reason == "out_of_limits" and refused.profile["version"] == "1.1"
    assert "maximum 1000" in str(refused.error)
    write = await line.call("write", {"values": {"spindle_speed": 1500}})
    assert error(write) == "out_of_limits"

    reply = await line.call("rollback_profile")
    assert reply["result"]["profile"]["version"] == "1.0"
    again = await station.cycle(second)
    assert again.status == "ok" and again.profile["version"] == "1.0"


@pytest.mark.parametrize(
    ("yaml", "words"),
    [
        ("profile: [unclosed", "pushed profile:2: not valid YAML"),
        (
            PROFILE.read_text().replace("type: u16, unit: rpm", "type: u17, unit: rpm"),
            "pushed profile:12: points.spindle_speed.type",
        ),
        # Points of another driver do not validate: "points.spindle_speed.table: unknown key".
        (PROFILE.read_text().replace("driver: modbus", "driver: opcua"), "pushed profile:12"),
        (PROFILE.read_text().replace("program: 3", "program: 9"), "operations.press.program"),
    ],
    ids=["yaml", "type", "driver", "constant"],
)
async def test_a_bad_profile_push_is_refused_with_the_reason(
    station: Station, line: Line, yaml: str, words: str
) -> None:
    reply = await line.call("push_profile", {"yaml": yaml})
    assert error(reply) == "invalid_config"
    assert words in reply["error"]["message"], reply["error"]["message"]
    assert (await line.call("status"))["result"]["profile"]["version"] == "1.0"
    assert error(await line.call("rollback_profile")) == "invalid_config"  # nothing to go back to


async def test_mqtt5_correlation_data_stands_in_for_a_missing_correlation_id(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from edge_agent.agent import Agent
    from edge_agent.config import load_config
    from edge_agent.tag.simulated import SimulatedReader
    from tests.station_harness import write_config

    path = write_config(tmp_path, reference_plc.port, broker.port, extra=ALL)
    edit(path, "broker: {", "broker: {protocol: 5, ")
    edit(path, "commands: {", "commands: {response_topics: ['mes/#'], ")
    agent = Agent(load_config(path), reader=SimulatedReader())
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        assert await agent.uplink.wait_connected(5)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = b"mes-5-0042"
        props.ResponseTopic = "mes/replies"
        client = paho.mqtt.client.Client(
            CallbackAPIVersion.VERSION2, protocol=paho.mqtt.client.MQTTv5
        )
        client.connect(broker.host, broker.port)
        client.loop_start()
        try:
            info = client.publish(
                "edge/gw-test/cmd/status", json.dumps({"params": {}}), qos=1, properties=props
            )
            await asyncio.to_thread(info.wait_for_publish, 5)
        finally:
            client.loop_stop()
            client.disconnect()
        [reply] = await recorder.wait_for("gw-test/reply/status", 1)
        assert reply["ok"] is True and reply["correlation_id"] == "mes-5-0042"
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
