"""The OPC UA AutoID reader backend against the simulated RFID reader (a real asyncua server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest_asyncio

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.instructions.codec import decode_tag
from edge_agent.instructions.model import Step
from edge_agent.instructions.signing import KeyRing, load_private_key
from edge_agent.sim.autoid_reader import AutoIdReaderSim, SimulatedRfidTag
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc
from edge_agent.station.report import CycleReport
from edge_agent.tag.autoid import AutoIdReader
from edge_agent.tag.reader import ScanKind
from tests.station_harness import DRILL, PRESS, Station, write_config

UID = bytes.fromhex("E004015012345678")  # an ISO 15693 (HF RFID) UID


@pytest_asyncio.fixture
async def autoid_sim() -> AsyncIterator[AutoIdReaderSim]:
    sim = AutoIdReaderSim()
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


def rfid_tag(message: bytes, uid: bytes = UID) -> SimulatedRfidTag:
    user = bytearray(1024)
    user[: 2 + len(message)] = len(message).to_bytes(2) + message
    return SimulatedRfidTag(uid, user)


async def _station(
    tmp_path: Path, sim: AutoIdReaderSim, plc: ReferencePlc, broker: EmbeddedBroker
) -> tuple[Station, asyncio.Event, asyncio.Task[None]]:
    path = write_config(tmp_path, plc.port, broker.port)
    reader = f"{{type: autoid, url: '{sim.url}', timeout: 2}}"
    path.write_text(path.read_text().replace("reader: {type: simulated}", f"reader: {reader}"))
    reports: asyncio.Queue[CycleReport] = asyncio.Queue()
    agent = Agent(load_config(path), on_report=reports.put_nowait)
    assert isinstance(agent.reader, AutoIdReader)
    key = load_private_key(tmp_path / "mes.key")
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await agent.uplink.wait_connected(5)
    await asyncio.wait_for(agent.reader.connected.wait(), 10)
    keyring = KeyRing({"mes": key.public_key()})
    return Station(agent, key, keyring, tmp_path, reports), stop, task


async def test_scan_event_runs_the_cycle_and_writes_progress_with_write_tag(
    tmp_path: Path, autoid_sim: AutoIdReaderSim, reference_plc: ReferencePlc, broker: EmbeddedBroker
) -> None:
    station, stop, task = await _station(tmp_path, autoid_sim, reference_plc, broker)
    try:
        message = station.tag([Step("drill", DRILL, "st-20"), Step("press", PRESS, "st-30")], UID)
        tag = rfid_tag(message.message)
        await autoid_sim.present(tag)
        report = await asyncio.wait_for(station.reports.get(), 10)
        await autoid_sim.remove()
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    assert (report.status, report.tag_write, report.tag_uid) == ("ok", "ok", UID.hex().upper())
    length = int.from_bytes(tag.user[:2])
    after = decode_tag(bytes(tag.user[2 : 2 + length]), UID, station.keyring)
    assert after.progress.done(0) and after.progress.seq == 1
    # One WriteTag, inside the progress slot that was rewritten: the signed traveler is untouched.
    assert len(autoid_sim.writes) == 1
    offset, size = autoid_sim.writes[0]
    assert offset >= 2 + len(message.message) - 2 * (after.slot_size + 9)
    assert size <= after.slot_size


async def test_read_tag_failure_status_is_a_failed_cycle_naming_it(
    tmp_path: Path, autoid_sim: AutoIdReaderSim, reference_plc: ReferencePlc, broker: EmbeddedBroker
) -> None:
    station, stop, task = await _station(tmp_path, autoid_sim, reference_plc, broker)
    try:
        message = station.tag([Step("drill", DRILL, "st-20")], UID)
        autoid_sim.fail_next_read = 10  # READ_ERROR
        await autoid_sim.present(rfid_tag(message.message))
        report = await asyncio.wait_for(station.reports.get(), 10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    assert (report.status, report.reason, report.machine_state) == (
        "failed",
        "tag_read_failed",
        "untouched",
    )
    assert report.error is not None and "ReadTag failed with READ_ERROR (10)" in report.error
    assert UID.hex().upper() in report.error
    assert autoid_sim.writes == []


async def test_simulator_restarted_scans_resume() -> None:
    """The reader's server goes away and comes back on the same URL: scans resume, no restart."""
    sim = AutoIdReaderSim()
    await sim.start()
    port = int(sim.url.rsplit(":", 1)[1].split("/")[0])
    reader = AutoIdReader("rfid", sim.url, timeout=1, backoff_min=0.05, backoff_max=0.2)
    reader.watch_interval = 0.05
    await reader.start()
    events = reader.events()
    try:
        await asyncio.wait_for(reader.connected.wait(), 10)
        await sim.present(rfid_tag(b"\xd0\x00\x00"))
        assert (await asyncio.wait_for(anext(events), 5)).kind is ScanKind.ARRIVED
        await sim.stop()  # the reader's server is gone: its presence ends
        left = await asyncio.wait_for(anext(events), 5)
        assert (left.kind, left.uid) == (ScanKind.LEFT, UID)
        assert not reader.connected.is_set()

        sim = AutoIdReaderSim()
        await sim.start(port=port)  # back on the same endpoint
        await asyncio.wait_for(reader.connected.wait(), 10)
        await sim.present(rfid_tag(b"\xd0\x00\x00"))
        again = await asyncio.wait_for(anext(events), 5)
        assert (again.kind, again.uid) == (ScanKind.ARRIVED, UID)
        assert await reader.read_ndef(UID) == b"\xd0\x00\x00"
    finally:
        await reader.stop()
        await sim.stop()


async def test_autoid_scan_event_alone_is_an_arrival(autoid_sim: AutoIdReaderSim) -> None:
    """A reader that only fires AutoIdScanEvents (LastScanData untouched): the event's
    RfidScanResult.ScanData is the identifier, decoded from the server's type dictionary."""
    reader = AutoIdReader("rfid", autoid_sim.url, timeout=2)
    await reader.start()
    events = reader.events()
    try:
        await asyncio.wait_for(reader.connected.wait(), 10)
        await autoid_sim.present(rfid_tag(b"\xd0\x00\x00"), last_scan_data=False)
        arrived = await asyncio.wait_for(anext(events), 5)
        assert (arrived.kind, arrived.uid) == (ScanKind.ARRIVED, UID)
        assert await reader.read_ndef(UID) == b"\xd0\x00\x00"  # ReadTag on that identifier
        # A scan event raised before the field was last seen empty is stale: no arrival.
        await autoid_sim.present(rfid_tag(b"\xd0\x00\x00"))  # now LastScanData has it: no event
        await autoid_sim.remove()
        assert (await asyncio.wait_for(anext(events), 5)).kind is ScanKind.LEFT
        cleared = reader._cleared_at
        assert cleared is not None
        stale = type("ScanResult", (), {"ScanData": UID})()
        reader._scan_event(stale, cleared - timedelta(milliseconds=1))
        assert reader._present is None and reader._events.empty()
    finally:
        await reader.stop()
