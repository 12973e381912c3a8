"""Type 4 tags (ISO-DEP, NDEF Tag Application): nfcpy's reader against our Type 4 simulator over udp."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from edge_agent.errors import TagIOError
from edge_agent.instructions.codec import decode_tag, update_progress
from edge_agent.instructions.model import Step, StepRecord, StepStatus
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc as Plc
from edge_agent.sim.type4 import Type4Image, Type4Simulator
from edge_agent.tag.nfc import NfcReader
from edge_agent.tag.reader import ScanKind
from tests.fixtures_nfc import KEYRING, next_event, traveler
from tests.station_harness import DRILL, PRESS, running_station

UID = bytes.fromhex("04C1D2E3F40516")


@pytest.fixture
def t4_sim() -> Iterator[Type4Simulator]:
    with Type4Simulator() as sim:
        yield sim


@pytest_asyncio.fixture
async def t4_reader(t4_sim: Type4Simulator) -> AsyncIterator[NfcReader]:
    reader = NfcReader("t4", t4_sim.device, targets=("106A",), poll_interval=0.02)
    await reader.start()
    try:
        yield reader
    finally:
        await reader.stop()


def type4(message: bytes) -> Type4Image:
    tag = Type4Image.blank(UID)
    tag.put_ndef(message)
    return tag


def progressed(old: bytes, done: int) -> bytes:
    before = decode_tag(old, UID, KEYRING)
    record = StepRecord(StepStatus.OK, "st-x", 1795009999)
    return update_progress(before, before.progress.with_record(done, record, 3))


async def test_type4_arrival_read_and_leave(t4_sim: Type4Simulator, t4_reader: NfcReader) -> None:
    message = traveler(UID)
    t4_sim.present(type4(message))
    arrived = await next_event(t4_reader, ScanKind.ARRIVED)
    assert (arrived.uid, arrived.tag_type, arrived.capacity) == (UID, "Type4Tag", 1022)
    assert await t4_reader.read_ndef(UID) == message  # the arrival copy
    assert await t4_reader.read_ndef(UID) == message  # from the tag again
    t4_sim.remove()
    assert (await next_event(t4_reader, ScanKind.LEFT)).uid == UID


async def test_type4_progress_write_updates_only_changed_bytes(
    t4_sim: Type4Simulator, t4_reader: NfcReader
) -> None:
    old = traveler(UID)
    new = progressed(old, 0)
    tag = type4(old)
    t4_sim.present(tag)
    await next_event(t4_reader, ScanKind.ARRIVED)
    await t4_reader.write_ndef(UID, new, previous=await t4_reader.read_ndef(UID))
    changed = [2 + i for i in range(len(new)) if new[i] != old[i]]
    t4_sim.sync()  # ``tag`` gets the simulator's copy, as the reader left it
    written = [offset + i for offset, length in t4_sim.updates for i in range(length)]
    assert written == changed == t4_reader.last_write_pages
    assert all(offset >= 2 for offset, _ in t4_sim.updates)  # NLEN untouched
    assert tag.ndef_message() == new


async def test_type4_message_of_another_length_goes_through_nfcpy(
    t4_sim: Type4Simulator, t4_reader: NfcReader
) -> None:
    tag = type4(traveler(UID))
    t4_sim.present(tag)
    await next_event(t4_reader, ScanKind.ARRIVED)
    shorter = b"\xd1\x01\x04T\x02enok"
    await t4_reader.write_ndef(UID, shorter)
    t4_sim.sync()
    assert tag.ndef_message() == shorter and t4_reader.last_write_pages == []
    assert await t4_reader.read_ndef(UID) == shorter


async def test_type4_read_only_tag_write_fails(
    t4_sim: Type4Simulator, t4_reader: NfcReader
) -> None:
    tag = type4(traveler(UID))
    tag.make_read_only()
    t4_sim.present(tag)
    await next_event(t4_reader, ScanKind.ARRIVED)
    message = await t4_reader.read_ndef(UID)
    with pytest.raises(TagIOError, match=r"04C1D2E3F40516 .*read-only"):
        await t4_reader.write_ndef(UID, progressed(message, 0), previous=message)
    t4_sim.sync()
    assert t4_sim.updates == [] and tag.ndef_message() == message


async def test_type4_tag_leaving_mid_write_is_an_error_naming_the_tag(
    t4_sim: Type4Simulator, t4_reader: NfcReader
) -> None:
    old = traveler(UID)
    t4_sim.present(type4(old))
    await next_event(t4_reader, ScanKind.ARRIVED)
    message = await t4_reader.read_ndef(UID)
    t4_sim.leave_after_commands = 1  # the SELECT of the NDEF file, then gone
    with pytest.raises(TagIOError, match="04C1D2E3F40516"):
        await t4_reader.write_ndef(UID, progressed(old, 0), previous=message)
    assert (await next_event(t4_reader, ScanKind.LEFT)).uid == UID


@pytest.mark.parametrize("done", [1, 2])  # 1: slot A is the target; 2: slot B
async def test_type4_torn_progress_write_at_every_byte_decodes_to_old_or_new(
    t4_sim: Type4Simulator, t4_reader: NfcReader, done: int
) -> None:
    old = traveler(UID, done=done)
    new = progressed(old, done)
    before, after = decode_tag(old, UID, KEYRING), decode_tag(new, UID, KEYRING)
    total = sum(a != b for a, b in zip(old, new, strict=True))
    outcomes = set()
    for cut in range(total + 1):
        tag = type4(old)
        t4_sim.tear_after_bytes = cut if cut < total else None
        t4_sim.present(tag)
        await next_event(t4_reader, ScanKind.ARRIVED)
        message = await t4_reader.read_ndef(UID)
        if cut < total:
            with pytest.raises(TagIOError, match="04C1D2E3F40516"):
                await t4_reader.write_ndef(UID, new, previous=message)
        else:
            await t4_reader.write_ndef(UID, new, previous=message)  # includes the read-back
            t4_sim.remove()
        await next_event(t4_reader, ScanKind.LEFT)

        t4_sim.present(tag)  # the same tag, presented again
        await next_event(t4_reader, ScanKind.ARRIVED)
        contents = decode_tag(await t4_reader.read_ndef(UID), UID, KEYRING)
        t4_sim.remove()
        await next_event(t4_reader, ScanKind.LEFT)

        assert contents.traveler == before.traveler, f"cut after {cut} bytes"
        assert contents.progress in (before.progress, after.progress), f"cut after {cut} bytes"
        outcomes.add(contents.progress.seq)
    assert outcomes == {before.progress.seq, after.progress.seq}


async def test_station_runs_a_cycle_on_a_type4_tag_and_writes_progress_back(
    tmp_path: Path, reference_plc: Plc, broker: EmbeddedBroker
) -> None:
    with Type4Simulator() as sim:
        reader = f"{{type: nfc, device: '{sim.device}', targets: [106A], poll_interval: 0.02}}"
        async with running_station(
            tmp_path, reference_plc.port, broker.port, reader=reader
        ) as station:
            steps = [Step("drill", DRILL, "st-20"), Step("press", PRESS, "st-30")]
            tag = type4(station.tag(steps, uid=UID).message)
            sim.present(tag)
            report = await asyncio.wait_for(station.reports.get(), 10)
            keyring = station.keyring
        updates = sim.updates
    assert (report.status, report.tag_write, report.step and report.step["index"]) == (
        "ok",
        "ok",
        0,
    )
    assert report.tag_uid == UID.hex().upper()
    assert updates and all(offset >= 2 for offset, _ in updates)  # tear-safe path
    progress = decode_tag(tag.ndef_message(), UID, keyring).progress
    assert progress.done(0) and not progress.done(1)


@pytest.mark.parametrize("lost", [1, 3])
async def test_type4_lost_answers_are_recovered_by_iso_dep_and_the_write_is_applied_once(
    t4_sim: Type4Simulator, t4_reader: NfcReader, lost: int
) -> None:
    old = traveler(UID)
    new = progressed(old, 0)
    tag = type4(old)
    t4_sim.present(tag)
    await next_event(t4_reader, ScanKind.ARRIVED)
    previous = await t4_reader.read_ndef(UID)
    t4_sim.lose_answers = lost  # the SELECT and the first UPDATE BINARY answers
    await t4_reader.write_ndef(UID, new, previous=previous)
    t4_sim.sync()
    assert t4_sim.lose_answers == 0 and tag.ndef_message() == new
    changed = [2 + i for i in range(len(new)) if new[i] != old[i]]
    assert [offset + i for offset, length in t4_sim.updates for i in range(length)] == changed
    t4_sim.lose_answers = 1
    assert await t4_reader.read_ndef(UID) == new
