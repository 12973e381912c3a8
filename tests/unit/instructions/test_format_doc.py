"""docs/instruction-format.md says what the code does: every limit, formula and figure in it.

An MES vendor implements the format from that document alone, so a number that drifts from the code
is a tag that one side refuses.
"""

from __future__ import annotations

import hashlib
import re
import sys
import unicodedata
import zlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.config_schema import AgentConfigDoc
from edge_agent.instructions import cbor, limits
from edge_agent.instructions.codec import (
    PROGRESS_TYPE,
    TAG_CAPACITY,
    TRAVELER_TYPE,
    decode_tag,
    encode_tag,
    full_progress_size,
)
from edge_agent.instructions.ndef_v1 import record_size, slot_size
from edge_agent.instructions.recipe import load_recipe
from edge_agent.instructions.signing import KEY_ID_PATTERN, KeyRing
from tests import REPO_ROOT

ROOT = REPO_ROOT
DOC = (ROOT / "docs/instruction-format.md").read_text(encoding="utf-8")
UID = bytes.fromhex("04A1B2C3D4E5F6")
KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"test key mes-1").digest())


def table_row(label: str) -> str:
    [row] = [line for line in DOC.splitlines() if line.startswith(f"| {label} ")]
    return row


def test_documented_limits_are_the_codes() -> None:
    expected = {
        "whole NDEF message": f"at most {limits.MAX_MESSAGE} bytes",
        "steps per traveler": f"1–{limits.MAX_STEPS}",
        "parameters per step": f"at most {limits.MAX_PARAMS}",
        "distinct parameter names per traveler": f"at most {limits.MAX_NAMES}",
        "operation and parameter names": f"1–{limits.MAX_NAME} characters `[a-z][a-z0-9_]*`",
        "part id, product, variant, order, lot": f"1–{limits.MAX_TEXT} printable",
        "text parameter values": f"0–{limits.MAX_TEXT} printable",
        "station id (a step's station, a record's)": f"1–{limits.MAX_STATION} characters "
        "`[A-Za-z0-9][A-Za-z0-9_.-]*`",
        "integer parameter values": "−2⁶³ … 2⁶³−1",
        "issued_at, record time (unix seconds)": f"0 … {limits.MAX_TIME} ",
        "progress seq": f"0 … {limits.MAX_SEQ} ",
        "tag UID": f"{limits.UID_SIZES[0]}–{limits.UID_SIZES[-1]} bytes",
        "key id": "1–16 characters `[A-Za-z0-9_.-]`",
        "signature": f"{limits.SIGNATURE_SIZE} bytes",
        "traveler ref": f"{limits.REF_SIZE} bytes",
        "CRC": f"{limits.CRC_SIZE} bytes",
        "CBOR nesting": f"at most {cbor.MAX_DEPTH} levels",
    }
    for label, text in expected.items():
        assert text in table_row(label), (label, text)
    assert (limits.MIN_INT, limits.MAX_INT) == (-(2**63), 2**63 - 1)
    assert limits.MAX_TIME == limits.MAX_SEQ == 2**32 - 1
    assert list(limits.UID_SIZES) == list(range(4, 11))
    assert limits.NAME_PATTERN.pattern == r"[a-z][a-z0-9_]*\Z"
    assert limits.STATION_PATTERN.pattern == r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z"
    assert KEY_ID_PATTERN.match("a" * 16) and not KEY_ID_PATTERN.match("a" * 17)
    assert KEY_ID_PATTERN.match("A-z_0.9") and not KEY_ID_PATTERN.match("a b")


def test_a_station_id_is_what_the_agent_accepts_as_its_station() -> None:
    """The slot size is exact only because every record's station obeys the `station` setting."""
    field = AgentConfigDoc.model_fields["station"]
    rules = {type(m).__name__: m for m in field.metadata}
    assert rules["MaxLen"].max_length == limits.MAX_STATION == limits.SIZING_STATION_CHARS
    assert rules["MinLen"].min_length == 1
    pattern = re.compile(next(m.pattern for m in field.metadata if hasattr(m, "pattern")))
    for candidate in ["st-20", "A.b_9", "9", "-st", "st 20", "st\u00e9", "a/b", "st-20\n"]:
        assert (limits.station_problem(candidate) is None) == bool(pattern.fullmatch(candidate)), (
            candidate
        )


def test_documented_full_progress_formula_is_the_encoders() -> None:
    assert "full(n) = 4 + 13 + 16 × n     for n ≤ 23" in DOC
    assert "full(n) = 4 + 14 + 16 × n     for n ≥ 24" in DOC
    for n in range(1, limits.MAX_STEPS + 1):
        formula = 4 + (13 if n <= 23 else 14) + 16 * n
        assert full_progress_size(n) == formula, n
    for n, size in [(3, 65), (23, 385), (24, 402), (32, 530)]:
        assert full_progress_size(n) == size and str(size) in DOC


