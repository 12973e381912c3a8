"""Instruction format v1: round trip, every rejection reason, progress slots, byte budget, fuzzing.

Forged and damaged messages are built here straight from the spec (cbor2 + ndeflib), not through the
codec's private helpers, so the tests check the format as documented.
"""

from __future__ import annotations

import hashlib
import random
import re
import zlib
from typing import Any

import cbor2
import ndef
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.errors import PartRejected
from edge_agent.instructions.codec import (
    PROGRESS_TYPE,
    SIGNING_CONTEXT,
    TAG_CAPACITY,
    TRAVELER_TYPE,
    TagContents,
    decode_tag,
    encode_tag,
    full_progress_size,
    update_progress,
)
from edge_agent.instructions.model import Progress, Step, StepRecord, StepStatus
from edge_agent.instructions.recipe import Recipe, load_recipe
from edge_agent.instructions.signing import KeyRing
from tests import REPO_ROOT

ROOT = REPO_ROOT
UID = bytes.fromhex("04A1B2C3D4E5F6")
OTHER_UID = bytes.fromhex("04B2C3D4E5F6A7")
ISSUED = 1_795_000_000
KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"test key mes-1").digest())
KEYRING = KeyRing({"mes-1": KEY.public_key()})


def recipe_3x5() -> Recipe:
    return load_recipe(ROOT / "config/recipes/bracket-long.yaml")


def small_recipe(steps: int = 1, params: int = 3) -> Recipe:
    names = ["spindle_speed", "feed_rate", "depth", "tool", "dwell"][:params]
    values = [1500, 300.5, 8, 3, 200][:params]
    return Recipe.from_steps(
        part_id="P-1",
        product="bracket",
        variant="B",
        order="O-1",
        steps=[Step("drill", dict(zip(names, values, strict=True)))] * steps,
    )


def encode(recipe: Recipe | None = None, uid: bytes = UID, capacity: int = 492) -> bytes:
    return encode_tag(recipe or recipe_3x5(), uid, KEY, "mes-1", capacity, issued_at=ISSUED)


def rejected(message: bytes, uid: bytes = UID, keyring: KeyRing = KEYRING) -> PartRejected:
    with pytest.raises(PartRejected) as info:
        decode_tag(message, uid, keyring)
    assert uid.hex().upper() in str(info.value), "every rejection names the tag UID"
    return info.value


# ---- spec-level builders -------------------------------------------------------------------


def records_of(message: bytes) -> list[bytes]:
    return [bytes(r.data) for r in ndef.message_decoder(message, known_types={})]


def build(traveler: bytes, slot_a: bytes, slot_b: bytes) -> bytes:
    recs = [
        ndef.Record(TRAVELER_TYPE, "", traveler),
        ndef.Record(PROGRESS_TYPE, "", slot_a),
        ndef.Record(PROGRESS_TYPE, "", slot_b),
    ]
    return b"".join(ndef.message_encoder(recs))


def signed_payload(
    body: Any,
    *,
    uid: bytes = UID,
    key_id: str = "mes-1",
    key: Ed25519PrivateKey = KEY,
    version: int = 1,
) -> tuple[bytes, bytes]:
    """(traveler payload, digest) for an arbitrary body, signed as the spec says."""
    raw = body if isinstance(body, bytes) else cbor2.dumps(body, canonical=True)
    signed = SIGNING_CONTEXT + key_id.encode() + b"\0" + uid + raw
    payload = cbor2.dumps([version, key_id, raw, key.sign(signed)], canonical=True)
    return payload, hashlib.sha256(signed).digest()


def slot(seq: int, ref: bytes, records: list[Any], size: int = 80) -> bytes:
    data = cbor2.dumps([1, seq, ref, records], canonical=True)
    data += bytes(max(0, size - 4 - len(data)))
    return zlib.crc32(data).to_bytes(4, "big") + data


def body_map(**changes: Any) -> dict[int, Any]:
    body: dict[int, Any] = {
        0: "P-1",
        1: "bracket",
        2: "B",
        3: "O-1",
        5: ISSUED,
        6: UID,
        7: [["drill", {0: 12.5, 1: 1200}, None]],
        8: ["depth", "spindle_speed"],
    }
    for key, value in changes.items():
        index = int(key[1:])
        if value is ...:
            del body[index]
        else:
            body[index] = value
    return body


