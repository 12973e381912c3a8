"""The limits of instruction format v1, and the validators the decoder and the recipe model share.

Kept apart from the codec so that ``recipe.py`` can apply exactly the decoder's rules without
importing the decoder (spec: docs/instruction-format.md).
"""

from __future__ import annotations

import math
import re

from ..errors import PartRejected, Reason
from ..messages import uid_hex

FORMAT_VERSION = 1

# Tags hold at most a few KiB; anything bigger is not ours.
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
# A station id, in a step and in a progress record, follows the rule of the agent's `station`
# setting: then a slot sized for records of MAX_STATION characters holds every possible progress.
MAX_STATION = 8
SIZING_STATION_CHARS = MAX_STATION

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*\Z")  # operations and parameter names
STATION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")


def reject(reason: Reason, uid: bytes, message: str) -> PartRejected:
    return PartRejected(reason, f"tag {uid_hex(uid)}: {message}")


def check_uid(uid: bytes) -> bytes:
    if not isinstance(uid, bytes | bytearray) or len(uid) not in UID_SIZES:
        raise ValueError("tag UID must be 4 to 10 bytes")
    return bytes(uid)


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


def station_problem(value: object) -> str | None:
    """Why ``value`` is not a station id (a step's station, a record's station), or None."""
    problem = text_problem(value, MAX_STATION)
    if problem is None and isinstance(value, str) and not STATION_PATTERN.match(value):
        problem = "must be letters, digits, _ . and - (starting with a letter or digit)"
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
