"""Instruction format v1: the NDEF message on a part's tag (spec: docs/instruction-format.md).

Three records: a signed traveler (written once by the MES) and two fixed-size progress slots that
stations rewrite alternately. Tag bytes are untrusted input that ends up moving a machine, so decoding
accepts a narrow CBOR subset, bounds every size, verifies the signature before it interprets the
signed body, and turns every failure into ``PartRejected`` with a stable reason code.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import PartRejected
from .model import ParamValue, Progress, Step, StepRecord, StepStatus, Traveler
from .signing import KEY_ID_PATTERN, KeyRing, check_key_id

if TYPE_CHECKING:  # recipe.py imports the limits below; only the type is needed here
    from .recipe import Recipe

FORMAT_VERSION = 1
TRAVELER_TYPE = "urn:nfc:ext:ea:trv"
PROGRESS_TYPE = "urn:nfc:ext:ea:prg"
SIGNING_CONTEXT = b"edge-agent traveler v1\0"

TAG_CAPACITY = {"ntag213": 142, "ntag215": 492, "ntag216": 868}
DEFAULT_TAG = "ntag215"

# Limits. Tags hold at most a few KiB; anything bigger is not ours.
MAX_MESSAGE = 8192
MAX_STEPS = 32
MAX_PARAMS = 32
MAX_NAMES = 64  # distinct parameter names in one traveler
MAX_TEXT = 64
MAX_NAME = 32
MAX_INT = 2**63 - 1
MIN_INT = -(2**63)
MAX_SEQ = 2**32 - 1
MAX_TIME = 2**32 - 1
UID_SIZES = range(4, 11)  # ISO 14443 UIDs are 4, 7 or 10 bytes; FeliCa IDm 8
SIGNATURE_SIZE = 64
REF_SIZE = 4
CRC_SIZE = 4
SIZING_STATION_CHARS = 8  # a slot must hold a full progress with station ids this long
_MAX_DEPTH = 4  # deepest nesting in v1: body map > steps > step > parameters

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*\Z")  # operations and parameter names

# Integer keys of the signed body map. Parameter names are stored once in K_NAMES (sorted) and
# steps refer to them by index: "spindle_speed" repeated in every step would not fit an NTAG215.
K_PART, K_PRODUCT, K_VARIANT, K_ORDER, K_LOT, K_ISSUED, K_UID, K_STEPS, K_NAMES = range(9)
_REQUIRED_KEYS = {K_PART, K_PRODUCT, K_VARIANT, K_ORDER, K_ISSUED, K_UID, K_STEPS, K_NAMES}
_ALL_KEYS = _REQUIRED_KEYS | {K_LOT}

_STATUS_CODES = {StepStatus.OK: 0, StepStatus.FAILED: 1}
_STATUS_BY_CODE = {code: status for status, code in _STATUS_CODES.items()}


def uid_hex(uid: bytes) -> str:
    return uid.hex().upper()


def text_problem(
    value: object, max_len: int = MAX_TEXT, *, allow_empty: bool = False
) -> str | None:
    """Why ``value`` is not acceptable tag text, or None. Shared by the recipe model and the decoder."""
    if not isinstance(value, str):
        return "must be a text string"
    if not value and not allow_empty:
        return "must not be empty"
    if len(value) > max_len:
        return f"is {len(value)} characters long, at most {max_len} allowed"
    if not value.isprintable():
        return "contains control or non-printable characters"
    return None


def name_problem(value: object) -> str | None:
    """Why ``value`` is not a valid operation or parameter name, or None."""
    problem = text_problem(value, MAX_NAME)
    if problem is None and isinstance(value, str) and not NAME_PATTERN.match(value):
        problem = "must be lower case letters, digits and _ (starting with a letter)"
    return problem


def value_problem(value: object) -> str | None:
    """Why ``value`` is not an acceptable parameter value, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if MIN_INT <= value <= MAX_INT else "integer out of 64-bit range"
    if isinstance(value, float):
        return None if math.isfinite(value) else "must be a finite number"
    if isinstance(value, str):
        return text_problem(value, allow_empty=True)
    return f"unsupported type {type(value).__name__} (use int, float, bool or text)"


# ----------------------------------------------------------------------------------------- CBOR


class _Malformed(Exception):
    """Internal: the bytes break the format. Turned into PartRejected with the tag UID attached."""


