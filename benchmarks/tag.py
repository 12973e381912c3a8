"""Tag read + verify + write-back per tag type, through nfcpy's udp driver (NTAG simulator, Type 3 emulation).

    python benchmarks/tag.py [--parts 200]

For each NTAG type, N presentations of a signed traveler (3 steps, one done) to the nfc reader:
  * arrival: tag placed -> ARRIVED event (nfcpy sense + activation + GET_VERSION + NDEF read),
  * read: a ReadTag that goes to the tag again (READ commands for the whole NDEF message),
  * verify: decode + Ed25519 verification of the message,
  * write-back: one progress slot written (changed pages only) and those pages read back,
  * cycle: the agent's tag work per part = ReadTag (served from the arrival read) + verify +
    write-back,
and how many pages the write-back touches against nfcpy's own NDEF write of the same message.
Then the same for a Type 3 (FeliCa) tag emulated by nfcpy itself (blocks of 16 bytes written) and
for a Type 4 tag (sim/type4.py; NDEF file bytes written by UPDATE BINARY).
Medians and p99 in milliseconds. The radio is simulated (loopback UDP, no 106 kbit/s air time), so
these are the software floor: a real reader adds roughly 1-3 ms per READ/WRITE frame.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from edge_agent.instructions.codec import (  # noqa: E402
    TAG_CAPACITY,
    decode_tag,
    encode_tag,
    update_progress,
)
from edge_agent.instructions.model import Step, StepRecord, StepStatus  # noqa: E402
from edge_agent.instructions.recipe import Recipe  # noqa: E402
from edge_agent.instructions.signing import KeyRing  # noqa: E402
from edge_agent.sim.felica import FelicaImage, FelicaSimulator  # noqa: E402
from edge_agent.sim.ntag import NtagImage, NtagSimulator  # noqa: E402
from edge_agent.sim.type4 import Type4Image, Type4Simulator  # noqa: E402
from edge_agent.tag.nfc import NfcReader, TagSession  # noqa: E402
from edge_agent.tag.reader import ScanEvent, ScanKind  # noqa: E402

KEY = Ed25519PrivateKey.generate()
KEYRING = KeyRing({"mes": KEY.public_key()})
STEPS = [
    Step("drill", {"spindle_speed": 1200, "feed_rate": 300.5, "depth": 12.5, "tool": 3}, "st-10"),
    Step("mill", {"spindle_speed": 2400, "feed_rate": 410.0, "tool": 7}, "st-20"),
    Step("press", {"force": 25000, "dwell": 500}, "st-30"),
]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} {pct(values, 0.99):7.2f}"


def message_for(uid: bytes, kind: str) -> bytes:
    recipe = Recipe.from_steps(
        part_id="P-1", product="bracket", variant="B", order="ORD-1", steps=STEPS
    )
    message = encode_tag(recipe, uid, KEY, "mes", TAG_CAPACITY[kind.lower()])
    contents = decode_tag(message, uid, KEYRING)
    done = contents.progress.with_record(0, StepRecord(StepStatus.OK, "st-10", 1), len(STEPS))
    return update_progress(contents, done)


async def next_event(reader: NfcReader, kind: ScanKind) -> ScanEvent:
    async for event in _events(reader):
        if event.kind is kind:
            return event
    raise RuntimeError("reader stopped")


async def _events(reader: NfcReader) -> AsyncIterator[ScanEvent]:
    while (event := await reader._events.get()) is not None:
        yield event


async def bench_kind(sim: NtagSimulator, reader: NfcReader, kind: str, parts: int) -> None:
    uid = bytes.fromhex("04A1B2C3D4E5F6")
    try:
        message = message_for(uid, kind)
    except ValueError as err:
        print(f"{kind:<8} n/a: {err}")
        return
    arrival, read, verify, write, cycle, pages = [], [], [], [], [], []
    for _ in range(parts):
        tag = NtagImage.blank(kind, uid)
        tag.put_ndef(message)
        t0 = time.perf_counter()
        sim.present(tag)
        await next_event(reader, ScanKind.ARRIVED)
        t1 = time.perf_counter()
        first = await reader.read_ndef(uid)  # the arrival read
        t2 = time.perf_counter()
        contents = decode_tag(first, uid, KEYRING)
        new = update_progress(
            contents,
            contents.progress.with_record(1, StepRecord(StepStatus.OK, "st-20", 2), len(STEPS)),
        )
        t3 = time.perf_counter()
        await reader.write_ndef(uid, new, previous=first)
        t4 = time.perf_counter()
        again = await reader.read_ndef(uid)  # to the tag again
        t5 = time.perf_counter()
        assert again == new
        arrival.append((t1 - t0) * 1e3)
        verify.append((t3 - t2) * 1e3)
        write.append((t4 - t3) * 1e3)
        read.append((t5 - t4) * 1e3)
        cycle.append((t4 - t1) * 1e3)
        pages.append(len(reader.last_write_pages))
        sim.remove()
        await next_event(reader, ScanKind.LEFT)

    # nfcpy's own NDEF write of the same new message on a fresh tag, for the page count.
    tag = NtagImage.blank(kind, uid)
    tag.put_ndef(message)
    sim.present(tag)
    await next_event(reader, ScanKind.ARRIVED)
    await reader.stop()
    sim.pages_written.clear()
    with TagSession(sim.device, targets=("106A",)) as session:
        session.tag.ndef.octets = new
    nfcpy_pages = len(sim.pages_written)
    print(
        f"{kind:<8} {len(message):>4} B  arrival {fmt(arrival)}  read {fmt(read)}  verify {fmt(verify)}"
        f"  write-back {fmt(write)}  cycle {fmt(cycle)}  pages {statistics.median(pages):.0f}"
        f" (nfcpy NDEF write: {nfcpy_pages}, TLV length zeroed first)"
    )


async def bench_type3(parts: int) -> None:
    """The same on a Type 3 tag emulated by nfcpy itself (sim/felica.py), NTAG215's traveler."""
    idm = bytes.fromhex("02FE0A1B2C3D4E5F")
    recipe = Recipe.from_steps(
        part_id="P-1", product="bracket", variant="B", order="ORD-1", steps=STEPS
    )
    contents = decode_tag(
        encode_tag(recipe, idm, KEY, "mes", TAG_CAPACITY["ntag215"]), idm, KEYRING
    )
    message = update_progress(
        contents, contents.progress.with_record(0, StepRecord(StepStatus.OK, "st-10", 1), 3)
    )
    arrival, read, verify, write, cycle, blocks = [], [], [], [], [], []
    with FelicaSimulator() as sim:
        reader = NfcReader("bench", sim.device, targets=("212F",), poll_interval=0.005)
        await reader.start()
        try:
            for _ in range(parts):
                tag = FelicaImage.blank(idm)
                tag.put_ndef(message)
                t0 = time.perf_counter()
                sim.present(tag)
                await next_event(reader, ScanKind.ARRIVED)
                t1 = time.perf_counter()
                first = await reader.read_ndef(idm)
                t2 = time.perf_counter()
                contents = decode_tag(first, idm, KEYRING)
                new = update_progress(
                    contents,
                    contents.progress.with_record(1, StepRecord(StepStatus.OK, "st-20", 2), 3),
                )
                t3 = time.perf_counter()
                await reader.write_ndef(idm, new, previous=first)
                t4 = time.perf_counter()
                again = await reader.read_ndef(idm)
                t5 = time.perf_counter()
                sim.sync()  # ``tag`` gets the simulator's copy (it runs in its own process)
                assert again == new and tag.ndef_message() == new
                arrival.append((t1 - t0) * 1e3)
                verify.append((t3 - t2) * 1e3)
                write.append((t4 - t3) * 1e3)
                read.append((t5 - t4) * 1e3)
                cycle.append((t4 - t1) * 1e3)
                blocks.append(len(reader.last_write_pages))
                sim.remove()
                await next_event(reader, ScanKind.LEFT)
        finally:
            await reader.stop()
        tag = FelicaImage.blank(idm)  # nfcpy's own NDEF write of the same message, for the count
        tag.put_ndef(message)
        sim.present(tag)
        sim.blocks_written.clear()
        with TagSession(sim.device, targets=("212F",)) as session:
            session.tag.ndef.octets = new
        nfcpy_blocks = len(sim.blocks_written)
    print(
        f"{'Type3':<8} {len(message):>4} B  arrival {fmt(arrival)}  read {fmt(read)}  verify {fmt(verify)}"
        f"  write-back {fmt(write)}  cycle {fmt(cycle)}  blocks {statistics.median(blocks):.0f}"
        f" (of 16 bytes; nfcpy NDEF write: {nfcpy_blocks}, WriteFlag raised first)"
    )


