"""A whole station reading parts through nfcpy: the agent builds its nfc reader from the config."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from edge_agent.demo import DemoOptions, run_demo
from edge_agent.instructions.codec import decode_tag
from edge_agent.instructions.model import Step
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.ntag import NtagImage, NtagSimulator
from edge_agent.sim.reference_plc import ReferencePlc as Plc
from edge_agent.tag.nfc import NfcReader
from tests.station_harness import DRILL, PRESS, Station, running_station


async def test_demo_nfc_writes_progress_back_and_reads_it_back() -> None:
    out = io.StringIO()
    assert await run_demo(DemoOptions(parts=3, nfc=True), out=out) == 0
    lines = out.getvalue().splitlines()
    parts = [line for line in lines if "-> ok" in line]
    assert len(parts) == 3
    for line in parts:
        assert line.endswith("tag ok, read back: progress seq 2, 2/3 steps done"), line
    assert lines[-1] == "3 cycles ok, 0 rejected, 0 failed"


@asynccontextmanager
async def nfc_station(
    tmp_path: Path, plc: Plc, broker: EmbeddedBroker
) -> AsyncIterator[tuple[Station, NtagSimulator]]:
    """A station whose config names an nfc reader on the NTAG simulator's udp port."""
    with NtagSimulator() as sim:
        reader = f"{{type: nfc, device: '{sim.device}', targets: [106A], poll_interval: 0.02}}"
        async with running_station(tmp_path, plc.port, broker.port, reader=reader) as station:
            assert isinstance(station.agent.reader, NfcReader)
            yield station, sim


def ntag(station: Station, steps: list[Step], uid: bytes) -> NtagImage:
    tag = NtagImage.blank("NTAG215", uid)
    tag.put_ndef(station.tag(steps, uid=uid).message)
    return tag


async def test_tag_presented_again_is_recognised_and_not_run_twice(
    tmp_path: Path, reference_plc: Plc, broker: EmbeddedBroker
) -> None:
    uid = bytes.fromhex("04112233445577")
    async with nfc_station(tmp_path, reference_plc, broker) as (station, sim):
        tag = ntag(station, [Step("drill", DRILL, "st-20"), Step("press", PRESS, "st-30")], uid)
        sim.present(tag)
        first = await asyncio.wait_for(station.reports.get(), 10)
        sim.remove()
        sim.present(tag)  # the same part comes back to this station
        again = await asyncio.wait_for(station.reports.get(), 10)
    assert (first.status, first.tag_write, first.step and first.step["index"]) == ("ok", "ok", 0)
    assert (again.status, again.reason, again.machine_state) == (
        "rejected",
        "wrong_station",
        "untouched",
    )
    message = tag.ndef_message()
    assert message is not None
    assert decode_tag(message, uid, station.keyring).progress.done(0)


async def test_read_only_tag_cycle_reports_the_failed_write(
    tmp_path: Path, reference_plc: Plc, broker: EmbeddedBroker
) -> None:
    uid = bytes.fromhex("04112233445566")
    async with nfc_station(tmp_path, reference_plc, broker) as (station, sim):
        tag = ntag(station, [Step("drill", DRILL, "st-20")], uid)
        message = tag.ndef_message()
        tag.make_read_only()
        sim.present(tag)
        report = await asyncio.wait_for(station.reports.get(), 10)
    assert (
        report.status == "ok"
    )  # the machine did the step; the report says the tag was not updated
    assert report.tag_write.startswith("failed: tag 04112233445566 (NTAG215) is read-only")
    assert message is not None and tag.ndef_message() == message
    assert decode_tag(message, uid, station.keyring).progress.seq == 0