def _scan(data: bytes, pos: int, depth: int) -> int:
    """Check the CBOR item at ``pos`` against the v1 subset; return the offset after it.

    The subset: unsigned/negative ints, byte and text strings, arrays, maps, false/true/null and
    floats, all definite-length. No tags: cbor2 would otherwise build datetimes, bignums, regexes or
    shared (cyclic) references from untrusted bytes before we could look at them.
    """
    if depth > _MAX_DEPTH:
        raise _Malformed("CBOR nesting too deep")
    if pos >= len(data):
        raise _Malformed("CBOR truncated")
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    pos += 1
    if major == 7:
        if info in (20, 21, 22):
            return pos
        if info in (25, 26, 27):
            end = pos + (1 << (info - 24))
            if end > len(data):
                raise _Malformed("CBOR truncated")
            return end
        raise _Malformed(f"CBOR simple value {info} is not allowed")
    if info < 24:
        arg = info
    elif info <= 27:
        size = 1 << (info - 24)
        if pos + size > len(data):
            raise _Malformed("CBOR truncated")
        arg = int.from_bytes(data[pos : pos + size], "big")
        pos += size
    else:
        raise _Malformed("indefinite-length or reserved CBOR encoding is not allowed")
    if major in (0, 1):
        return pos
    if major in (2, 3):
        if arg > len(data) - pos:
            raise _Malformed("CBOR truncated")
        return pos + arg
    if major == 6:
        raise _Malformed("CBOR tags are not allowed")
    items = arg if major == 4 else 2 * arg
    if items > len(data) - pos:  # every item takes at least one byte
        raise _Malformed("CBOR truncated")
    for _ in range(items):
        pos = _scan(data, pos, depth + 1)
    return pos


def _loads(data: bytes) -> Any:
    """Decode bytes already checked by ``_scan``."""
    try:
        return cbor2.loads(data, allow_duplicate_keys=False)
    except (cbor2.CBORError, ValueError, TypeError, OverflowError) as err:
        raise _Malformed(f"invalid CBOR: {err}") from err


def _decode_exact(data: bytes, what: str) -> Any:
    """Decode one canonical CBOR item that must fill ``data`` exactly."""
    end = _scan(data, 0, 0)
    if end != len(data):
        raise _Malformed(f"{len(data) - end} unexpected bytes after the {what}")
    value = _loads(data)
    # Canonical only: one traveler has one encoding, so its digest identifies it.
    if _dumps(value) != data:
        raise _Malformed(f"the {what} is not canonical CBOR")
    return value


def _dumps(value: Any) -> bytes:
    # canonical=True: sorted map keys, shortest ints and the shortest lossless float.
    return cbor2.dumps(value, canonical=True)


# ------------------------------------------------------------------------------------- model


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


def _reject(reason: str, uid: bytes, message: str) -> PartRejected:
    return PartRejected(reason, f"tag {uid_hex(uid)}: {message}")


# ------------------------------------------------------------------------------------- decode


def decode_tag(message: bytes, uid: bytes, keyring: KeyRing) -> TagContents:
    """Decode and verify a tag's NDEF message. Raises PartRejected, and nothing else, on any input."""
    uid = bytes(uid)
    message = bytes(message)
    payloads = _split_records(message, uid)
    traveler = _decode_traveler(payloads[0], uid, keyring)
    ref = traveler.digest[:REF_SIZE]
    slots = (payloads[1], payloads[2])
    found = [_read_slot(slot, ref, len(traveler.steps)) for slot in slots]
    valid = [(p.seq, -i, i) for i, (p, _) in enumerate(found) if p is not None]
    if not valid:
        why = "; ".join(f"slot {'AB'[i]}: {note}" for i, (_, note) in enumerate(found))
        raise _reject("progress_corrupt", uid, f"no valid progress slot ({why})")
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