def forged(body: Any, **kwargs: Any) -> bytes:
    payload, digest = signed_payload(body, **kwargs)
    return build(payload, slot(0, digest[:4], []), bytes(80))


# ---- round trip --------------------------------------------------------------------------------


def test_round_trip_keeps_every_field_and_value_type() -> None:
    recipe = recipe_3x5()
    contents = decode_tag(encode(recipe), UID, KEYRING)
    t = contents.traveler
    assert (t.part_id, t.product, t.variant, t.order, t.material_lot) == (
        "P-000123",
        "bracket",
        "B-long",
        "ORD-4711",
        "LOT-77",
    )
    assert t.issued_at == ISSUED and t.tag_uid == UID and t.key_id == "mes-1"
    assert t.steps == recipe.to_steps()
    drill = t.steps[0].parameters
    assert type(drill["tool"]) is int and type(drill["feed_rate"]) is float
    assert [s.station for s in t.steps] == ["st-20", "st-30", "st-20"]
    assert contents.progress == Progress(seq=0, records=(None, None, None))
    assert contents.slot_notes == ("current", "blank")


def test_digest_is_sha256_of_the_signed_bytes() -> None:
    message = encode()
    payload = cbor2.loads(records_of(message)[0])
    signed = SIGNING_CONTEXT + b"mes-1\0" + UID + payload[2]
    assert decode_tag(message, UID, KEYRING).traveler.digest == hashlib.sha256(signed).digest()


def test_encoding_is_deterministic_and_canonical() -> None:
    assert encode() == encode()
    payload = records_of(encode())[0]
    outer = cbor2.loads(payload)
    assert cbor2.dumps(cbor2.loads(outer[2]), canonical=True) == outer[2]


def test_step_without_station_and_bool_and_text_values() -> None:
    recipe = Recipe.from_steps(
        part_id="P-2",
        product="p",
        variant="v",
        order="o",
        steps=[Step("press", {"force": 8.75, "temperature": 25, "dwell": 800})],
    )
    steps = decode_tag(encode(recipe), UID, KEYRING).traveler.steps
    assert steps[0].station is None and steps[0].parameters == {
        "force": 8.75,
        "temperature": 25,
        "dwell": 800,
    }
    flags = Recipe.from_steps(
        part_id="P-3",
        product="p",
        variant="v",
        order="o",
        steps=[Step("mill", {"coolant": True, "program": "O1234"})],
    )
    params = decode_tag(encode(flags), UID, KEYRING).traveler.steps[0].parameters
    assert params == {"coolant": True, "program": "O1234"} and params["coolant"] is True


# ---- rejections --------------------------------------------------------------------------------


def test_copied_to_another_tag_is_a_uid_mismatch_naming_both_tags() -> None:
    err = rejected(encode(uid=UID), uid=OTHER_UID)
    assert err.reason == "uid_mismatch"
    assert str(err).endswith(
        "traveler was issued for tag 04A1B2C3D4E5F6 but was read from tag 04B2C3D4E5F6A7 "
        "(copied tag contents?)"
    )


def test_body_uid_that_differs_from_the_signed_uid_is_rejected() -> None:
    # Signed for the tag it is on, but the body claims another tag: a signer bug, still refused.
    assert rejected(forged(body_map(k6=OTHER_UID))).reason == "uid_mismatch"


def test_tampered_parameter_is_a_bad_signature() -> None:
    message = bytearray(encode())
    at = message.index(cbor2.dumps(350.5, canonical=True))  # drill feed_rate
    message[at : at + 3] = cbor2.dumps(999.5, canonical=True)
    err = rejected(bytes(message))
    assert err.reason == "bad_signature" and "'mes-1'" in str(err)


def test_forged_with_an_untrusted_key_under_a_trusted_key_id() -> None:
    intruder = Ed25519PrivateKey.generate()
    assert rejected(forged(body_map(), key=intruder)).reason == "bad_signature"


