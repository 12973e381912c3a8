"""The station cycle over OPC UA: simulated reader -> agent -> reference OPC UA machine (its own
process) -> real mosquitto. Same guarantees as over Modbus."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua

from edge_agent.instructions.model import Step
from edge_agent.machine.opcua.security import thumbprint
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.opcua_machine import NAMESPACE
from edge_agent.station.report import CycleReport
from tests.fixtures_broker import MqttRecorder
from tests.fixtures_opcua import (
    OPCUA_PROFILE,
    OpcUaMachineProcess,
    machine_yaml,
    opcua_station,
)
from tests.station_harness import Station

PROCESS = {"setpoint": 21.5, "count": 4, "coolant": True, "label": "P-1 lot 7"}


def routing(params: dict[str, Any], operation: str = "process") -> list[Step]:
    return [
        Step("process", {"setpoint": 1.0, "count": 1}, "st-10"),
        Step(operation, params, "st-20"),
    ]


async def read_node(url: str, name: str) -> Any:
    async with Client(url) as client:
        idx = await client.get_namespace_index(NAMESPACE)
        return await client.get_node(ua.NodeId(name, idx)).read_value()


async def test_cycle_over_opcua_programs_the_machine_and_reports(
    tmp_path: Path,
    opcua_machine: OpcUaMachineProcess,
    broker: EmbeddedBroker,
    recorder: MqttRecorder,
) -> None:
    async with opcua_station(tmp_path, broker.port, machine_yaml(opcua_machine.url)) as station:
        before = await read_node(opcua_machine.url, "Cycles")
        report = await station.cycle(station.tag(routing(PROCESS), done=1))

    assert report.status == "ok", report.error
    assert report.machine_state == "cycle complete"
    assert report.results == {"expected_result": 43.0, "result": 43.0, "cycles": before + 1}
    assert [(p["name"], p["raw"]) for p in report.parameters] == [
        ("setpoint", 21.5),
        ("count", 4),
        ("coolant", True),
        ("label", "P-1 lot 7"),
    ]
    assert report.tag_write == "ok"
    (published,) = await recorder.wait_for("/cycles", 1)
    assert published["id"] == report.id and published["status"] == "ok"
    assert await read_node(opcua_machine.url, "String") == "P-1 lot 7"


async def test_out_of_limits_is_rejected_with_the_machine_untouched(
    tmp_path: Path, opcua_machine: OpcUaMachineProcess, broker: EmbeddedBroker
) -> None:
    async with opcua_station(tmp_path, broker.port, machine_yaml(opcua_machine.url)) as station:
        before = await read_node(opcua_machine.url, "Double")
        # calibrate narrows setpoint to 10; the String node holds 32 characters.
        params = {"setpoint": 11.0, "count": 2, "label": "x" * 40}
        report = await station.cycle(station.tag(routing(params, "calibrate"), done=1))

    assert report.status == "rejected"
    assert report.machine_state == "untouched"
    assert "setpoint=11.0 mm is outside the safe range: above maximum 10 mm" in (report.error or "")
    assert "is 40 characters long, the point holds at most 32" in (report.error or "")
    assert await read_node(opcua_machine.url, "Double") == before


async def test_a_profile_that_does_not_match_the_server_refuses_parts(
    tmp_path: Path, opcua_machine: OpcUaMachineProcess, broker: EmbeddedBroker
) -> None:
    profile = tmp_path / "reference-opcua.yaml"
    profile.write_text(
        OPCUA_PROFILE.read_text().replace("{node: s=Int32, type: i32", "{node: s=Int32, type: u32")
    )
    machine = machine_yaml(opcua_machine.url, profile=str(profile))
    async with opcua_station(tmp_path, broker.port, machine) as station:
        before = await read_node(opcua_machine.url, "Double")
        report = await station.cycle(station.tag(routing({**PROCESS, "setpoint": 99.0}), done=1))

    assert report.status == "rejected"
    assert report.machine_state == "untouched"
    assert "point 'count'" in (report.error or "")
    assert "DataType is Int32, the profile says u32" in (report.error or "")
    assert await read_node(opcua_machine.url, "Double") == before


async def wait_connected(station: Station, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not station.agent.driver.connected:
        assert time.monotonic() < deadline, "driver did not reconnect"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("security", ["None", "SignAndEncrypt"])
async def test_server_killed_mid_cycle_fails_that_cycle_then_the_station_recovers(
    tmp_path: Path, broker: EmbeddedBroker, recorder: MqttRecorder, security: str
) -> None:
    machine = OpcUaMachineProcess(tmp_path / "server-pki", done_delay=3.0)
    machine.start()
    settings: dict[str, Any] = {}
    if security != "None":
        settings["security"] = {
            "policy": "Basic256Sha256",
            "mode": security,
            "pki": str(tmp_path / "pki"),
            "server_thumbprint": thumbprint(machine.certificate.read_bytes()),
        }
    try:
        async with opcua_station(
            tmp_path, broker.port, machine_yaml(machine.url, **settings)
        ) as station:
            await wait_connected(station)
            tag = station.tag(routing(PROCESS), done=1, uid=b"\x04\x01\x02\x03\x04\x05\x06")
            station.reader.present(tag)
            await asyncio.sleep(0.5)  # parameters written, trigger set, waiting for Done (3 s)
            t0 = time.monotonic()
            machine.kill()
            report: CycleReport = await asyncio.wait_for(station.reports.get(), 5)
            station.reader.remove(tag.uid)
            noticed = time.monotonic() - t0

            assert report.status == "failed"
            assert report.reason == "machine_error"
            assert "connection lost while waiting for done" in (report.error or "")
            assert noticed < 2.0  # the loss is noticed, not waited out to the 5 s timeout
            assert report.tag_write == "ok"  # the step is marked failed on the tag

            machine.done_delay = 0.0
            # Same port, same certificate, but after a firmware update its namespace has another
            # index: the profile names it by URI, so nothing changes for the station.
            machine.extra_namespaces = 3
            machine.start()
            await wait_connected(station)
            async with Client(machine.url) as peer:
                assert await peer.get_namespace_index(NAMESPACE) == 5  # was 2
            again = await station.cycle(station.tag(routing(PROCESS), done=1))

            assert again.status == "ok", again.error
            # A fresh server counts from zero: the failed cycle was not run again behind our back.
            assert again.results["cycles"] == 1
        reports = await recorder.wait_for("/cycles", 2)
        assert [r["status"] for r in reports] == ["failed", "ok"]
    finally:
        machine.stop()