def _split_records(message: bytes, uid: bytes) -> tuple[bytes, bytes, bytes]:
    payloads = _split_v1(message)
    if payloads is not None:  # the common case: exactly our layout, no need for ndeflib
        return payloads
    if not message:
        raise _reject("no_traveler", uid, "the tag holds an empty NDEF message (blank tag?)")
    if len(message) > MAX_MESSAGE:
        raise _reject("malformed_ndef", uid, f"NDEF message of {len(message)} bytes is too large")
    try:
        # known_types={}: do not let ndeflib interpret payloads (URIs, Wi-Fi, ...) of foreign records.
        import ndef  # only to explain input that is not in our layout; it costs ~1.5 MiB

        records = list(ndef.message_decoder(message, errors="strict", known_types={}))
    except Exception as err:  # ndeflib raises DecodeError and, on odd input, whatever else it hits
        raise _reject("malformed_ndef", uid, f"not a valid NDEF message: {err}") from err
    types = [str(r.type) for r in records]
    if TRAVELER_TYPE not in types:
        shown = ", ".join(repr(t[:40]) for t in types[:4]) or "none"
        raise _reject("no_traveler", uid, f"no edge-agent traveler record (records: {shown})")
    if types != [TRAVELER_TYPE, PROGRESS_TYPE, PROGRESS_TYPE]:
        raise _reject(
            "malformed_ndef",
            uid,
            f"expected records [traveler, progress, progress], found {len(types)}: "
            + ", ".join(repr(t[:40]) for t in types[:4]),
        )
    payloads = (bytes(records[0].data), bytes(records[1].data), bytes(records[2].data))
    # Only our own layout is accepted (short records where possible, no IDs, no chunks): then a
    # rewritten slot changes nothing but its own payload bytes.
    if _build_message(*payloads) != message or any(r.name for r in records):
        raise _reject("malformed_ndef", uid, "NDEF records are not in the v1 layout")
    return payloads


def _decode_traveler(payload: bytes, uid: bytes, keyring: KeyRing) -> Traveler:
    try:
        version = _peek_version(payload)
    except _Malformed as err:
        raise _reject("malformed_traveler", uid, f"traveler record: {err}") from err
    if version != FORMAT_VERSION:
        raise _reject(
            "unknown_version",
            uid,
            f"traveler format version {version} is not supported by this agent "
            f"(supports {FORMAT_VERSION})",
        )
    try:
        key_id, body, signature = _outer_fields(payload)
    except _Malformed as err:
        raise _reject("malformed_traveler", uid, f"traveler record: {err}") from err
    key = keyring.get(key_id)
    if key is None:
        known = ", ".join(sorted(keyring)) or "none"
        raise _reject(
            "unknown_key",
            uid,
            f"traveler is signed with key {key_id!r}, not trusted here (trusted: {known})",
        )
    signed = _signed_bytes(key_id, uid, body)
    try:
        key.verify(signature, signed)
    except InvalidSignature:
        issued_for = _genuine_for_other_tag(key_id, body, signature, uid, keyring)
        if issued_for is not None:
            raise _reject(
                "uid_mismatch",
                uid,
                f"traveler was issued for tag {uid_hex(issued_for)} but was read from tag "
                f"{uid_hex(uid)} (copied tag contents?)",
            ) from None
        raise _reject(
            "bad_signature", uid, f"signature of key {key_id!r} does not match (tampered or forged)"
        ) from None
    # Only now is the body trusted enough to be interpreted.
    try:
        traveler = _parse_body(body, key_id, hashlib.sha256(signed).digest())
    except _Malformed as err:
        raise _reject("malformed_traveler", uid, f"traveler body: {err}") from err
    if traveler.tag_uid != uid:
        raise _reject(
            "uid_mismatch",
            uid,
            f"traveler was issued for tag {uid_hex(traveler.tag_uid)} but was read from tag {uid_hex(uid)}",
        )
    return traveler


def _peek_version(payload: bytes) -> int:
    """The version, read before anything else: every version starts ``[version, ...``."""
    if not payload or payload[0] >> 5 != 4:
        raise _Malformed("payload is not a CBOR array")
    info = payload[0] & 0x1F
    if info > 27:
        raise _Malformed("indefinite-length or reserved CBOR encoding is not allowed")
    header = 1 if info < 24 else 1 + (1 << (info - 24))
    first_end = _scan(payload, header, 1)
    version = _loads(payload[header:first_end])
    if type(version) is not int:
        raise _Malformed("version is not an integer")
    return version


def _outer_fields(payload: bytes) -> tuple[str, bytes, bytes]:
    outer = _decode_exact(payload, "traveler payload")
    if not isinstance(outer, list) or len(outer) != 4:
        raise _Malformed("payload must be [version, key id, body, signature]")
    _, key_id, body, signature = outer
    if not isinstance(key_id, str) or not KEY_ID_PATTERN.match(key_id):
        raise _Malformed("key id must be 1-16 characters of A-Z a-z 0-9 _ . -")
    if not isinstance(body, bytes):
        raise _Malformed("body must be a byte string")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
        raise _Malformed(f"signature must be a {SIGNATURE_SIZE}-byte string")
    return key_id, body, signature