def test_unknown_key_is_named() -> None:
    err = rejected(encode(), keyring=KeyRing({"mes-2": KEY.public_key()}))
    assert err.reason == "unknown_key"
    assert "'mes-1'" in str(err) and "mes-2" in str(err)


def test_unknown_version_is_rejected_before_anything_else() -> None:
    # Version 7 with a payload v1 could not even parse: the version alone decides.
    payload = cbor2.dumps([7, {"whatever": "v7 looks like"}])
    err = rejected(build(payload, bytes(40), bytes(40)))
    assert err.reason == "unknown_version"
    assert str(err) == (
        "tag 04A1B2C3D4E5F6: traveler format version 7 is not supported by this agent (supports 1)"
    )


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"", "no_traveler"),
        (b"\x00\x01\x02", "malformed_ndef"),
        (b"".join(ndef.message_encoder([ndef.UriRecord("https://example.com")])), "no_traveler"),
        (b"".join(ndef.message_encoder([ndef.TextRecord("hello")])), "no_traveler"),
    ],
)
def test_not_a_traveler(message: bytes, reason: str) -> None:
    assert rejected(message).reason == reason


def test_truncated_message_is_malformed_ndef() -> None:
    message = encode()
    assert rejected(message[:-1]).reason == "malformed_ndef"
    assert rejected(message + b"\x00").reason == "malformed_ndef"


def test_wrong_record_layout_is_malformed_ndef() -> None:
    trv, a, b = records_of(encode())
    two = b"".join(
        ndef.message_encoder(
            [ndef.Record(TRAVELER_TYPE, "", trv), ndef.Record(PROGRESS_TYPE, "", a)]
        )
    )
    assert rejected(two).reason == "malformed_ndef"
    with_id = b"".join(
        ndef.message_encoder(
            [
                ndef.Record(TRAVELER_TYPE, "x", trv),
                ndef.Record(PROGRESS_TYPE, "", a),
                ndef.Record(PROGRESS_TYPE, "", b),
            ]
        )
    )
    assert rejected(with_id).reason == "malformed_ndef"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x84\x01",  # truncated array
        cbor2.dumps({"v": 1}),  # not an array
        cbor2.dumps(["1", "mes-1", b"", bytes(64)]),  # version not an int
        cbor2.dumps([1, "mes-1", b"body", bytes(63)]),  # short signature
        cbor2.dumps([1, "mes 1!", b"body", bytes(64)]),  # bad key id
        cbor2.dumps([1, "mes-1", "body", bytes(64)]),  # body as text
        cbor2.dumps([1, "mes-1", b"body", bytes(64), 5]),  # extra element
        cbor2.dumps([1, "mes-1", b"body", bytes(64)]) + b"\x00",  # trailing byte
        bytes.fromhex("9f01656d65732d3140584000ff"),  # indefinite-length array
        bytes.fromhex("84c1016561626364"),  # a CBOR tag where the version should be
    ],
)
def test_malformed_outer_payload(payload: bytes) -> None:
    assert rejected(build(payload, bytes(40), bytes(40))).reason == "malformed_traveler"


@pytest.mark.parametrize(
    "body",
    [
        body_map(k0=...),  # missing part id
        body_map(k9="new field"),  # unknown key: would need a new version
        body_map(k0=""),
        body_map(k0="x" * 65),
        body_map(k0="P-1\x1b[2J"),  # control characters
        body_map(k0=12345),
        body_map(k5=-1),
        body_map(k6=b"\x04"),  # UID too short
        body_map(k7=[]),
        body_map(k7=[["drill", {}, None]] * 33),
        body_map(k7=[["Drill", {0: 1, 1: 2}, None]]),
        body_map(k7=[["drill", {0: 1, 2: 2}, None]]),  # index outside the names table
        body_map(k7=[["drill", {0: [1], 1: 2}, None]]),
        body_map(k7=[["drill", {0: None, 1: 2}, None]]),
        body_map(k7=[["drill", {0: 2**64, 1: 2}, None]]),
        body_map(k7=[["drill", {0: float("nan"), 1: 2}, None]]),
        body_map(k7=[["drill", {0: float("inf"), 1: 2}, None]]),
        body_map(k7=[["drill", {0: 1, 1: 2}]]),
        body_map(k7=[["drill", {0: 1, 1: 2}, 7]]),
        body_map(k8=["spindle_speed", "depth"]),  # names not sorted
        body_map(k8=["depth", "spindle_speed", "unused"]),
        cbor2.dumps([1, 2, 3]),
        cbor2.dumps(body_map()) + b"\x00",
        # A CBOR tag (epoch datetime) and a non-canonical (unsorted) map, both validly signed:
        bytes.fromhex("a100c11a6a000000"),
        bytes.fromhex("a20101006150"),
    ],
)
def test_malformed_body_is_rejected_even_when_validly_signed(body: Any) -> None:
    assert rejected(forged(body)).reason == "malformed_traveler"


