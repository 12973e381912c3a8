"""The simulated reader in directory mode: a file appearing is a tag arriving."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from edge_agent.tag.reader import ScanEvent, ScanKind
from edge_agent.tag.simulated import SimulatedReader


async def next_event(events: asyncio.Queue[ScanEvent]) -> ScanEvent:
    return await asyncio.wait_for(events.get(), 10)


async def polls(reader: SimulatedReader, count: int) -> None:
    await asyncio.sleep(reader.poll_interval * count)


async def test_directory_files_are_tags_and_a_bad_name_is_warned_about_once(
    tmp_path: Path,
) -> None:
    reader = SimulatedReader("bench", tmp_path, poll_interval=0.01)
    events: asyncio.Queue[ScanEvent] = asyncio.Queue()

    async def pump() -> None:
        async for event in reader.events():
            events.put_nowait(event)

    with structlog.testing.capture_logs() as logs:
        await reader.start()
        pumping = asyncio.create_task(pump())
        try:
            (tmp_path / "not-a-uid.ndef").write_bytes(b"x")
            (tmp_path / "ABC.ndef").write_bytes(b"x")  # an odd number of hex digits
            (tmp_path / "04A1B2C3D4E5F6.txt").write_bytes(b"x")  # not .ndef: not looked at
            (tmp_path / "04a1b2c3d4e5f6.ndef").write_bytes(b"message")  # lower case is fine
            arrived = await next_event(events)
            assert (arrived.uid, arrived.kind) == (
                bytes.fromhex("04A1B2C3D4E5F6"),
                ScanKind.ARRIVED,
            )
            assert await reader.read_ndef(arrived.uid) == b"message"
            await reader.write_ndef(arrived.uid, b"progress")  # write-back goes into the file
            assert (tmp_path / "04a1b2c3d4e5f6.ndef").read_bytes() == b"progress"
            assert not (tmp_path / "04A1B2C3D4E5F6.ndef").exists()
            await polls(reader, 20)  # fewer under load: the count holds either way
            warned = [e["file"] for e in logs if e["event"].startswith("ignoring file")]
            assert sorted(warned) == [str(tmp_path / "ABC.ndef"), str(tmp_path / "not-a-uid.ndef")]

            # Taken away and put back: a new mistake, warned about again. The tag file leaving and
            # coming back shows that a poll saw the directory without, then with, the bad file.
            (tmp_path / "not-a-uid.ndef").unlink()
            (tmp_path / "04a1b2c3d4e5f6.ndef").unlink()
            left = await next_event(events)
            assert (left.uid, left.kind) == (arrived.uid, ScanKind.LEFT)
            (tmp_path / "not-a-uid.ndef").write_bytes(b"x")
            (tmp_path / "04A1B2C3D4E5F6.ndef").write_bytes(b"message")
            assert (await next_event(events)).kind is ScanKind.ARRIVED
            await polls(reader, 5)
            warned = [e["file"] for e in logs if e["event"].startswith("ignoring file")]
            assert warned.count(str(tmp_path / "not-a-uid.ndef")) == 2
            assert warned.count(str(tmp_path / "ABC.ndef")) == 1
        finally:
            await reader.stop()
            await pumping
