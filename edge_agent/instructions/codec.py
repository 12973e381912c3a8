"""Instruction format v1: the NDEF message on a part's tag (spec: docs/instruction-format.md).

Three records: a signed traveler (written once by the MES) and two fixed-size progress slots that
stations rewrite alternately. Tag bytes are untrusted input that ends up moving a machine, so decoding
accepts a narrow CBOR subset (``cbor.py``), bounds every size (``limits.py``), verifies the signature
before it interprets the signed body (``traveler.py``) and turns every failure into ``PartRejected``
with a stable reason code. This module is the format's public face: callers import from here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import PartRejected, Reason
from ..messages import uid_hex
from .limits import CRC_SIZE, MAX_MESSAGE, MAX_SEQ, REF_SIZE, check_uid, reject
from .model import Progress, Traveler
from .ndef_v1 import (
    DEFAULT_TAG,
    PROGRESS_TYPE,
    TAG_CAPACITY,
    TRAVELER_TYPE,
    build_message,
    record_size,
    slot_size,
    split_records,
)
from .progress import check_records, full_progress_size, progress_cbor, read_slot, slot_payload
from .signing import KeyRing, check_key_id
from .traveler import SIGNING_CONTEXT, decode_traveler, encode_traveler

if TYPE_CHECKING:  # recipe.py imports the limits; only the type is needed here
    from .recipe import Recipe

__all__ = [
    "DEFAULT_TAG",
    "PROGRESS_TYPE",
    "SIGNING_CONTEXT",
    "TAG_CAPACITY",
    "TRAVELER_TYPE",
    "TagContents",
    "decode_tag",
    "encode_tag",
    "full_progress_size",
    "uid_hex",
    "update_progress",
]


@dataclass(frozen=True)
class TagContents:
    """A decoded, verified tag, and what ``update_progress`` needs to rewrite one slot."""

    traveler: Traveler
    progress: Progress
    uid: bytes
    message: bytes  # the NDEF message exactly as read
    traveler_payload: bytes
    slot_payloads: tuple[bytes, bytes]
    current_slot: int  # 0 (slot A) or 1 (slot B): the slot holding ``progress``
    slot_notes: tuple[str, str]  # per slot: "current", "older", "blank", or why it was ignored

    @property
    def slot_size(self) -> int:
        return len(self.slot_payloads[self.current_slot])


def decode_tag(message: bytes, uid: bytes, keyring: KeyRing) -> TagContents:
    """Decode and verify a tag's NDEF message. Raises PartRejected, and nothing else, on any input."""
    uid = bytes(uid)
    message = bytes(message)
    payloads = split_records(message, uid)
    traveler = decode_traveler(payloads[0], uid, keyring)
    ref = traveler.digest[:REF_SIZE]
    slots = (payloads[1], payloads[2])
    steps, size = len(traveler.steps), len(slots[0])
    if size < (needed := full_progress_size(steps)):
        # Otherwise the machine would run and the write-back fail: the step would run again.
        raise reject(
            Reason.MALFORMED_NDEF,
            uid,
            f"progress slots of {size} bytes cannot record the {steps} steps of this traveler "
            f"(a record on every step needs {needed})",
        )
    found = [read_slot(slot, ref, steps) for slot in slots]
    valid = [(p.seq, -i, i) for i, (p, _) in enumerate(found) if p is not None]
    if not valid:
        why = "; ".join(f"slot {'AB'[i]}: {note}" for i, (_, note) in enumerate(found))
        raise reject(Reason.PROGRESS_CORRUPT, uid, f"no valid progress slot ({why})")
    current = max(valid)[2]  # highest seq wins; on a tie slot A
    notes = tuple(
        "current" if i == current else (note if p is None else "older")
        for i, (p, note) in enumerate(found)
    )
    progress = found[current][0]
    assert progress is not None
    return TagContents(
        traveler=traveler,
        progress=progress,
        uid=uid,
        message=message,
        traveler_payload=payloads[0],
        slot_payloads=slots,
        current_slot=current,
        slot_notes=(notes[0], notes[1]),
    )


def encode_tag(
    recipe: Recipe,
    uid: bytes,
    key: Ed25519PrivateKey,
    key_id: str,
    capacity: int,
    issued_at: int | None = None,
) -> bytes:
    """The full NDEF message for a new tag: signed traveler, slot A = empty progress, slot B blank.

    Raises ValueError when the recipe or its progress does not fit ``capacity`` bytes (saying by
    how much) or a field breaks the format's limits.
    """
    uid = check_uid(uid)
    check_key_id(key_id)
    issued = int(time.time()) if issued_at is None else issued_at
    traveler_payload, digest = encode_traveler(recipe, uid, key, key_id, issued)

    traveler_size = record_size(len(traveler_payload), TRAVELER_TYPE)
    needed_slot = full_progress_size(len(recipe.steps))
    needed = traveler_size + 2 * record_size(needed_slot, PROGRESS_TYPE)
    # The format bounds a message at MAX_MESSAGE bytes whatever the tag holds.
    room = min(capacity, MAX_MESSAGE)
    holds = f"the tag holds {capacity}" if room == capacity else f"a message holds at most {room}"
    if traveler_size > room:
        raise ValueError(
            f"traveler record is {traveler_size} bytes, {holds}: "
            f"{traveler_size - room} bytes over (and 2 progress slots need "
            f"{needed - traveler_size} more)"
        )
    if needed > room:
        raise ValueError(
            f"traveler ({traveler_size} bytes) and two progress slots of {needed_slot} bytes "
            f"need {needed} bytes, {holds}: {needed - room} bytes over"
        )
    slot = slot_size(room - traveler_size)
    ref = digest[:REF_SIZE]
    message = build_message(
        traveler_payload, slot_payload(progress_cbor(0, ref, ()), slot), bytes(slot)
    )
    # Never hand out a tag that readers would refuse: decode it exactly as a station will.
    try:
        decode_tag(message, uid, KeyRing({key_id: key.public_key()}))
    except PartRejected as err:
        raise ValueError(f"recipe cannot be encoded: {err}") from err
    return message


def update_progress(contents: TagContents, progress: Progress) -> bytes:
    """The new NDEF message with ``progress`` written into the slot not holding the current one.

    The sequence number is always the current one + 1 (``progress.seq`` is ignored), so the new
    slot wins on the next read; if the write tears, the old slot still stands. Only the target
    slot's payload bytes differ from ``contents.message``. Raises ValueError when the records do
    not fit the slot or break the format's limits.
    """
    check_records(progress.records, len(contents.traveler.steps))
    seq = contents.progress.seq + 1
    if seq > MAX_SEQ:
        raise ValueError("progress sequence number exhausted")
    cbor = progress_cbor(seq, contents.traveler.digest[:REF_SIZE], progress.records)
    size = contents.slot_size
    if CRC_SIZE + len(cbor) > size:
        over = CRC_SIZE + len(cbor) - size
        raise ValueError(
            f"progress needs {CRC_SIZE + len(cbor)} bytes but a slot on tag "
            f"{uid_hex(contents.uid)} holds {size}: {over} bytes over (shorter station ids?)"
        )
    slots = list(contents.slot_payloads)
    slots[1 - contents.current_slot] = slot_payload(cbor, size)
    return build_message(contents.traveler_payload, slots[0], slots[1])
