"""The CBOR subset of instruction format v1, checked before cbor2 sees a byte.

The subset: unsigned/negative ints, byte and text strings, arrays, maps, false/true/null and
floats, all definite-length, nested at most ``MAX_DEPTH`` deep. No tags: cbor2 would otherwise
build datetimes, bignums, regexes or shared (cyclic) references from untrusted bytes before we
could look at them.
"""

from __future__ import annotations

from typing import Any

import cbor2

MAX_DEPTH = 4  # deepest nesting in v1: body map > steps > step > parameters


class Malformed(Exception):
    """The bytes break the format. Turned into PartRejected with the tag UID attached."""


def scan(data: bytes, pos: int, depth: int) -> int:
    """Check the CBOR item at ``pos`` against the v1 subset; return the offset after it."""
    if depth > MAX_DEPTH:
        raise Malformed("CBOR nesting too deep")
    if pos >= len(data):
        raise Malformed("CBOR truncated")
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    pos += 1
    if major == 7:
        if info in (20, 21, 22):
            return pos
        if info in (25, 26, 27):
            end = pos + (1 << (info - 24))
            if end > len(data):
                raise Malformed("CBOR truncated")
            return end
        raise Malformed(f"CBOR simple value {info} is not allowed")
    if info < 24:
        arg = info
    elif info <= 27:
        size = 1 << (info - 24)
        if pos + size > len(data):
            raise Malformed("CBOR truncated")
        arg = int.from_bytes(data[pos : pos + size], "big")
        pos += size
    else:
        raise Malformed("indefinite-length or reserved CBOR encoding is not allowed")
    if major in (0, 1):
        return pos
    if major in (2, 3):
        if arg > len(data) - pos:
            raise Malformed("CBOR truncated")
        return pos + arg
    if major == 6:
        raise Malformed("CBOR tags are not allowed")
    items = arg if major == 4 else 2 * arg
    if items > len(data) - pos:  # every item takes at least one byte
        raise Malformed("CBOR truncated")
    for _ in range(items):
        pos = scan(data, pos, depth + 1)
    return pos


def loads(data: bytes) -> Any:
    """Decode bytes already checked by ``scan``."""
    try:
        return cbor2.loads(data, allow_duplicate_keys=False)
    except (cbor2.CBORError, ValueError, TypeError, OverflowError) as err:
        raise Malformed(f"invalid CBOR: {err}") from err


def decode_exact(data: bytes, what: str) -> Any:
    """Decode one canonical CBOR item that must fill ``data`` exactly."""
    end = scan(data, 0, 0)
    if end != len(data):
        raise Malformed(f"{len(data) - end} unexpected bytes after the {what}")
    value = loads(data)
    # Canonical only: one traveler has one encoding, so its digest identifies it.
    if dumps(value) != data:
        raise Malformed(f"the {what} is not canonical CBOR")
    return value


def dumps(value: Any) -> bytes:
    # canonical=True: sorted map keys, shortest ints and the shortest lossless float.
    return cbor2.dumps(value, canonical=True)
