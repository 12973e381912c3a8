"""The tag's invariants, checked when it is decoded, before any machine moves.

A tag that decodes must be one a station can record its step on (equal slots, each large enough for
a record on every step), within the format's 8 KiB whatever the layout, and the one encoding of its
traveler. Each case is built here as bytes, the way another implementation of the spec would.
"""

from __future__ import annotations

import hashlib
import random
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cbor2
import ndef
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.errors import PartRejected
from edge_agent.instructions.codec import (
    PROGRESS_TYPE,
    SIGNING_CONTEXT,
    TRAVELER_TYPE,
    decode_tag,
    full_progress_size,
    update_progress,
)
from edge_agent.instructions.model import Progress, StepRecord, StepStatus
from edge_agent.instructions.signing import KeyRing
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.tag.simulated import SimulatedTag
from tests.station_harness import DRILL, PRESS, Station, running_station

Plc = Any  # edge_agent.sim.reference_plc.ReferencePlc

UID = bytes.fromhex("04A1B2C3D4E5F6")
ISSUED = 1_795_000_000
KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"test key mes-1").digest())
KEYRING = KeyRing({"mes-1": KEY.public_key()})
WRITE_FUNCTIONS = (5, 6, 15, 16)  # Modbus write coil(s), write register(s)


# ---- spec-level builders -------------------------------------------------------------------------


def body(
    steps: Sequence[tuple[str, Mapping[str, Any], str | None]], uid: bytes = UID, **extra: Any
) -> dict[Any, Any]:
    names = sorted({n for _, params, _ in steps for n in params})
    fields: dict[Any, Any] = {
        0: "P-1",
        1: "bracket",
        2: "B",
        3: "O-1",
        5: ISSUED,
        6: uid,
        7: [[op, {names.index(n): v for n, v in p.items()}, st] for op, p, st in steps],
        8: names,
    }
    for key, value in extra.items():
        fields.pop(int(key[1:]), None)
        if value is not ...:
            fields[value[0]] = value[1]
    return fields


def traveler(
    raw_body: Any, uid: bytes = UID, key: Ed25519PrivateKey = KEY, key_id: str = "mes-1"
) -> tuple[bytes, bytes]:
    """(traveler payload, traveler ref) signed as the spec says; ``raw_body`` may be bytes."""
    raw = raw_body if isinstance(raw_body, bytes) else cbor2.dumps(raw_body, canonical=True)
    signed = SIGNING_CONTEXT + key_id.encode() + b"\0" + uid + raw
    payload = cbor2.dumps([1, key_id, raw, key.sign(signed)], canonical=True)
    return payload, hashlib.sha256(signed).digest()[:4]


def slot(ref: bytes, size: int, cbor: bytes | None = None) -> bytes:
    data = cbor2.dumps([1, 0, ref, []], canonical=True) if cbor is None else cbor
    data += bytes(size - 4 - len(data))
    return zlib.crc32(data).to_bytes(4, "big") + data


def message(payload: bytes, slot_a: bytes, slot_b: bytes) -> bytes:
    records = [
        ndef.Record(TRAVELER_TYPE, "", payload),
        ndef.Record(PROGRESS_TYPE, "", slot_a),
        ndef.Record(PROGRESS_TYPE, "", slot_b),
    ]
    return b"".join(ndef.message_encoder(records))


def tag(raw_body: Any, sizes: tuple[int, int] = (80, 80), **kw: Any) -> bytes:
    payload, ref = traveler(raw_body, **kw)
    return message(payload, slot(ref, sizes[0]), bytes(sizes[1]))


def rejected(data: bytes, uid: bytes = UID) -> PartRejected:
    with pytest.raises(PartRejected) as info:
        decode_tag(data, uid, KEYRING)
    assert f"tag {uid.hex().upper()}: " in str(info.value), "every rejection names the tag UID"
    return info.value


ONE_STEP = [("drill", {"depth": 12.5, "spindle_speed": 1200}, None)]
THREE_STEPS = ONE_STEP * 3


def test_the_builders_make_a_valid_tag() -> None:
    # Guards every case below: the unmodified tag is valid, so each rejection comes from its change.
    contents = decode_tag(tag(body(THREE_STEPS)), UID, KEYRING)
    assert len(contents.traveler.steps) == 3 and contents.slot_size == 80


