"""Tear-safety through nfcpy: a progress write cut after every byte leaves the old or the new progress.

The NTAG simulator lets the tag leave the field after N more written bytes; the page being written
then keeps only its first bytes, as a real tag pulled away mid-WRITE may. Afterwards the tag is
presented again and read through nfcpy like any other.
"""

from __future__ import annotations

import pytest

from edge_agent.errors import TagIOError
from edge_agent.instructions.codec import decode_tag, update_progress
from edge_agent.instructions.model import StepRecord, StepStatus
from edge_agent.sim.ntag import NtagSimulator
from edge_agent.tag.nfc import NfcReader
from edge_agent.tag.reader import ScanKind
from tests.fixtures_nfc import KEYRING, UID, image, next_event, traveler


@pytest.mark.parametrize("done", [1, 2])  # 1: slot A is the target; 2: slot B
async def test_torn_progress_write_at_every_byte_decodes_to_old_or_new(
    ntag_sim: NtagSimulator, nfc_reader: NfcReader, done: int
) -> None:
    old = traveler(done=done)
    before = decode_tag(old, UID, KEYRING)
    new = update_progress(
        before,
        before.progress.with_record(done, StepRecord(StepStatus.OK, "st-x", 1795009999), 3),
    )
    after = decode_tag(new, UID, KEYRING)
    pages = sorted({(20 + i) // 4 for i in range(len(new)) if new[i] != old[i]})
    total = 4 * len(pages)
    outcomes = set()
    for cut in range(total + 1):
        tag = image(old)
        ntag_sim.pages_written.clear()
        ntag_sim.tear_after_bytes = cut
        ntag_sim.present(tag)
        await next_event(nfc_reader, ScanKind.ARRIVED)
        message = await nfc_reader.read_ndef(UID)
        if cut < total:
            with pytest.raises(TagIOError, match="04A1B2C3D4E5F6"):
                await nfc_reader.write_ndef(UID, new, previous=message)
        else:
            await nfc_reader.write_ndef(UID, new, previous=message)  # includes the read-back
            ntag_sim.remove()
        await next_event(nfc_reader, ScanKind.LEFT)

        ntag_sim.tear_after_bytes = None
        ntag_sim.present(tag)  # the same tag, presented again
        await next_event(nfc_reader, ScanKind.ARRIVED)
        contents = decode_tag(await nfc_reader.read_ndef(UID), UID, KEYRING)
        ntag_sim.remove()
        await next_event(nfc_reader, ScanKind.LEFT)

        assert contents.traveler == before.traveler, f"cut after {cut} bytes"
        assert contents.progress in (before.progress, after.progress), f"cut after {cut} bytes"
        outcomes.add(contents.progress.seq)
        if cut == total:
            assert contents.progress == after.progress
    assert outcomes == {before.progress.seq, after.progress.seq}
