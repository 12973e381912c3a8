"""The v1 NDEF layout: a traveler record and two equal progress slot records, nothing else.

Three NFC Forum external-type records (TNF 4) without IDs or chunks, short records (SR) for
payloads under 256 bytes. Encoding it directly is exact and several times faster than going
through ndeflib, which is used only to explain a message that is not in this layout.
"""

from __future__ import annotations

from ..errors import Reason
from .limits import MAX_MESSAGE, reject

TRAVELER_TYPE = "urn:nfc:ext:ea:trv"
PROGRESS_TYPE = "urn:nfc:ext:ea:prg"

TAG_CAPACITY = {"ntag213": 142, "ntag215": 492, "ntag216": 868}
DEFAULT_TAG = "ntag215"

_MB, _ME, _SR, _TNF_EXTERNAL = 0x80, 0x40, 0x10, 0x04
_V1_TYPES = (
    TRAVELER_TYPE.removeprefix("urn:nfc:ext:").encode(),
    PROGRESS_TYPE.removeprefix("urn:nfc:ext:").encode(),
    PROGRESS_TYPE.removeprefix("urn:nfc:ext:").encode(),
)


def record_size(payload_size: int, type_name: str) -> int:
    type_len = len(type_name.split(":", 3)[-1])  # ndeflib stores "ea:trv" for urn:nfc:ext:ea:trv
    return (3 if payload_size < 256 else 6) + type_len + payload_size


def slot_size(room: int) -> int:
    """Largest equal slot payload size such that both slot records fit in ``room`` bytes."""
    size = room // 2
    while size > 0 and 2 * record_size(size, PROGRESS_TYPE) > room:
        size -= 1
    return size


def _record_bytes(type_name: bytes, payload: bytes, index: int) -> bytes:
    flags = _TNF_EXTERNAL | (_MB if index == 0 else 0) | (_ME if index == 2 else 0)
    if len(payload) < 256:
        return bytes((flags | _SR, len(type_name), len(payload))) + type_name + payload
    return bytes((flags, len(type_name))) + len(payload).to_bytes(4, "big") + type_name + payload


def build_message(traveler: bytes, slot_a: bytes, slot_b: bytes) -> bytes:
    return b"".join(
        _record_bytes(t, p, i)
        for i, (t, p) in enumerate(zip(_V1_TYPES, (traveler, slot_a, slot_b), strict=True))
    )


def _split_v1(message: bytes) -> tuple[bytes, bytes, bytes] | None:
    """The three payloads when ``message`` is byte for byte in the v1 layout, else None."""
    payloads: list[bytes] = []
    pos = 0
    for index, type_name in enumerate(_V1_TYPES):
        if pos + 3 > len(message):
            return None
        short = message[pos] & _SR
        start = pos + 2 + (1 if short else 4) + len(type_name)
        size = message[pos + 2] if short else int.from_bytes(message[pos + 2 : pos + 6], "big")
        payload = message[start : start + size]
        if len(payload) != size or message[pos : start + size] != _record_bytes(
            type_name, payload, index
        ):
            return None
        payloads.append(payload)
        pos = start + size
    return (payloads[0], payloads[1], payloads[2]) if pos == len(message) else None


def split_records(message: bytes, uid: bytes) -> tuple[bytes, bytes, bytes]:
    """The traveler and slot payloads, or PartRejected saying how the message is not v1."""
    if len(message) > MAX_MESSAGE:  # before anything else, whatever the layout
        raise reject(
            Reason.MALFORMED_NDEF,
            uid,
            f"NDEF message of {len(message)} bytes is too large (at most {MAX_MESSAGE})",
        )
    payloads = _split_v1(message)
    if payloads is None:  # not exactly our layout: ndeflib says how
        payloads = _explain(message, uid)
    a, b = len(payloads[1]), len(payloads[2])
    if a != b:  # a rewrite would change the message length, which tear safety rules out
        raise reject(
            Reason.MALFORMED_NDEF,
            uid,
            f"progress slots must be of equal size: slot A holds {a} bytes, slot B {b}",
        )
    return payloads


def _explain(message: bytes, uid: bytes) -> tuple[bytes, bytes, bytes]:
    if not message:
        raise reject(Reason.NO_TRAVELER, uid, "the tag holds an empty NDEF message (blank tag?)")
    try:
        # known_types={}: do not let ndeflib interpret payloads (URIs, Wi-Fi, ...) of foreign records.
        import ndef  # only to explain input that is not in our layout; it costs ~1.5 MiB

        records = list(ndef.message_decoder(message, errors="strict", known_types={}))
    except Exception as err:  # ndeflib raises DecodeError and, on odd input, whatever else it hits
        raise reject(Reason.MALFORMED_NDEF, uid, f"not a valid NDEF message: {err}") from err
    types = [str(r.type) for r in records]
    if TRAVELER_TYPE not in types:
        shown = ", ".join(repr(t[:40]) for t in types[:4]) or "none"
        raise reject(Reason.NO_TRAVELER, uid, f"no edge-agent traveler record (records: {shown})")
    if types != [TRAVELER_TYPE, PROGRESS_TYPE, PROGRESS_TYPE]:
        raise reject(
            Reason.MALFORMED_NDEF,
            uid,
            f"expected records [traveler, progress, progress], found {len(types)}: "
            + ", ".join(repr(t[:40]) for t in types[:4]),
        )
    payloads = (bytes(records[0].data), bytes(records[1].data), bytes(records[2].data))
    # Only our own layout is accepted (short records where possible, no IDs, no chunks): then a
    # rewritten slot changes nothing but its own payload bytes.
    if build_message(*payloads) != message or any(r.name for r in records):
        raise reject(Reason.MALFORMED_NDEF, uid, "NDEF records are not in the v1 layout")
    return payloads