def test_documented_slot_sizing_near_256_bytes() -> None:
    assert "for room from 528 to 535 the slots are 255 bytes" in DOC
    for room in range(528, 536):
        assert slot_size(room) == 255 and 2 * record_size(255, PROGRESS_TYPE) == 528
    assert slot_size(536) == 256 and 2 * record_size(256, PROGRESS_TYPE) == 536
    # The documented rule, checked for every room a tag can leave: largest s that fits.
    for room in range(0, 2000):
        s = slot_size(room)
        assert 2 * ((3 if s < 256 else 6) + 6 + s) <= room or s == 0
        t = s + 1
        assert 2 * ((3 if t < 256 else 6) + 6 + t) > room
        assert room - 2 * record_size(s, PROGRESS_TYPE) <= 7


def test_documented_record_header_sizes() -> None:
    assert (
        record_size(255, TRAVELER_TYPE) == 9 + 255 and record_size(256, TRAVELER_TYPE) == 12 + 256
    )


def test_documented_byte_budget_is_what_the_encoder_makes() -> None:
    block = re.search(r"<!-- budget:begin -->\n(.*?)<!-- budget:end -->", DOC, re.S)
    assert block, "docs/instruction-format.md lost its byte budget markers"
    rows = [r for r in block.group(1).splitlines() if r.startswith("| `")]
    assert len(rows) == len(list((ROOT / "config/recipes").glob("*.yaml")))
    keyring = KeyRing({"mes-1": KEY.public_key()})
    for row in rows:
        name = re.search(r"`([^`]+\.yaml)`", row)
        assert name, row
        recipe = load_recipe(ROOT / "config/recipes" / name.group(1))
        cells = []
        for capacity in (TAG_CAPACITY["ntag215"], TAG_CAPACITY["ntag216"]):
            message = encode_tag(recipe, UID, KEY, "mes-1", capacity, issued_at=1_795_000_000)
            contents = decode_tag(message, UID, keyring)
            cells.append(f"{len(message)}, 2 × {contents.slot_size}")
        traveler = record_size(len(contents.traveler_payload), TRAVELER_TYPE)
        steps = len(recipe.steps)
        minimum = traveler + 2 * record_size(full_progress_size(steps), PROGRESS_TYPE)
        expected = [f"`{name.group(1)}`", str(steps), str(traveler), str(minimum), *cells]
        assert [c.strip() for c in row.strip("|").split("|")] == expected


def test_documented_crc_is_zlibs() -> None:
    assert "0x04C11DB7" in DOC and "0xCBF43926" in DOC and "initial value 0xFFFFFFFF" in DOC
    assert zlib.crc32(b"123456789") == 0xCBF43926
    # A reflected CRC-32 written out from the documented parameters gives the same value.
    crc = 0xFFFFFFFF
    for byte in b"123456789":
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)  # 0xEDB88320: 0x04C11DB7 reflected
    assert crc ^ 0xFFFFFFFF == 0xCBF43926
    # The CRC covers the CBOR and the padding, and is stored big-endian in front of them.
    message = encode_tag(
        load_recipe(ROOT / "config/recipes/bracket-long.yaml"), UID, KEY, "mes-1", 492, issued_at=1
    )
    contents = decode_tag(message, UID, KeyRing({"mes-1": KEY.public_key()}))
    slot = contents.slot_payloads[0]
    assert slot[:4] == zlib.crc32(slot[4:]).to_bytes(4, "big") and slot[-1] == 0


_NOT_PRINTABLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"}


def test_documented_printable_is_the_codes() -> None:
    assert f"Unicode {unicodedata.unidata_version}" in DOC
    assert ", ".join(sorted(_NOT_PRINTABLE - {"Zl", "Zp", "Zs"})) == "Cc, Cf, Cn, Co, Cs"
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        documented = char == " " or unicodedata.category(char) not in _NOT_PRINTABLE
        assert char.isprintable() == documented, hex(code)
        if code % 97 == 0:  # and the decoder's rule is that method
            assert (limits.text_problem(char) is None) == documented, hex(code)
    assert limits.text_problem("St-20 Ä") is None
    for char in "\t\n\u00a0\u200b\u00ad":
        assert limits.text_problem(f"a{char}b") is not None, hex(ord(char))
    assert limits.text_problem("é" * limits.MAX_TEXT) is None, "lengths count code points"


@pytest.mark.parametrize("capacity", [8192, 9000, 2**20])
def test_no_capacity_makes_a_message_over_the_documented_bound(capacity: int) -> None:
    recipe = load_recipe(ROOT / "config/recipes/bracket-long.yaml")
    message = encode_tag(recipe, UID, KEY, "mes-1", capacity, issued_at=1)
    assert 8192 - 7 <= len(message) <= limits.MAX_MESSAGE == 8192
