"""The value checked is the value written: real mosquitto, the reference PLC, the whole agent.

A value is judged by what the machine will hold after scale, offset and rounding; that held value
is what reaches the PLC's registers and what the report and the write reply say.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edge_agent.instructions.model import Step
from edge_agent.machine.profile import Profile, load_profile
from edge_agent.machine.profile_schema import ProfileDoc
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc
from tests.fixtures_broker import MqttRecorder
from tests.fixtures_opcua import OpcUaMachineProcess, machine_yaml, opcua_station
from tests.station_harness import DRILL, PROFILE, Station, running_station
from tests.system.test_opcua_station import read_node, routing
from tests.unit.line.test_commands import ALL, Line, error


@pytest.fixture
async def station(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker
) -> AsyncIterator[Station]:
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=ALL) as s:
        yield s


@pytest.fixture
def line(broker: EmbeddedBroker, recorder: MqttRecorder) -> Line:
    return Line(broker, recorder)


async def test_the_report_carries_the_value_the_plc_received(
    station: Station, reference_plc: ReferencePlc
) -> None:
    # feed_rate is a u16 in 0.1 mm/min steps: 320.55 is written as 3206, i.e. 320.6.
    report = await station.cycle(
        station.tag([Step("drill", {**DRILL, "feed_rate": 320.55}, "st-20")])
    )
    assert report.status == "ok", report.error
    assert reference_plc.snapshot()["holding"][1] == 3206
    [feed] = [p for p in report.parameters if p["name"] == "feed_rate"]
    assert feed["value"] == 320.6 and feed["requested"] == 320.55 and feed["raw"] == [3206]
    assert report.results["actual_feed_rate"] == feed["value"]  # the machine's echo agrees


async def test_a_value_that_rounds_out_of_the_envelope_is_refused_naming_both(
    station: Station, reference_plc: ReferencePlc
) -> None:
    # coolant_temp is an i16 in 0.1 °C steps, min 5: 4.94 would be held as 4.9.
    before = reference_plc.snapshot()
    bad = {"spindle_speed": 1500, "feed_rate": 320.5, "depth": 6.0, "tool": 3, "coolant_temp": 4.94}
    report = await station.cycle(station.tag([Step("mill", bad, "st-20")]))
    assert report.status == "rejected" and report.reason == "out_of_limits"
    assert "coolant_temp=4.94 °C is written as 4.9 °C" in str(report.error)
    assert "below minimum 5 °C" in str(report.error)
    assert reference_plc.snapshot() == before


async def test_a_write_reply_says_what_the_plc_holds(
    station: Station, line: Line, reference_plc: ReferencePlc
) -> None:
    reply = await line.call("write", {"values": {"feed_rate": 4999.95}})
    assert reply["ok"] is True, reply
    assert reply["result"]["written"]["feed_rate"] == {
        "value": 5000,
        "requested": 4999.95,
        "raw": [50000],
    }
    assert reference_plc.snapshot()["holding"][1] == 50000


async def test_a_limit_off_the_register_grid_is_refused_on_push(
    station: Station, line: Line, reference_plc: ReferencePlc
) -> None:
    # Accepted before: 4999.95 then passed the check and reached the PLC as 5000.0.
    text = PROFILE.read_text().replace("min: 0, max: 5000}", "min: 0, max: 4999.95}")
    reply = await line.call("push_profile", {"yaml": text})
    assert error(reply) == "invalid_config"
    assert (
        "points.feed_rate.max: max 4999.95 is not on the register grid" in reply["error"]["message"]
    )
    assert (await line.call("status"))["result"]["profile"]["version"] == "1.0"


async def test_an_alias_of_the_trigger_cannot_be_pushed_nor_start_a_cycle(
    station: Station, line: Line, reference_plc: ReferencePlc
) -> None:
    # Accepted before: a write command on start_alias (coil 0) started a machine cycle.
    text = PROFILE.read_text().replace(
        "  # Handshake.\n", "  start_alias: {table: coil, address: 0, type: bool}\n"
    )
    cycles = reference_plc.cycles
    reply = await line.call("push_profile", {"yaml": text})
    assert error(reply) == "invalid_config"
    assert "shares coil 0 with handshake point 'trigger'" in reply["error"]["message"]
    assert error(await line.call("write", {"values": {"start_alias": True}})) == "unknown_point"
    assert reference_plc.cycles == cycles and reference_plc.snapshot()["coil"][0] is False


async def test_a_trigger_that_is_never_reset_cannot_be_pushed(station: Station, line: Line) -> None:
    # Accepted before: every part after the first then got 'ok' with stale results.
    text = PROFILE.read_text().replace(
        "  - reset: trigger\n  - {wait: done, equals: false, timeout: 2}\n", ""
    )
    reply = await line.call("push_profile", {"yaml": text})
    assert error(reply) == "invalid_config"
    assert "sets 'trigger' but no later step resets it" in reply["error"]["message"]


def test_handshake_registers_are_known_by_address_not_name(tmp_path: Path) -> None:
    # The validator refuses such a profile; the profile still answers by address if one is built
    # without it, which is what write commands and adjustments ask.
    profile = load_profile(PROFILE)
    alias = profile.points["trigger"].model_copy()
    points = {**profile.points, "start_alias": alias}
    doc = ProfileDoc.model_validate(
        {
            "profile": "p",
            "version": "1",
            "driver": "modbus",
            "points": {},
            "operations": {"op": {}},
            "handshake": [{"set": "trigger"}, {"wait": "done"}, {"reset": "trigger"}],
            "on_abort": [{"reset": "trigger"}],
        }
    )
    built = Profile(doc, points, "p.yaml", "sha256:0")
    assert built.handshake_owner("start_alias") == "trigger"
    assert built.handshake_owner("trigger") == "trigger"
    assert built.handshake_owner("dwell") is None
    assert built.handshake_points.set == {"trigger"} and built.handshake_points.wait == {"done"}


async def test_over_opcua_the_server_receives_the_reported_value(
    tmp_path: Path, opcua_machine: OpcUaMachineProcess, broker: EmbeddedBroker
) -> None:
    # count is an Int32 node: 4.4 is held as 4, the server gets 4 and the report says 4.
    params = {"setpoint": 2.5, "count": 4.4}
    async with opcua_station(tmp_path, broker.port, machine_yaml(opcua_machine.url)) as station:
        report = await station.cycle(station.tag(routing(params), done=1))
        assert await read_node(opcua_machine.url, "Int32") == 4
    assert report.status == "ok", report.error
    [count] = [p for p in report.parameters if p["name"] == "count"]
    assert (count["value"], count["requested"], count["raw"]) == (4, 4.4, 4)
