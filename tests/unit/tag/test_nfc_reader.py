"""The nfcpy reader backend against the NTAG simulator: every tag frame goes through nfcpy's udp driver."""

from __future__ import annotations

import asyncio

import ndef
import pytest

from edge_agent.errors import PartRejected, TagIOError
from edge_agent.instructions.codec import decode_tag, update_progress
from edge_agent.instructions.model import StepRecord, StepStatus
from edge_agent.sim.ntag import NtagImage, NtagSimulator
from edge_agent.tag.nfc import NfcReader
from edge_agent.tag.nfc.reader import UDP_REPLY_WAIT
from edge_agent.tag.reader import ScanKind
from tests.fixtures_nfc import KEYRING, STEPS, UID, image, next_event, traveler


async def test_tag_arrival_is_one_event_with_type_and_capacity(
    ntag_sim: NtagSimulator, nfc_reader: NfcReader
) -> None:
    message = traveler(done=1)
    ntag_sim.present(image(message))
    event = await next_event(nfc_reader, ScanKind.ARRIVED)
    assert (event.uid, event.tag_type, event.capacity) == (UID, "NTAG215", 492)
    contents = decode_tag(await nfc_reader.read_ndef(UID), UID, KEYRING)
    assert contents.progress.done(0) and not contents.progress.done(1)
    # A second read goes to the tag again (not the arrival copy) and gives the same bytes.
    assert await nfc_reader.read_ndef(UID) == message


@pytest.mark.parametrize(("kind", "capacity"), [("NTAG213", 142), ("NTAG216", 868)])
async def test_ntag_types_are_told_apart_by_get_version(
    ntag_sim: NtagSimulator, nfc_reader: NfcReader, kind: str, capacity: int
) -> None:
    ntag_sim.present(image(kind=kind))
    event = await next_event(nfc_reader, ScanKind.ARRIVED)
    assert (event.tag_type, event.capacity) == (kind, capacity)


async def test_a_tag_that_stays_gives_no_more_events_and_a_return_is_recognised(
    ntag_sim: NtagSimulator, nfc_reader: NfcReader
) -> None:
    message = traveler(done=1)
    ntag_sim.present(image(message))
    await next_event(nfc_reader, ScanKind.ARRIVED)
    with pytest.raises(TimeoutError):  # 15 presence checks later: still nothing
        await next_event(nfc_reader, ScanKind.ARRIVED, timeout=0.3)
    tag = ntag_sim.remove()
    assert tag is not None
    left = await next_event(nfc_reader, ScanKind.LEFT)
    assert left.uid == UID
    with pytest.raises(TagIOError, match="not in the field"):
        await nfc_reader.read_ndef(UID)
    ntag_sim.present(tag)
    again = await next_event(nfc_reader, ScanKind.ARRIVED)
    assert again.uid == UID
    assert await nfc_reader.read_ndef(UID) == message  # same UID, same progress