def test_well_formed_forged_body_is_accepted_by_the_spec_builder() -> None:
    # Guards the table above: the unmodified body is valid, so each failure comes from its change.
    contents = decode_tag(forged(body_map()), UID, KEYRING)
    assert contents.traveler.steps == (Step("drill", {"depth": 12.5, "spindle_speed": 1200}),)


# ---- progress ------------------------------------------------------------------------------------


def record(station: str = "st-20", status: StepStatus = StepStatus.OK) -> StepRecord:
    return StepRecord(status, station, ISSUED + 60)


def test_update_changes_only_the_other_slot_and_alternates() -> None:
    first = decode_tag(encode(), UID, KEYRING)
    message = update_progress(first, first.progress.with_record(0, record(), 3))
    assert len(message) == len(first.message)
    a_trv, a_a, a_b = records_of(first.message)
    b_trv, b_a, b_b = records_of(message)
    assert (b_trv, b_a) == (a_trv, a_a) and b_b != a_b
    second = decode_tag(message, UID, KEYRING)
    assert second.current_slot == 1 and second.progress.seq == 1
    assert second.progress.records[0] == record() and second.progress.next_undone(3) == 1

    third = decode_tag(
        update_progress(second, second.progress.with_record(1, record("st-30"), 3)), UID, KEYRING
    )
    assert third.current_slot == 0 and third.progress.seq == 2
    assert records_of(third.message)[2] == b_b, "slot B keeps the previous progress"
    assert third.progress.records[:2] == (record(), record("st-30"))


def test_torn_write_falls_back_to_the_previous_slot() -> None:
    first = decode_tag(encode(), UID, KEYRING)
    second = decode_tag(
        update_progress(first, first.progress.with_record(0, record(), 3)), UID, KEYRING
    )
    new = update_progress(second, second.progress.with_record(1, record("st-30"), 3))
    # The write reached only some bytes of slot A: simulate every tear point.
    diff = [i for i in range(len(new)) if new[i] != second.message[i]]
    assert diff, "the update changes slot A"
    for cut in range(1, len(diff)):
        torn = bytearray(new)
        for i in diff[cut:]:
            torn[i] = second.message[i]
        contents = decode_tag(bytes(torn), UID, KEYRING)
        assert contents.progress == second.progress, f"tear after {cut} of {len(diff)} bytes"
        assert contents.slot_notes[0].startswith("checksum mismatch")


def test_highest_valid_seq_wins_and_foreign_slots_are_ignored() -> None:
    payload, digest = signed_payload(body_map())
    ref = digest[:4]
    done = [[0, "st-20", ISSUED + 1]]
    assert decode_tag(
        build(payload, slot(4, ref, []), slot(5, ref, done)), UID, KEYRING
    ).progress == (Progress(5, (StepRecord(StepStatus.OK, "st-20", ISSUED + 1),)))
    assert decode_tag(
        build(payload, slot(6, ref, []), slot(5, ref, done)), UID, KEYRING
    ).progress == (Progress(6, (None,)))
    # Slot B is from another traveler (copied progress): ignored although its seq is higher.
    contents = decode_tag(build(payload, slot(1, ref, []), slot(9, b"abcd", done)), UID, KEYRING)
    assert contents.progress.seq == 1 and contents.slot_notes[1] == "belongs to another traveler"
    # Valid CRC but a record for a step that does not exist, or a bad status: ignored too.
    for bad in ([None, [0, "st", 1]], [[2, "st-20", 1]], [[0, "", 1]], [[0, "st", -1]]):
        contents = decode_tag(build(payload, slot(1, ref, []), slot(2, ref, bad)), UID, KEYRING)
        assert contents.progress.seq == 1 and contents.slot_notes[1].startswith("invalid")


