"""Type 3 (FeliCa) tags: nfcpy's reader against nfcpy's own Type 3 emulation over its udp driver."""

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
from edge_agent.sim.felica import FelicaImage, FelicaSimulator
from edge_agent.sim.reference_plc import ReferencePlc as Plc
from edge_agent.tag.nfc import NfcReader
from edge_agent.tag.reader import ScanKind
from tests.fixtures_nfc import KEYRING, next_event, traveler
from tests.station_harness import DRILL, PRESS, running_station

IDM = bytes.fromhex("02FE0A1B2C3D4E5F")


@pytest.fixture
def felica_sim() -> Iterator[FelicaSimulator]:
    with FelicaSimulator() as sim:
        yield sim


@pytest_asyncio.fixture
async def t3_reader(felica_sim: FelicaSimulator) -> AsyncIterator[NfcReader]:
    reader = NfcReader("t3", felica_sim.device, targets=("212F",), poll_interval=0.02)
    await reader.start()
    try:
        yield reader
    finally:
        await reader.stop()


def felica(message: bytes) -> FelicaImage:
    tag = FelicaImage.blank(IDM)
    tag.put_ndef(message)
    return tag


def test_an_idm_starting_01fe_is_refused() -> None:
    with pytest.raises(ValueError, match="peer-to-peer"):
        FelicaImage.blank(bytes.fromhex("01FE000000000000"))


async def test_type3_arrival_read_and_leave(
    felica_sim: FelicaSimulator, t3_reader: NfcReader
) -> None:
    message = traveler(IDM)
    felica_sim.present(felica(message))
    arrived = await next_event(t3_reader, ScanKind.ARRIVED)
    assert (arrived.uid, arrived.tag_type, arrived.capacity) == (IDM, "Type3Tag", 1024)
    assert await t3_reader.read_ndef(IDM) == message  # the arrival copy
    assert await t3_reader.read_ndef(IDM) == message  # from the tag again
    felica_sim.remove()
    left = await next_event(t3_reader, ScanKind.LEFT)
    assert left.uid == IDM


async def test_type3_progress_write_touches_only_changed_blocks(
    felica_sim: FelicaSimulator, t3_reader: NfcReader
) -> None:
    old = traveler(IDM)
    before = decode_tag(old, IDM, KEYRING)
    new = update_progress(
        before, before.progress.with_record(0, StepRecord(StepStatus.OK, "st-10", 1795009999), 3)
    )
    tag = felica(old)
    felica_sim.present(tag)
    await next_event(t3_reader, ScanKind.ARRIVED)
    await t3_reader.write_ndef(IDM, new, previous=await t3_reader.read_ndef(IDM))
    changed = {1 + i // 16 for i in range(len(new)) if new[i] != old[i]}
    felica_sim.sync()  # ``tag`` gets the simulator's copy, as the reader left it
    assert (
        set(felica_sim.blocks_written) == changed and 0 not in changed
    )  # attribute block untouched
    assert tag.ndef_message() == new


async def test_type3_read_only_tag_write_fails(
    felica_sim: FelicaSimulator, t3_reader: NfcReader
) -> None:
    tag = felica(traveler(IDM))
    tag.make_read_only()
    felica_sim.present(tag)
    await next_event(t3_reader, ScanKind.ARRIVED)
    message = await t3_reader.read_ndef(IDM)
    with pytest.raises(TagIOError, match=r"02FE0A1B2C3D4E5F .*read-only"):
        await t3_reader.write_ndef(IDM, traveler(IDM, done=1), previous=message)
    assert felica_sim.blocks_written == []


@pytest.mark.parametrize("done", [1, 2])  # 1: slot A is the target; 2: slot B
async def test_type3_torn_progress_write_at_every_block_decodes_to_old_or_new(
    felica_sim: FelicaSimulator, t3_reader: NfcReader, done: int
) -> None:
    old = traveler(IDM, done=done)
    before = decode_tag(old, IDM, KEYRING)
    new = update_progress(
        before,
        before.progress.with_record(done, StepRecord(StepStatus.OK, "st-x", 1795009999), 3),
    )
    after = decode_tag(new, IDM, KEYRING)
    total = len({i // 16 for i in range(len(new)) if new[i] != old[i]})
    assert total >= 2  # a slot spans blocks: the cuts between them are the interesting ones
    outcomes = set()
    for cut in range(total + 1):
        tag = felica(old)
        felica_sim.tear_after_blocks = cut if cut < total else None
        felica_sim.present(tag)
        await next_event(t3_reader, ScanKind.ARRIVED)
        message = await t3_reader.read_ndef(IDM)
        if cut < total:
            with pytest.raises(TagIOError, match="02FE0A1B2C3D4E5F"):
                await t3_reader.write_ndef(IDM, new, previous=message)
        else:
            await t3_reader.write_ndef(IDM, new, previous=message)
            felica_sim.remove()
        await next_event(t3_reader, ScanKind.LEFT)

        felica_sim.present(tag)
        await next_event(t3_reader, ScanKind.ARRIVED)
        contents = decode_tag(await t3_reader.read_ndef(IDM), IDM, KEYRING)
        felica_sim.remove()
        await next_event(t3_reader, ScanKind.LEFT)

        assert contents.traveler == before.traveler, f"cut after {cut} blocks"
        assert contents.progress in (before.progress, after.progress), f"cut after {cut} blocks"
        outcomes.add(contents.progress.seq)
    assert outcomes == {before.progress.seq, after.progress.seq}


async def test_station_runs_a_cycle_on_a_type3_tag_and_writes_progress_back(
    tmp_path: Path, reference_plc: Plc, broker: EmbeddedBroker
) -> None:
    with FelicaSimulator() as sim:
        reader = f"{{type: nfc, device: '{sim.device}', targets: [212F], poll_interval: 0.02}}"
        async with running_station(
            tmp_path, reference_plc.port, broker.port, reader=reader
        ) as station:
            steps = [Step("drill", DRILL, "st-20"), Step("press", PRESS, "st-30")]
            tag = felica(station.tag(steps, uid=IDM).message)
            sim.present(tag)
            report = await asyncio.wait_for(station.reports.get(), 10)
            keyring = station.keyring
    assert (report.status, report.tag_write, report.step and report.step["index"]) == (
        "ok",
        "ok",
        0,
    )
    assert report.tag_uid == IDM.hex().upper()
    message = tag.ndef_message()
    assert message is not None
    progress = decode_tag(message, IDM, keyring).progress
    assert progress.done(0) and not progress.done(1)