async def test_progress_write_back_writes_only_changed_pages_and_reads_back(
    ntag_sim: NtagSimulator, nfc_reader: NfcReader
) -> None:
    tag = image(traveler(done=1))
    ntag_sim.present(tag)
    await next_event(nfc_reader, ScanKind.ARRIVED)
    old = await nfc_reader.read_ndef(UID)
    contents = decode_tag(old, UID, KEYRING)
    new = update_progress(
        contents,
        contents.progress.with_record(1, StepRecord(StepStatus.OK, "st-20", 1795003600), 3),
    )
    await nfc_reader.write_ndef(UID, new, previous=old)

    changed = {(16 + 2 + 2 + i) // 4 for i in range(len(new)) if new[i] != old[i]}
    assert nfc_reader.last_write_pages == sorted(changed)
    assert ntag_sim.pages_written == sorted(changed)
    # Only the target slot (A: slot B holds the current progress) is touched, never the traveler.
    slot_record = 3 + 6 + contents.slot_size  # short record header, type "ea:prg", payload
    slot_a_start = 20 + len(old) - 2 * slot_record + 9
    assert contents.current_slot == 1
    assert (
        slot_a_start // 4 <= min(changed)
        and max(changed) < (slot_a_start + contents.slot_size) // 4 + 1
    )
    assert await nfc_reader.read_ndef(UID) == new
    after = decode_tag(new, UID, KEYRING)
    assert after.progress.seq == contents.progress.seq + 1 and after.progress.done(1)


async def test_blank_tag_reads_as_empty_and_is_rejected_as_no_traveler(
    ntag_sim: NtagSimulator, nfc_reader: NfcReader
) -> None:
    ntag_sim.present(image())
    await next_event(nfc_reader, ScanKind.ARRIVED)
    message = await nfc_reader.read_ndef(UID)
    assert message == b""
    with pytest.raises(PartRejected) as err:
        decode_tag(message, UID, KEYRING)
    assert err.value.reason == "no_traveler"


async def test_foreign_ndef_record_is_rejected_as_no_traveler(
    ntag_sim: NtagSimulator, nfc_reader: NfcReader
) -> None:
    url = b"".join(ndef.message_encoder([ndef.UriRecord("https://example.com/part/1")]))
    ntag_sim.present(image(url))
    await next_event(nfc_reader, ScanKind.ARRIVED)
    message = await nfc_reader.read_ndef(UID)
    assert message == url
    with pytest.raises(PartRejected) as err:
        decode_tag(message, UID, KEYRING)
    assert err.value.reason == "no_traveler"


async def test_non_ndef_tag_is_a_read_error_that_says_so(
    ntag_sim: NtagSimulator, nfc_reader: NfcReader
) -> None:
    ntag_sim.present(NtagImage.blank("NTAG215", UID, ndef=False))
    await next_event(nfc_reader, ScanKind.ARRIVED)
    with pytest.raises(TagIOError, match=r"04A1B2C3D4E5F6 .*no NDEF data area"):
        await nfc_reader.read_ndef(UID)


async def test_oversized_message_is_refused_before_any_write(
    ntag_sim: NtagSimulator, nfc_reader: NfcReader
) -> None:
    ntag_sim.present(image(kind="NTAG213"))
    await next_event(nfc_reader, ScanKind.ARRIVED)
    with pytest.raises(TagIOError, match=r"holds 142 bytes, the message has 492 \(350 over\)"):
        await nfc_reader.write_ndef(UID, traveler())
    assert ntag_sim.pages_written == []


async def test_read_only_tag_refuses_the_write(
    ntag_sim: NtagSimulator, nfc_reader: NfcReader
) -> None:
    tag = image(traveler())
    tag.make_read_only()
    ntag_sim.present(tag)
    await next_event(nfc_reader, ScanKind.ARRIVED)
    with pytest.raises(TagIOError, match="read-only"):
        await nfc_reader.write_ndef(UID, traveler(done=1))
    assert ntag_sim.pages_written == []


async def test_full_write_of_a_new_message_goes_through_nfcpy_and_is_verified(
    ntag_sim: NtagSimulator, nfc_reader: NfcReader
) -> None:
    ntag_sim.present(image())
    await next_event(nfc_reader, ScanKind.ARRIVED)
    message = traveler()
    await nfc_reader.write_ndef(UID, message)
    assert await nfc_reader.read_ndef(UID) == message
    assert len(decode_tag(message, UID, KEYRING).traveler.steps) == len(STEPS)


async def test_tag_removed_mid_read_is_a_read_error_then_left(
    ntag_sim: NtagSimulator, nfc_reader: NfcReader
) -> None:
    ntag_sim.present(image(traveler()))
    await next_event(nfc_reader, ScanKind.ARRIVED)
    await nfc_reader.read_ndef(UID)  # the copy read at arrival
    ntag_sim.leave_after_commands = 3  # gone after 3 of the ~31 READs of the message
    with pytest.raises(TagIOError, match="04A1B2C3D4E5F6 left the field during the read"):
        await nfc_reader.read_ndef(UID)
    await next_event(nfc_reader, ScanKind.LEFT)


async def test_stop_is_prompt_with_a_tag_held(
    ntag_sim: NtagSimulator, nfc_reader: NfcReader
) -> None:
    ntag_sim.present(image(traveler()))
    await next_event(nfc_reader, ScanKind.ARRIVED)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await nfc_reader.stop()
    assert loop.time() - started < 1.0
    with pytest.raises(TagIOError, match="stopped"):
        await nfc_reader.read_ndef(UID)


async def test_a_late_reply_does_not_shift_the_following_reads(
    ntag_sim: NtagSimulator, nfc_reader: NfcReader
) -> None:
    message = traveler()
    ntag_sim.present(image(message))
    await next_event(nfc_reader, ScanKind.ARRIVED)
    await nfc_reader.read_ndef(UID)  # the copy read at arrival
    # One READ reply arrives after the reader's first wait for it. A reader that sends the READ
    # again gets two replies for one command, the spare landing after its next command: taking
    # it as that command's reply would shift every later page of the message.
    ntag_sim.late_by = 1.4 * UDP_REPLY_WAIT
    ntag_sim.late_reads = 1
    assert await nfc_reader.read_ndef(UID) == message


async def test_a_tag_answering_late_on_a_busy_host_is_still_read_and_written(
    ntag_sim: NtagSimulator, nfc_reader: NfcReader
) -> None:
    old = traveler(done=1)
    contents = decode_tag(old, UID, KEYRING)
    new = update_progress(
        contents, contents.progress.with_record(1, StepRecord(StepStatus.OK, "st-20", 9), 3)
    )
    # Every reply 20 ms late: past nfcpy's air-interface timeouts (READ 3 x 5 ms, GET_VERSION
    # 10 ms), as a loaded host delivers them over udp. Neither taken for a plain Type2Tag (the
    # NTAG probe timing out) nor for gone.
    ntag_sim.delay = 0.02
    ntag_sim.present(image(old))
    arrived = await next_event(nfc_reader, ScanKind.ARRIVED)
    assert (arrived.tag_type, arrived.capacity) == ("NTAG215", 492)
    assert await nfc_reader.read_ndef(UID) == old
    await nfc_reader.write_ndef(UID, new, previous=old)
    assert await nfc_reader.read_ndef(UID) == new
    ntag_sim.remove()
    # The next event is this leaving: the reader never took the tag for gone meanwhile.
    left = await asyncio.wait_for(nfc_reader._events.get(), 5)
    assert left is not None and (left.kind, left.uid) == (ScanKind.LEFT, UID)
