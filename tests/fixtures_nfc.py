"""NFC fixtures: the NTAG simulator (its own process) on a loopback UDP port, our reader on it via nfcpy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.instructions.codec import TAG_CAPACITY, decode_tag, encode_tag, update_progress
from edge_agent.instructions.model import Step, StepRecord, StepStatus
from edge_agent.instructions.recipe import Recipe
from edge_agent.instructions.signing import KeyRing
from edge_agent.sim.ntag import NtagImage, NtagSimulator
from edge_agent.tag.nfc import NfcReader
from edge_agent.tag.reader import ScanEvent, ScanKind

__all__ = ["nfc_reader", "ntag_sim"]

UID = bytes.fromhex("04A1B2C3D4E5F6")
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KEYRING = KeyRing({"mes": KEY.public_key()})
STEPS = [
    Step("drill", {"spindle_speed": 1200, "feed_rate": 300.5, "depth": 12.5}, "st-10"),
    Step("mill", {"spindle_speed": 2400, "tool": 7}, "st-20"),
    Step("press", {"force": 25000}, "st-30"),
]


def traveler(uid: bytes = UID, kind: str = "NTAG215", done: int = 0) -> bytes:
    """A signed tag message for ``uid`` with its first ``done`` steps recorded as done."""
    recipe = Recipe.from_steps(
        part_id="P-1", product="bracket", variant="B-long", order="ORD-1", steps=STEPS
    )
    message = encode_tag(recipe, uid, KEY, "mes", TAG_CAPACITY[kind.lower()], issued_at=1795000000)
    contents = decode_tag(message, uid, KEYRING)
    for i in range(done):
        progress = contents.progress.with_record(
            i, StepRecord(StepStatus.OK, f"st-{i + 1}0", 1795000000 + i), len(STEPS)
        )
        message = update_progress(contents, progress)
        contents = decode_tag(message, uid, KEYRING)
    return message


def image(message: bytes | None = None, kind: str = "NTAG215", uid: bytes = UID) -> NtagImage:
    tag = NtagImage.blank(kind, uid)
    if message is not None:
        tag.put_ndef(message)
    return tag


@pytest.fixture
def ntag_sim() -> Iterator[NtagSimulator]:
    with NtagSimulator() as sim:
        yield sim


@pytest_asyncio.fixture
async def nfc_reader(ntag_sim: NtagSimulator) -> AsyncIterator[NfcReader]:
    reader = NfcReader("nfc-test", ntag_sim.device, targets=("106A",), poll_interval=0.02)
    await reader.start()
    try:
        yield reader
    finally:
        await reader.stop()


async def next_event(reader: NfcReader, kind: ScanKind, timeout: float = 3.0) -> ScanEvent:
    """The next event of ``kind`` (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        event = await asyncio.wait_for(reader._events.get(), deadline - time.monotonic())
        assert event is not None, "reader stopped"
        if event.kind is kind:
            return event