def _signed_bytes(key_id: str, uid: bytes, body: bytes) -> bytes:
    return SIGNING_CONTEXT + key_id.encode("ascii") + b"\0" + uid + body


def _genuine_for_other_tag(
    key_id: str, body: bytes, signature: bytes, uid: bytes, keyring: KeyRing
) -> bytes | None:
    """The UID a traveler was validly signed for, when that is not ``uid``; else None.

    Only called after verification failed. Claiming "issued for tag X" is safe only once the
    signature checks out for X, so the body's UID is looked up and then verified, not believed.
    """
    try:
        body_map = _decode_exact(body, "traveler body")
        other = body_map.get(K_UID) if isinstance(body_map, dict) else None
    except _Malformed:
        return None
    if not isinstance(other, bytes) or other == uid or len(other) not in UID_SIZES:
        return None
    try:
        keyring[key_id].verify(signature, _signed_bytes(key_id, other, body))
    except InvalidSignature:
        return None
    return other


def _text(value: object, what: str, max_len: int = MAX_TEXT) -> str:
    problem = text_problem(value, max_len)
    if problem:
        raise _Malformed(f"{what} {problem}")
    assert isinstance(value, str)
    return value


def _int(value: object, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _Malformed(f"{what} must be an integer in {low}..{high}")
    return value


def _parse_body(body: bytes, key_id: str, digest: bytes) -> Traveler:
    fields = _decode_exact(body, "traveler body")
    if not isinstance(fields, dict):
        raise _Malformed("must be a map")
    keys = set(fields)
    if not keys <= _ALL_KEYS:  # unknown keys may change meaning: a new field needs a new version
        raise _Malformed(f"unknown field keys {sorted(map(repr, keys - _ALL_KEYS))}")
    if missing := _REQUIRED_KEYS - keys:
        raise _Malformed(f"missing field keys {sorted(missing)}")
    tag_uid = fields[K_UID]
    if not isinstance(tag_uid, bytes) or len(tag_uid) not in UID_SIZES:
        raise _Malformed("tag UID must be a 4-10 byte string")
    names = fields[K_NAMES]
    if not isinstance(names, list) or len(names) > MAX_NAMES:
        raise _Malformed(f"parameter names must be a list of at most {MAX_NAMES}")
    for name in names:
        if problem := name_problem(name):
            raise _Malformed(f"parameter name {problem}")
    if names != sorted(set(names)):
        raise _Malformed("parameter names must be sorted and unique")
    raw_steps = fields[K_STEPS]
    if not isinstance(raw_steps, list) or not 1 <= len(raw_steps) <= MAX_STEPS:
        raise _Malformed(f"steps must be a list of 1..{MAX_STEPS} steps")
    steps = tuple(_parse_step(raw, i, names) for i, raw in enumerate(raw_steps))
    if len({n for s in steps for n in s.parameters}) != len(names):
        raise _Malformed("parameter names table lists names no step uses")
    lot = fields.get(K_LOT)
    return Traveler(
        part_id=_text(fields[K_PART], "part id"),
        product=_text(fields[K_PRODUCT], "product"),
        variant=_text(fields[K_VARIANT], "variant"),
        order=_text(fields[K_ORDER], "order"),
        material_lot=None if lot is None else _text(lot, "material lot"),
        issued_at=_int(fields[K_ISSUED], "issued_at", 0, MAX_TIME),
        tag_uid=tag_uid,
        steps=steps,
        key_id=key_id,
        digest=digest,
    )


def _parse_step(raw: object, index: int, names: list[str]) -> Step:
    where = f"step {index + 1}"
    if not isinstance(raw, list) or len(raw) != 3:
        raise _Malformed(f"{where} must be [operation, parameters, station]")
    operation, params, station = raw
    if problem := name_problem(operation):
        raise _Malformed(f"{where} operation {problem}")
    if not isinstance(params, dict) or len(params) > MAX_PARAMS:
        raise _Malformed(f"{where} parameters must be a map of at most {MAX_PARAMS} entries")
    parameters: dict[str, ParamValue] = {}
    for name_index, value in params.items():
        if type(name_index) is not int or not 0 <= name_index < len(names):
            raise _Malformed(f"{where} parameter key must index the parameter names")
        name = names[name_index]
        if problem := value_problem(value):
            raise _Malformed(f"{where} parameter {name}: {problem}")
        parameters[name] = value
    return Step(
        operation=operation,
        parameters=parameters,
        station=None if station is None else _text(station, f"{where} station"),
    )


def _read_slot(payload: bytes, ref: bytes, step_count: int) -> tuple[Progress | None, str]:
    """The progress in one slot, or None and why the slot is ignored (torn, blank, foreign)."""
    if not any(payload):
        return None, "blank"
    if len(payload) <= CRC_SIZE:
        return None, "too short"
    if zlib.crc32(payload[CRC_SIZE:]).to_bytes(CRC_SIZE, "big") != payload[:CRC_SIZE]:
        return None, "checksum mismatch (torn write?)"
    data = payload[CRC_SIZE:]
    try:
        end = _scan(data, 0, 1)  # records sit two levels down; no deeper nesting is valid
        if any(data[end:]):
            raise _Malformed("non-zero padding")
        value = _loads(data[:end])
        if not isinstance(value, list) or len(value) != 4:
            raise _Malformed("not [version, seq, traveler ref, records]")
        version, seq, slot_ref, raw_records = value
        if version != FORMAT_VERSION or type(version) is not int:
            raise _Malformed(f"unknown progress version {version!r}")
        seq = _int(seq, "seq", 0, MAX_SEQ)
        if slot_ref != ref:
            return None, "belongs to another traveler"
        if not isinstance(raw_records, list) or len(raw_records) > step_count:
            raise _Malformed("records must be a list no longer than the steps")
        records = [_parse_record(r) for r in raw_records]
    except _Malformed as err:
        return None, f"invalid: {err}"
    records += [None] * (step_count - len(records))
    return Progress(seq=seq, records=tuple(records)), "valid"


def _parse_record(raw: object) -> StepRecord | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != 3:
        raise _Malformed("record must be [status, station, time]")
    status, station, at = raw
    if type(status) is not int or status not in _STATUS_BY_CODE:
        raise _Malformed(f"unknown step status {status!r}")
    return StepRecord(
        status=_STATUS_BY_CODE[status],
        station=_text(station, "station"),
        time=_int(at, "time", 0, MAX_TIME),
    )


# ------------------------------------------------------------------------------------- encode


def _record_size(payload_size: int, type_name: str) -> int:
    type_len = len(type_name.split(":", 3)[-1])  # ndeflib stores "ea:trv" for urn:nfc:ext:ea:trv
    return (3 if payload_size < 256 else 6) + type_len + payload_size


# The v1 layout is three NFC Forum external-type records (TNF 4) without IDs or chunks, short
# records (SR) for payloads under 256 bytes. Encoding it directly is exact and several times
# faster than going through ndeflib, which decode still uses to explain anything else.
_MB, _ME, _SR, _TNF_EXTERNAL = 0x80, 0x40, 0x10, 0x04
_V1_TYPES = (
    TRAVELER_TYPE.removeprefix("urn:nfc:ext:").encode(),
    PROGRESS_TYPE.removeprefix("urn:nfc:ext:").encode(),
    PROGRESS_TYPE.removeprefix("urn:nfc:ext:").encode(),
)


def _record_bytes(type_name: bytes, payload: bytes, index: int) -> bytes:
    flags = _TNF_EXTERNAL | (_MB if index == 0 else 0) | (_ME if index == 2 else 0)
    if len(payload) < 256:
        return bytes((flags | _SR, len(type_name), len(payload))) + type_name + payload
    return bytes((flags, len(type_name))) + len(payload).to_bytes(4, "big") + type_name + payload


def _build_message(traveler: bytes, slot_a: bytes, slot_b: bytes) -> bytes:
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


def _progress_cbor(seq: int, ref: bytes, records: Sequence[StepRecord | None]) -> bytes:
    trimmed = list(records)
    while (
        trimmed and trimmed[-1] is None
    ):  # trailing "not attempted" records cost bytes for nothing
        trimmed.pop()
    raw = [None if r is None else [_STATUS_CODES[r.status], r.station, r.time] for r in trimmed]
    return _dumps([FORMAT_VERSION, seq, ref, raw])


def _slot_payload(cbor: bytes, size: int) -> bytes:
    data = cbor + bytes(size - CRC_SIZE - len(cbor))
    return zlib.crc32(data).to_bytes(CRC_SIZE, "big") + data


def full_progress_size(step_count: int, station_chars: int = SIZING_STATION_CHARS) -> int:
    """Slot payload bytes needed for a record on every step, worst-case seq and times."""
    worst = StepRecord(StepStatus.FAILED, "x" * station_chars, MAX_TIME)
    return CRC_SIZE + len(_progress_cbor(MAX_SEQ, bytes(REF_SIZE), [worst] * step_count))


def check_uid(uid: bytes) -> bytes:
    if not isinstance(uid, bytes | bytearray) or len(uid) not in UID_SIZES:
        raise ValueError("tag UID must be 4 to 10 bytes")
    return bytes(uid)


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
    steps = recipe.to_steps()
    names = sorted({name for s in steps for name in s.parameters})
    index = {name: i for i, name in enumerate(names)}
    fields: dict[int, Any] = {
        K_PART: recipe.part_id,
        K_PRODUCT: recipe.product,
        K_VARIANT: recipe.variant,
        K_ORDER: recipe.order,
        K_ISSUED: issued,
        K_UID: uid,
        K_STEPS: [
            [s.operation, {index[n]: v for n, v in s.parameters.items()}, s.station] for s in steps
        ],
        K_NAMES: names,
    }
    if recipe.material_lot is not None:
        fields[K_LOT] = recipe.material_lot
    body = _dumps(fields)
    signed = _signed_bytes(key_id, uid, body)
    traveler_payload = _dumps([FORMAT_VERSION, key_id, body, key.sign(signed)])

    traveler_size = _record_size(len(traveler_payload), TRAVELER_TYPE)
    needed_slot = full_progress_size(len(steps))
    needed = traveler_size + 2 * _record_size(needed_slot, PROGRESS_TYPE)
    if traveler_size > capacity:
        raise ValueError(
            f"traveler record is {traveler_size} bytes, the tag holds {capacity}: "
            f"{traveler_size - capacity} bytes over (and 2 progress slots need "
            f"{needed - traveler_size} more)"
        )
    if needed > capacity:
        raise ValueError(
            f"traveler ({traveler_size} bytes) and two progress slots of {needed_slot} bytes "
            f"need {needed} bytes, the tag holds {capacity}: {needed - capacity} bytes over"
        )
    slot = _slot_size(capacity - traveler_size)
    ref = hashlib.sha256(signed).digest()[:REF_SIZE]
    message = _build_message(
        traveler_payload, _slot_payload(_progress_cbor(0, ref, ()), slot), bytes(slot)
    )
    # Never hand out a tag that readers would refuse: decode it exactly as a station will.
    try:
        decode_tag(message, uid, KeyRing({key_id: key.public_key()}))
    except PartRejected as err:
        raise ValueError(f"recipe cannot be encoded: {err}") from err
    return message


def _slot_size(room: int) -> int:
    """Largest equal slot payload size such that both slot records fit in ``room`` bytes."""
    size = room // 2
    while size > 0 and 2 * _record_size(size, PROGRESS_TYPE) > room:
        size -= 1
    return size


def update_progress(contents: TagContents, progress: Progress) -> bytes:
    """The new NDEF message with ``progress`` written into the slot not holding the current one.

    The sequence number is always the current one + 1 (``progress.seq`` is ignored), so the new
    slot wins on the next read; if the write tears, the old slot still stands. Only the target
    slot's payload bytes differ from ``contents.message``. Raises ValueError when the records do
    not fit the slot or break the format's limits.
    """
    steps = len(contents.traveler.steps)
    if len(progress.records) > steps:
        raise ValueError(f"progress has {len(progress.records)} records for {steps} steps")
    for i, record in enumerate(progress.records):
        if record is None:
            continue
        if problem := text_problem(record.station):
            raise ValueError(f"record for step {i + 1}: station {problem}")
        if type(record.time) is not int or not 0 <= record.time <= MAX_TIME:
            raise ValueError(f"record for step {i + 1}: time must be unix seconds in 0..{MAX_TIME}")
        if record.status not in _STATUS_CODES:
            raise ValueError(f"record for step {i + 1}: unknown status {record.status!r}")
    seq = contents.progress.seq + 1
    if seq > MAX_SEQ:
        raise ValueError("progress sequence number exhausted")
    cbor = _progress_cbor(seq, contents.traveler.digest[:REF_SIZE], progress.records)
    size = contents.slot_size
    if CRC_SIZE + len(cbor) > size:
        over = CRC_SIZE + len(cbor) - size
        raise ValueError(
            f"progress needs {CRC_SIZE + len(cbor)} bytes but a slot on tag "
            f"{uid_hex(contents.uid)} holds {size}: {over} bytes over (shorter station ids?)"
        )
    slots = list(contents.slot_payloads)
    slots[1 - contents.current_slot] = _slot_payload(cbor, size)
    return _build_message(contents.traveler_payload, slots[0], slots[1])
