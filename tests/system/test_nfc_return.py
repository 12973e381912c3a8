"""``reader.on_return``: what a station does with a tag taken away and presented again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from edge_agent.config import load_config
from edge_agent.errors import ConfigError
from edge_agent.instructions.model import Step
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.ntag import NtagImage, NtagSimulator
from edge_agent.sim.reference_plc import ReferencePlc as Plc
from edge_agent.tag.nfc import NfcReader
from edge_agent.tag.presence import ReturnFilter
from edge_agent.tag.reader import ScanEvent, ScanKind
from edge_agent.tag.registry import create_reader
from tests.fixtures_nfc import UID, image, traveler
from tests.station_harness import DRILL, PRESS, Station, running_station, write_config

OTHER = bytes.fromhex("04998877665544")


def _reader_config(tmp_path: Path, reader: str) -> Path:
    path = write_config(tmp_path, 5020, 1883)
    path.write_text(path.read_text().replace("reader: {type: simulated}", f"reader: {reader}"))
    return path


def test_on_return_ignore_wraps_the_configured_reader(tmp_path: Path) -> None:
    path = _reader_config(tmp_path, "{type: nfc, on_return: ignore, return_window: 30}")
    reader = create_reader(load_config(path).reader)
    assert isinstance(reader, ReturnFilter) and isinstance(reader.inner, NfcReader)
    assert (reader.name, reader.return_window) == ("nfc", 30)
    (tmp_path / "default").mkdir()
    default_path = _reader_config(tmp_path / "default", "{type: nfc}")
    default = create_reader(load_config(default_path).reader)
    assert isinstance(default, NfcReader)  # next_step: the cycle decides, nothing in between


def test_on_return_mistakes_name_file_line_and_key(tmp_path: Path) -> None:
    path = _reader_config(tmp_path, "{type: nfc, on_return: rerun, return_window: -1}")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = "\n".join(str(p) for p in err.value.problems)
    assert f"{path}:3: reader.on_return: Input should be 'next_step' or 'ignore'" in text
    assert f"{path}:3: reader.return_window: Input should be greater than or equal to 0" in text


async def _next(events: AsyncIterator[ScanEvent], timeout: float = 3.0) -> ScanEvent:
    return await asyncio.wait_for(anext(events), timeout)


async def test_ignore_within_window_then_pass_after_it(ntag_sim: NtagSimulator) -> None:
    reader = ReturnFilter(
        NfcReader("nfc-test", ntag_sim.device, targets=("106A",), poll_interval=0.02),
        return_window=0.3,
    )
    await reader.start()
    events = reader.events()
    try:
        tag = image(traveler())
        ntag_sim.present(tag)
        assert (await _next(events)).kind is ScanKind.ARRIVED
        ntag_sim.remove()
        left = await _next(events)
        assert left.kind is ScanKind.LEFT
        ntag_sim.present(tag)  # back at once: dropped, and so is its leaving
        while time.time() - left.time < 0.15:  # noqa: ASYNC110 (the window is wall time)
            await asyncio.sleep(0.02)
        ntag_sim.remove()
        other = image(traveler(OTHER), uid=OTHER)
        ntag_sim.present(other)  # another tag: it passes, and ends "until another tag" too
        arrived = await _next(events)
        assert (arrived.kind, arrived.uid) == (ScanKind.ARRIVED, OTHER)
        ntag_sim.remove()
        assert (await _next(events)).uid == OTHER
        ntag_sim.present(tag)  # the first tag after another one: passes
        back = await _next(events)
        assert (back.kind, back.uid) == (ScanKind.ARRIVED, UID)
        ntag_sim.remove()
        left = await _next(events)
        while time.time() - left.time < 0.35:  # noqa: ASYNC110 (past the window)
            await asyncio.sleep(0.02)
        ntag_sim.present(tag)  # the same tag again, after the window: passes
        again = await _next(events)
        assert (again.kind, again.uid) == (ScanKind.ARRIVED, UID)
    finally:
        await reader.stop()


@asynccontextmanager
async def station(
    tmp_path: Path, plc: Plc, broker: EmbeddedBroker, on_return: str
) -> AsyncIterator[tuple[Station, NtagSimulator]]:
    with NtagSimulator() as sim:
        reader = (
            f"{{type: nfc, device: '{sim.device}', targets: [106A], poll_interval: 0.02,"
            f" on_return: {on_return}}}"
        )
        async with running_station(tmp_path, plc.port, broker.port, reader=reader) as station:
            yield station, sim


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def _ntag(station: Station, uid: bytes) -> NtagImage:
    tag = NtagImage.blank("NTAG215", uid)
    tag.put_ndef(
        station.tag([Step("drill", DRILL, "st-20"), Step("press", PRESS, "st-30")], uid=uid).message
    )
    return tag


async def test_station_with_on_return_ignore_runs_no_cycle_for_a_returning_tag(
    tmp_path: Path, reference_plc: Plc, broker: EmbeddedBroker
) -> None:
    async with station(tmp_path, reference_plc, broker, "ignore") as (st, sim):
        first, other = _ntag(st, UID), _ntag(st, OTHER)
        sim.present(first)
        done = await asyncio.wait_for(st.reports.get(), 10)
        reader = st.agent.reader
        assert isinstance(reader, ReturnFilter)
        inner = reader.inner
        assert isinstance(inner, NfcReader)
        sim.remove()
        await until(lambda: inner._present is None)  # the reader saw it leave
        sim.present(first)  # lifted and put back: no cycle, no report
        await until(lambda: inner._present == UID)  # the reader has it in the field again
        sim.remove()
        sim.present(other)
        # Cycles run in arrival order: the next report is the other tag's, none came in between.
        next_report = await asyncio.wait_for(st.reports.get(), 10)
        sim.remove()
        sim.present(first)  # after another tag: handed to the cycle, which says why not
        returned = await asyncio.wait_for(st.reports.get(), 10)
    assert (done.tag_uid, done.status) == (UID.hex().upper(), "ok")
    assert (next_report.tag_uid, next_report.status) == (OTHER.hex().upper(), "ok")
    assert (returned.tag_uid, returned.reason, returned.machine_state) == (
        UID.hex().upper(),
        "wrong_station",
        "untouched",
    )