def test_no_valid_slot_is_progress_corrupt() -> None:
    payload, digest = signed_payload(body_map())
    for a, b in [
        (bytes(80), bytes(80)),
        (slot(0, b"abcd", []), bytes(80)),
        (slot(0, digest[:4], [])[:-1] + b"\x01", bytes(80)),
    ]:
        assert rejected(build(payload, a, b)).reason == "progress_corrupt"


def test_every_progress_a_station_can_write_fits_the_smallest_slot_allowed() -> None:
    contents = decode_tag(encode(capacity=447), UID, KEYRING)  # slots just big enough
    assert contents.slot_size == full_progress_size(3)
    worst = StepRecord(StepStatus.FAILED, "st-8char", 2**32 - 1)  # longest station id, latest time
    message = update_progress(contents, Progress(records=(worst,) * 3))
    assert len(message) == len(contents.message)
    assert decode_tag(message, UID, KEYRING).progress.records == (worst,) * 3
    # A station id no station can have is refused before it costs a byte.
    for station in ("station-1", "s" * 40, "st 20", "-st"):
        with pytest.raises(ValueError, match="record for step 1: station"):
            update_progress(contents, Progress(records=(record(station),)))
    with pytest.raises(ValueError, match="records for 3 steps"):
        update_progress(contents, Progress(records=(None,) * 4))


# ---- byte budget ---------------------------------------------------------------------------------


def test_3_steps_by_5_parameters_fit_an_ntag215_with_room_to_spare() -> None:
    recipe = recipe_3x5()
    assert [len(s.parameters) for s in recipe.steps] == [5, 5, 5]
    message = encode(recipe, capacity=TAG_CAPACITY["ntag215"])
    contents = decode_tag(message, UID, KEYRING)
    assert len(message) <= 492
    traveler_record = 12 + len(contents.traveler_payload)
    assert traveler_record == 299
    assert contents.slot_size >= full_progress_size(3) == 65
    # What is really needed: traveler + two slots just big enough for a full progress.
    assert traveler_record + 2 * (9 + 65) == 447


def test_nothing_fits_an_ntag213() -> None:
    # The smallest traveler v1 allows: one step, no parameters, one-character fields, 4-byte UID.
    tiny = Recipe.from_steps(
        part_id="P", product="p", variant="v", order="o", steps=[Step("a", {})]
    )
    with pytest.raises(ValueError, match=r"tag holds 142: 57 bytes over"):
        encode_tag(tiny, UID[:4], KEY, "k", TAG_CAPACITY["ntag213"], issued_at=ISSUED)
    assert len(encode_tag(tiny, UID[:4], KEY, "k", 199, issued_at=ISSUED)) == 199


def test_too_big_for_the_tag_says_how_many_bytes_over() -> None:
    with pytest.raises(
        ValueError, match=r"traveler record is 299 bytes, the tag holds 142: 157 bytes over"
    ):
        encode(capacity=TAG_CAPACITY["ntag213"])
    with pytest.raises(ValueError, match=r"need 447 bytes, the tag holds 446: 1 bytes over"):
        encode(capacity=446)
    assert len(encode(capacity=447)) == 447


def test_slots_share_what_the_traveler_leaves() -> None:
    message = encode(capacity=TAG_CAPACITY["ntag216"])
    contents = decode_tag(message, UID, KEYRING)
    assert 866 <= len(message) <= 868 and contents.slot_size == len(contents.slot_payloads[1])


# ---- docs ---------------------------------------------------------------------------------------