async def bench_type4(parts: int) -> None:
    """The same on a Type 4 tag (sim/type4.py: ISO-DEP + NDEF Tag Application), NTAG215's traveler."""
    uid = bytes.fromhex("04C1D2E3F40516")
    message = message_for(uid, "NTAG215")
    arrival, read, write, cycle, written, apdus = [], [], [], [], [], []
    with Type4Simulator() as sim:
        reader = NfcReader("bench", sim.device, targets=("106A",), poll_interval=0.005)
        await reader.start()
        try:
            for _ in range(parts):
                tag = Type4Image.blank(uid)
                tag.put_ndef(message)
                t0 = time.perf_counter()
                sim.present(tag)
                await next_event(reader, ScanKind.ARRIVED)
                t1 = time.perf_counter()
                first = await reader.read_ndef(uid)
                contents = decode_tag(first, uid, KEYRING)
                new = update_progress(
                    contents,
                    contents.progress.with_record(1, StepRecord(StepStatus.OK, "st-20", 2), 3),
                )
                t2 = time.perf_counter()
                await reader.write_ndef(uid, new, previous=first)
                t3 = time.perf_counter()
                again = await reader.read_ndef(uid)
                t4 = time.perf_counter()
                sim.sync()  # ``tag`` gets the simulator's copy (it runs in its own process)
                assert again == new and tag.ndef_message() == new
                arrival.append((t1 - t0) * 1e3)
                write.append((t3 - t2) * 1e3)
                read.append((t4 - t3) * 1e3)
                cycle.append((t3 - t1) * 1e3)
                written.append(len(reader.last_write_pages))
                apdus.append(len(sim.updates))
                sim.updates.clear()
                sim.remove()
                await next_event(reader, ScanKind.LEFT)
        finally:
            await reader.stop()
        tag = Type4Image.blank(uid)  # nfcpy's own NDEF write of the same message, for the count
        tag.put_ndef(message)
        sim.present(tag)
        sim.updates.clear()
        with TagSession(sim.device, targets=("106A",)) as session:
            session.tag.ndef.octets = new
        nfcpy_updates = sim.updates
        nfcpy_bytes = sum(length for _, length in nfcpy_updates)
    print(
        f"{'Type4':<8} {len(message):>4} B  arrival {fmt(arrival)}  read {fmt(read)}"
        f"  write-back {fmt(write)}  cycle {fmt(cycle)}  bytes {statistics.median(written):.0f}"
        f" in {statistics.median(apdus):.0f} UPDATE BINARY"
        f" (nfcpy NDEF write: {nfcpy_bytes} in {len(nfcpy_updates)} UPDATE BINARY, NLEN zeroed first)"
    )


async def main(parts: int) -> None:
    print(f"tag read + verify + write-back through nfcpy's udp driver, {parts} parts per type")
    print("                  (ms: median    p99)")
    for kind in ("NTAG213", "NTAG215", "NTAG216"):
        with NtagSimulator() as sim:
            reader = NfcReader("bench", sim.device, targets=("106A",), poll_interval=0.005)
            await reader.start()
            try:
                await bench_kind(sim, reader, kind, parts)
            finally:
                await reader.stop()
    await bench_type3(parts)
    await bench_type4(parts)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=200)
    asyncio.run(main(parser.parse_args().parts))
