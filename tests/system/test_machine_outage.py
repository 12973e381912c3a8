"""Machine unavailable is not a failed part: refused untouched, and the first part after it runs.

The machine is the OPC UA simulator in its own process, killed (as by a power cut) and started
again on the same port while parts are presented one after another. The backoff is set far longer
than the test may take, so only the attempt each arriving part makes can bring the machine back
in time. ``benchmarks/outage.py`` runs the same outage and prints how soon the first ok follows.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.instructions.model import Step
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc
from edge_agent.station.report import CycleReport
from tests.fixtures_broker import MqttRecorder
from tests.fixtures_opcua import OpcUaMachineProcess, machine_yaml, opcua_station
from tests.station_harness import DRILL, Station, running_station
from tests.system.test_opcua_station import PROCESS, routing

# Far longer than the test: without the attempt a part makes, the machine stays unused.
LONG_BACKOFF = {"reconnect_min": 60.0, "reconnect_max": 120.0}


@dataclass
class Presented:
    report: CycleReport
    before: bytes  # the tag's message when presented
    after: bytes  # ... and when taken away


@dataclass
class Outage:
    refused: list[Presented] = field(default_factory=list)  # parts while the machine was away
    first_ok: Presented | None = None
    first_ok_s: float = 0.0  # from the machine answering again to the first ok report


async def present(station: Station, n: int) -> Presented:
    uid = bytes([4, 0, 0, 0, 0, n >> 8 & 0xFF, n & 0xFF])
    tag = station.tag(routing(PROCESS), done=1, part_id=f"P-{n}", uid=uid)
    before = tag.message
    report = await station.cycle(tag, timeout=30)
    return Presented(report, before, tag.message)


async def through_outage(
    station: Station, machine: OpcUaMachineProcess, *, gap: float = 0.05, limit: float = 60
) -> Outage:
    """Kill the machine, present parts every ``gap`` s, start it again (in a thread, so parts keep
    coming while it boots) and go on until the first ok."""
    outage = Outage()
    machine.kill()
    while station.agent.driver.connected:  # noqa: ASYNC110 (noticed from the socket)
        await asyncio.sleep(0.01)
    ready: list[float] = []

    def restart() -> None:
        machine.start()  # returns once the endpoint answers
        ready.append(time.monotonic())

    starting = asyncio.create_task(asyncio.to_thread(restart))
    deadline = time.monotonic() + limit
    n = 1
    while time.monotonic() < deadline:
        n += 1
        part = await present(station, n)
        if part.report.status == "ok":
            outage.first_ok = part
            break
        outage.refused.append(part)
        await asyncio.sleep(gap)
    await starting
    if outage.first_ok is not None:
        outage.first_ok_s = time.monotonic() - ready[0]
    return outage


def assert_refused_untouched(part: Presented) -> None:
    report = part.report
    assert report.status == "rejected", (report.status, report.reason, report.error)
    assert report.reason == "machine_unavailable"
    assert report.machine_state == "untouched" and report.tag_write == "skipped"
    assert part.after == part.before  # the tag carries no FAILED step
    error = report.error or ""
    assert "the machine cannot be reached" in error and "the tag is unchanged" in error
    assert "Error" not in error and "Traceback" not in error  # words, not class names


async def test_parts_in_an_outage_are_refused_untouched_and_the_first_after_it_runs(
    tmp_path: Path, broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    machine = OpcUaMachineProcess(tmp_path / "server-pki")
    machine.start()
    try:
        async with opcua_station(
            tmp_path, broker.port, machine_yaml(machine.url, **LONG_BACKOFF)
        ) as station:
            first = await present(station, 1)
            assert first.report.status == "ok", first.report.error
            sessions = station.agent.driver.sessions

            outage = await through_outage(station, machine)

            assert outage.refused, "no part arrived while the machine was away"
            for part in outage.refused:
                assert_refused_untouched(part)
            ok = outage.first_ok
            assert ok is not None, "no ok cycle after the machine came back (backoff waited?)"
            assert ok.after != ok.before and ok.report.tag_write == "ok"  # the step is recorded
            assert station.agent.driver.sessions == sessions + 1
            print(f"first ok {outage.first_ok_s:.3f} s after the machine answered again")
        count = 2 + len(outage.refused)
        reports = await recorder.wait_for("/cycles", count)
        assert "failed" not in {r["status"] for r in reports}
    finally:
        machine.stop()


async def test_modbus_plc_stopped_parts_refused_untouched_then_the_next_part_runs(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker
) -> None:
    steps = [Step("drill", DRILL, "st-10"), Step("drill", DRILL, "st-20")]
    off = "telemetry: {enabled: false}\n"  # only parts talk to the PLC here
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=off) as station:
        driver = station.agent.driver
        for n in range(1, 5):
            if n == 2:
                await reference_plc.stop()
                while driver.connected:  # noqa: ASYNC110 (noticed from the socket)
                    await asyncio.sleep(0.01)
            tag = station.tag(steps, done=1, uid=bytes([4, 1, 0, 0, 0, 0, n]))
            before = tag.message
            report = await station.cycle(tag)
            if n == 1:
                assert report.status == "ok", report.error
            else:
                assert_refused_untouched(Presented(report, before, tag.message))
        assert "modbus 127.0.0.1" in (report.error or "")  # names the device

        await reference_plc.start(reference_plc.host, reference_plc.port)
        reference_plc.requests.clear()
        tag = station.tag(steps, done=1, uid=bytes([4, 1, 0, 0, 0, 0, 9]))
        report = await station.cycle(tag)
        assert report.status == "ok", report.error  # the part's arrival reconnected at once
        assert reference_plc.requests  # and this part's cycle ran on the PLC