def test_hex_dump_in_the_docs_is_what_the_code_produces() -> None:
    doc = (ROOT / "docs/instruction-format.md").read_text()
    block = re.search(r"<!-- hexdump:begin -->\n```\n(.*?)```\n<!-- hexdump:end -->", doc, re.S)
    assert block, "docs/instruction-format.md lost its hex dump markers"
    dumped = bytes.fromhex("".join(line[10:57] for line in block.group(1).splitlines()))
    key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"edge-agent docs example").digest())
    expected = encode_tag(recipe_3x5(), UID, key, "example", 492, issued_at=ISSUED)
    assert dumped == expected


# ---- fuzzing ------------------------------------------------------------------------------------


def decode_or_reject(message: bytes) -> TagContents | None:
    try:
        return decode_tag(message, UID, KEYRING)
    except PartRejected:
        return None  # anything else propagates and fails the test


def test_every_bit_flip_in_the_traveler_is_rejected_and_nothing_else_escapes() -> None:
    message = encode()
    traveler_end = 12 + len(records_of(message)[0])
    for i in range(len(message)):
        for bit in range(8):
            flipped = bytearray(message)
            flipped[i] ^= 1 << bit
            result = decode_or_reject(bytes(flipped))
            if i < traveler_end:
                assert result is None, f"flip of bit {bit} in byte {i} was accepted"


def test_truncations_and_random_garbage_only_raise_part_rejected() -> None:
    rng = random.Random(1234)
    message = encode()
    for end in range(len(message)):
        assert decode_or_reject(message[:end]) is None
    for _ in range(3000):
        kind = rng.randrange(4)
        if kind == 0:
            data = rng.randbytes(rng.randrange(600))
        elif kind == 1:  # valid NDEF framing around random payloads
            data = build(rng.randbytes(rng.randrange(300)), rng.randbytes(60), rng.randbytes(60))
        elif kind == 2:  # splice random bytes into a valid message
            at = rng.randrange(len(message))
            data = message[:at] + rng.randbytes(rng.randrange(1, 8)) + message[at + 1 :]
        else:  # random CBOR in the outer array position
            data = build(cbor2.dumps(random_cbor(rng, 3)), bytes(40), bytes(40))
        decode_or_reject(data)


def random_cbor(rng: random.Random, depth: int) -> Any:
    kinds = ["int", "float", "text", "bytes", "none", "bool"] + (
        ["list", "map"] * 2 if depth else []
    )
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, 1, -1, 7, 2**32, -(2**70), rng.randrange(-1000, 1000)])
    if kind == "float":
        return rng.choice([0.5, float("nan"), float("inf"), 1e300, -2.25])
    if kind == "text":
        return rng.choice(["", "drill", "x" * 100, "\x00", "mes-1", "é"])
    if kind == "bytes":
        return rng.randbytes(rng.choice([0, 4, 7, 64]))
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "list":
        return [random_cbor(rng, depth - 1) for _ in range(rng.randrange(5))]
    return {rng.choice([0, 1, 5, 6, 7, 8, 9, "k"]): random_cbor(rng, depth - 1) for _ in range(4)}


def test_random_validly_signed_bodies_and_progress_only_raise_part_rejected() -> None:
    # A bit flip never gets past the signature; these do, and exercise the body and slot parsers.
    rng = random.Random(99)
    for _ in range(1500):
        body = body_map()
        for _ in range(rng.randrange(1, 3)):
            path = rng.choice(["top", "step", "param", "names"])
            if path == "top":
                body[rng.randrange(10)] = random_cbor(rng, 2)
            elif path == "step":
                body[7] = [random_cbor(rng, 2) for _ in range(rng.randrange(3))]
            elif path == "param":
                body[7] = [["drill", {rng.randrange(-1, 3): random_cbor(rng, 1)}, None]]
            else:
                body[8] = random_cbor(rng, 2)
        payload, digest = signed_payload(body)
        records = [random_cbor(rng, 2) for _ in range(rng.randrange(3))]
        slot_b = slot(rng.randrange(3), rng.choice([digest[:4], b"abcd"]), records, size=200)
        decode_or_reject(build(payload, slot(0, digest[:4], [], size=200), slot_b))
