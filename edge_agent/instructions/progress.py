"""The progress slots: fixed-size, CRC-protected records that stations rewrite alternately."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence

from .cbor import Malformed, dumps, loads, scan
from .limits import (
    CRC_SIZE,
    FORMAT_VERSION,
    MAX_SEQ,
    MAX_TIME,
    REF_SIZE,
    SIZING_STATION_CHARS,
    station_problem,
)
from .model import Progress, StepRecord, StepStatus
from .traveler import int_field, station_field

_STATUS_CODES = {StepStatus.OK: 0, StepStatus.FAILED: 1}
_STATUS_BY_CODE = {code: status for status, code in _STATUS_CODES.items()}


def read_slot(payload: bytes, ref: bytes, step_count: int) -> tuple[Progress | None, str]:
    """The progress in one slot, or None and why the slot is ignored (torn, blank, foreign)."""
    if not any(payload):
        return None, "blank"
    if len(payload) <= CRC_SIZE:
        return None, "too short"
    if zlib.crc32(payload[CRC_SIZE:]).to_bytes(CRC_SIZE, "big") != payload[:CRC_SIZE]:
        return None, "checksum mismatch (torn write?)"
    data = payload[CRC_SIZE:]
    try:
        end = scan(data, 0, 1)  # records sit two levels down; no deeper nesting is valid
        if any(data[end:]):
            raise Malformed("non-zero padding")
        value = loads(data[:end])
        if dumps(value) != data[:end]:
            raise Malformed("progress is not canonical CBOR")
        if not isinstance(value, list) or len(value) != 4:
            raise Malformed("not [version, seq, traveler ref, records]")
        version, seq, slot_ref, raw_records = value
        if version != FORMAT_VERSION or type(version) is not int:
            raise Malformed(f"unknown progress version {version!r}")
        seq = int_field(seq, "seq", 0, MAX_SEQ)
        if slot_ref != ref:
            return None, "belongs to another traveler"
        if not isinstance(raw_records, list) or len(raw_records) > step_count:
            raise Malformed("records must be a list no longer than the steps")
        records = [_parse_record(r) for r in raw_records]
    except Malformed as err:
        return None, f"invalid: {err}"
    records += [None] * (step_count - len(records))
    return Progress(seq=seq, records=tuple(records)), "valid"


def _parse_record(raw: object) -> StepRecord | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != 3:
        raise Malformed("record must be [status, station, time]")
    status, station, at = raw
    if type(status) is not int or status not in _STATUS_BY_CODE:
        raise Malformed(f"unknown step status {status!r}")
    return StepRecord(
        status=_STATUS_BY_CODE[status],
        station=station_field(station, "station"),
        time=int_field(at, "time", 0, MAX_TIME),
    )


def check_records(records: Sequence[StepRecord | None], step_count: int) -> None:
    """ValueError when ``records`` cannot be written for a traveler of ``step_count`` steps."""
    if len(records) > step_count:
        raise ValueError(f"progress has {len(records)} records for {step_count} steps")
    for i, record in enumerate(records):
        if record is None:
            continue
        if problem := station_problem(record.station):
            raise ValueError(f"record for step {i + 1}: station {problem}")
        if type(record.time) is not int or not 0 <= record.time <= MAX_TIME:
            raise ValueError(f"record for step {i + 1}: time must be unix seconds in 0..{MAX_TIME}")
        if record.status not in _STATUS_CODES:
            raise ValueError(f"record for step {i + 1}: unknown status {record.status!r}")


def progress_cbor(seq: int, ref: bytes, records: Sequence[StepRecord | None]) -> bytes:
    trimmed = list(records)
    # Trailing "not attempted" records cost bytes for nothing.
    while trimmed and trimmed[-1] is None:
        trimmed.pop()
    raw = [None if r is None else [_STATUS_CODES[r.status], r.station, r.time] for r in trimmed]
    return dumps([FORMAT_VERSION, seq, ref, raw])


def slot_payload(cbor: bytes, size: int) -> bytes:
    data = cbor + bytes(size - CRC_SIZE - len(cbor))
    return zlib.crc32(data).to_bytes(CRC_SIZE, "big") + data


@functools.lru_cache(maxsize=64)  # every tag read asks it for its traveler's step count
def full_progress_size(step_count: int, station_chars: int = SIZING_STATION_CHARS) -> int:
    """Slot payload bytes needed for a record on every step, worst-case seq and times."""
    worst = StepRecord(StepStatus.FAILED, "x" * station_chars, MAX_TIME)
    return CRC_SIZE + len(progress_cbor(MAX_SEQ, bytes(REF_SIZE), [worst] * step_count))