# ---- slots a station can record on -----------------------------------------------------------------


def test_slots_too_small_for_a_record_on_every_step_are_rejected() -> None:
    needed = full_progress_size(3)
    assert needed == 65
    decode_tag(tag(body(THREE_STEPS), (needed, needed)), UID, KEYRING)
    err = rejected(tag(body(THREE_STEPS), (needed - 1, needed - 1)))
    assert err.reason == "malformed_ndef"
    assert "progress slots of 64 bytes cannot record the 3 steps of this traveler" in str(err)
    assert "needs 65" in str(err)


def test_slots_of_unequal_size_are_rejected() -> None:
    for sizes in [(80, 81), (81, 80), (80, 200)]:
        err = rejected(tag(body(THREE_STEPS), sizes))
        assert err.reason == "malformed_ndef"
        assert f"slot A holds {sizes[0]} bytes, slot B {sizes[1]}" in str(err)


def test_the_8_kib_bound_holds_for_messages_in_the_v1_layout() -> None:
    payload, ref = traveler(body(ONE_STEP))
    # Slots of 256 bytes or more are long records: 6 header bytes before the type instead of 3.
    room = 8192 - (len(message(payload, bytes(256), bytes(256))) - 512)
    fits = message(payload, slot(ref, room // 2), bytes(room // 2))
    assert len(fits) == 8192 - room % 2
    assert decode_tag(fits, UID, KEYRING).slot_size == room // 2
    over = message(payload, slot(ref, room // 2 + 1), bytes(room // 2 + 1))
    assert len(over) > 8192
    err = rejected(over)
    assert err.reason == "malformed_ndef" and f"{len(over)} bytes is too large" in str(err)
    huge = message(payload, slot(ref, 2**20), bytes(2**20))  # ndeflib's largest record, twice
    assert rejected(huge).reason == "malformed_ndef"


# ---- one traveler, one encoding ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        (body(ONE_STEP, _4=(4, None)), "material lot is null: key 4 is left out"),
        (body(ONE_STEP, _1=(True, "bracket")), "field key true is not an unsigned integer"),
        (body(ONE_STEP, _5=(5.0, ISSUED)), "field key 5.0 is not an unsigned integer"),
        (
            body(ONE_STEP, _7=(7, [["drill", {False: 12.5, True: 1200}, None]])),
            "step 1 parameter key false is not an index into the 2 parameter names",
        ),
        (
            body(ONE_STEP, _7=(7, [["drill", {0: 12.5, 1.0: 1200}, None]])),
            "step 1 parameter key 1.0 is not an index",
        ),
    ],
    ids=["lot-null", "key-true", "key-5.0", "param-key-bool", "param-key-float"],
)
def test_a_second_encoding_of_the_same_traveler_is_malformed(fields: Any, says: str) -> None:
    err = rejected(tag(fields))
    assert err.reason == "malformed_traveler" and says in str(err), str(err)


def _head(major: int, arg: int, size: int) -> bytes:
    """A CBOR head with ``arg`` in ``size`` extra bytes, shortest or not."""
    if size == 0:
        return bytes([major << 5 | arg])
    info = {1: 24, 2: 25, 4: 26, 8: 27}[size]
    return bytes([major << 5 | info]) + arg.to_bytes(size, "big")


def _canonical_body_with(key: int, value_bytes: bytes) -> bytes:
    """The canonical body for ONE_STEP with the value of ``key`` replaced by raw CBOR bytes."""
    fields = body(ONE_STEP)
    items = sorted(fields.items())
    out = _head(5, len(items), 0)
    for k, v in items:
        out += cbor2.dumps(k) + (value_bytes if k == key else cbor2.dumps(v, canonical=True))
    return out


@pytest.mark.parametrize(
    "raw",
    [
        _canonical_body_with(5, _head(0, ISSUED, 8)),  # issued_at in 8 bytes instead of 4
        _canonical_body_with(0, _head(3, 3, 1) + b"P-1"),  # text length in an extra byte
        _canonical_body_with(  # 12.5 as a double, where a half float says the same
            7,
            cbor2.dumps([["drill", {0: 0, 1: 1200}, None]]).replace(
                b"\xa2\x00\x00", b"\xa2\x00\xfb" + struct.pack(">d", 12.5), 1
            ),
        ),
        # keys out of order: 1 before 0
        cbor2.dumps(body(ONE_STEP), canonical=True).replace(
            b"\x00cP-1\x01gbracket", b"\x01gbracket\x00cP-1"
        ),
    ],
    ids=["long-int", "long-text-length", "double-for-half", "unsorted-keys"],
)
def test_non_canonical_cbor_in_the_body_is_malformed(raw: bytes) -> None:
    assert cbor2.loads(raw) == cbor2.loads(cbor2.dumps(body(ONE_STEP), canonical=True))
    err = rejected(tag(raw))
    assert err.reason == "malformed_traveler"
    assert "traveler body: the traveler body is not canonical CBOR" in str(err)


def test_non_canonical_progress_is_ignored_like_a_torn_slot() -> None:
    payload, ref = traveler(body(ONE_STEP))
    seq_in_4_bytes = _head(4, 4, 0) + b"\x01" + _head(0, 7, 4) + cbor2.dumps(ref) + b"\x80"
    contents = decode_tag(
        message(payload, slot(ref, 80), slot(ref, 80, seq_in_4_bytes)), UID, KEYRING
    )
    assert contents.progress.seq == 0
    assert contents.slot_notes[1] == "invalid: progress is not canonical CBOR"


# ---- what a station id is -----------------------------------------------------------------------


@pytest.mark.parametrize("station", ["st-123456", "st 20", "-st", "st\u00e9", ""])
def test_a_step_station_no_station_can_have_is_malformed(station: str) -> None:
    err = rejected(tag(body([("drill", {"depth": 1}, station)])))
    assert err.reason == "malformed_traveler" and "step 1 station" in str(err), str(err)


def test_a_record_with_a_station_id_no_station_can_have_is_ignored() -> None:
    payload, ref = traveler(body(ONE_STEP))
    bad = cbor2.dumps([1, 1, ref, [[0, "station-1", ISSUED]]], canonical=True)
    contents = decode_tag(message(payload, slot(ref, 80), slot(ref, 80, bad)), UID, KEYRING)
    assert contents.progress.seq == 0 and contents.slot_notes[1].startswith("invalid: station")


# ---- through a running station -------------------------------------------------------------------


@pytest.fixture
async def station(tmp_path: Path, reference_plc: Plc, broker: EmbeddedBroker) -> Any:
    async with running_station(tmp_path, reference_plc.port, broker.port) as s:
        yield s


async def test_a_tag_that_breaks_an_invariant_never_moves_the_machine(
    station: Station, reference_plc: Plc
) -> None:
    """On a tag a station could not record its step on, the machine used to run first."""
    uid = b"\x04\x11\x22\x33\x44\x55\x77"
    steps = [("drill", DRILL, "st-20"), ("press", PRESS, "st-30")]
    signed: dict[str, Any] = {"key": station.key, "key_id": "mes", "uid": uid}
    needed = full_progress_size(2)
    cases = {
        "slots-too-small": (tag(body(steps, uid), (needed - 1,) * 2, **signed), "malformed_ndef"),
        "slots-unequal": (tag(body(steps, uid), (80, 90), **signed), "malformed_ndef"),
        "over-8-kib": (tag(body(steps, uid), (4200, 4200), **signed), "malformed_ndef"),
        "lot-null": (tag(body(steps, uid, _4=(4, None)), **signed), "malformed_traveler"),
        "key-true": (tag(body(steps, uid, _1=(True, "b")), **signed), "malformed_traveler"),
    }
    good = tag(body(steps, uid), (needed, needed), **signed)
    writes_before = sum(reference_plc.requests[fc] for fc in WRITE_FUNCTIONS)
    for name, (data, reason) in cases.items():
        part = SimulatedTag(uid, data, capacity=len(data))
        report = await station.cycle(part)
        assert (report.status, report.reason) == ("rejected", reason), (name, report.error)
        assert f"tag {uid.hex().upper()}: " in (report.error or ""), name
        assert report.machine_state == "untouched", name
        assert part.message == data and part.writes == 0, name
    assert sum(reference_plc.requests[fc] for fc in WRITE_FUNCTIONS) == writes_before

    # The same traveler with slots just large enough runs and records its step.
    part = SimulatedTag(uid, good)
    report = await station.cycle(part)
    assert report.status == "ok" and report.tag_write == "ok", report.error
    assert decode_tag(part.message, uid, station.keyring).progress.done(0)


# ---- seeded fuzzing of the invariants --------------------------------------------------------------

STATIONS = ["st-20", "x" * 8, None]
BAD_STATIONS = ["x" * 9, "", "a b", "-st", "st\u00e9"]
NEW_CHECKS = (
    "cannot record the",
    "must be of equal size",
    "material lot is null",
    "is not an unsigned integer",
    "station",
)


def _station(rng: random.Random) -> str | None:
    return rng.choice(STATIONS if rng.random() < 0.95 else BAD_STATIONS)


def _random_steps(rng: random.Random) -> list[tuple[str, dict[str, Any], str | None]]:
    params: list[dict[str, Any]] = [{}, {"depth": 12.5}, {"depth": 1, "tool": True, "label": "ab"}]
    return [
        (rng.choice(["drill", "mill"]), rng.choice(params), _station(rng))
        for _ in range(rng.randrange(1, 5))
    ]


def _random_body(rng: random.Random, steps: list[Any]) -> dict[Any, Any]:
    fields = body(steps)
    roll = rng.random()
    if roll < 0.1:
        fields[4] = rng.choice([None, "LOT-1", "", 7])
    elif roll < 0.2:  # a key spelled another way
        key = rng.choice([0, 1, 2, 3, 5])
        other: Any = rng.choice([bool(key) if key < 2 else float(key), float(key), str(key)])
        fields[other] = fields.pop(key)
    return fields


def _random_slot(rng: random.Random, ref: bytes, steps: int, size: int) -> bytes:
    roll = rng.random()
    if roll < 0.1 or size < 5:
        return bytes(max(size, 0))
    if roll < 0.15:
        return rng.randbytes(size)
    records = [
        None if rng.random() < 0.2 else [rng.choice([0, 1, 1, 2]), _station(rng), 2**32 - 1]
        for _ in range(rng.randrange(steps + 1 + (rng.random() < 0.05)))
    ]
    slot_ref = ref if rng.random() < 0.95 else b"abcd"
    data = cbor2.dumps([1, rng.randrange(3), slot_ref, records], canonical=True)
    if rng.random() < 0.05:  # the same value, seq spelled in 4 bytes: not canonical
        data = data[:2] + b"\x1a" + data[2:3].rjust(4, b"\0") + data[3:]
    if len(data) + 4 > size:
        return rng.randbytes(size)
    return slot(ref, size, data)


def _check_recordable(contents: Any) -> None:
    """What the invariants promise: any station can record any step, the message length fixed."""
    steps = len(contents.traveler.steps)
    assert len(contents.message) <= 8192
    assert len(contents.slot_payloads[0]) == len(contents.slot_payloads[1])
    worst = StepRecord(StepStatus.FAILED, "x" * 8, 2**32 - 1)
    for i in range(steps):
        progress = contents.progress.with_record(i, worst, steps)
        assert len(update_progress(contents, progress)) == len(contents.message)
    everything = Progress(records=(worst,) * steps)
    assert len(update_progress(contents, everything)) == len(contents.message)


def test_random_tags_are_either_rejected_or_recordable() -> None:
    rng = random.Random(20261201)
    accepted = 0
    refusals: set[str] = set()
    for _ in range(1200):
        steps = _random_steps(rng)
        payload, ref = traveler(_random_body(rng, steps))
        full = full_progress_size(len(steps))
        size_a = rng.choice([full - 1, full, full, full + 1, full + 40, rng.randrange(0, 300)])
        size_b = size_a if rng.random() < 0.9 else rng.randrange(0, 300)
        data = message(
            payload,
            _random_slot(rng, ref, len(steps), size_a),
            _random_slot(rng, ref, len(steps), size_b),
        )
        mutation = rng.random()
        if mutation < 0.1:
            data = data[: rng.randrange(len(data))]
        elif mutation < 0.2:
            flipped = bytearray(data)
            flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            data = bytes(flipped)
        try:
            contents = decode_tag(data, UID, KEYRING)
        except PartRejected as err:
            assert str(err).startswith(f"tag {UID.hex().upper()}: ")
            refusals.update(w for w in NEW_CHECKS if w in str(err))
            continue
        accepted += 1
        _check_recordable(contents)
    assert accepted > 300, "the generator must also make valid tags, or it tests nothing"
    assert refusals == set(NEW_CHECKS), "every invariant was broken at least once"
