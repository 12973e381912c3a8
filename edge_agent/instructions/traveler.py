"""The traveler record: the signed instructions the MES writes once (docs/instruction-format.md).

Decoding verifies the signature, bound to the tag UID, before it interprets the signed body.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import Reason
from ..messages import uid_hex
from .cbor import Malformed, decode_exact, dumps, loads, scan
from .limits import (
    FORMAT_VERSION,
    MAX_NAMES,
    MAX_PARAMS,
    MAX_STEPS,
    MAX_TEXT,
    MAX_TIME,
    SIGNATURE_SIZE,
    UID_SIZES,
    name_problem,
    reject,
    station_problem,
    text_problem,
    value_problem,
)
from .model import ParamValue, Step, Traveler
from .signing import KEY_ID_PATTERN, KeyRing

if TYPE_CHECKING:  # recipe.py imports the limits; only the type is needed here
    from .recipe import Recipe

SIGNING_CONTEXT = b"edge-agent traveler v1\0"

# Integer keys of the signed body map. Parameter names are stored once in K_NAMES (sorted) and
# steps refer to them by index: "spindle_speed" repeated in every step would not fit an NTAG215.
K_PART, K_PRODUCT, K_VARIANT, K_ORDER, K_LOT, K_ISSUED, K_UID, K_STEPS, K_NAMES = range(9)
_REQUIRED_KEYS = {K_PART, K_PRODUCT, K_VARIANT, K_ORDER, K_ISSUED, K_UID, K_STEPS, K_NAMES}
_ALL_KEYS = _REQUIRED_KEYS | {K_LOT}


def decode_traveler(payload: bytes, uid: bytes, keyring: KeyRing) -> Traveler:
    """The verified traveler in ``payload``, read from tag ``uid``; PartRejected otherwise."""
    try:
        version = _peek_version(payload)
    except Malformed as err:
        raise reject(Reason.MALFORMED_TRAVELER, uid, f"traveler record: {err}") from err
    if version != FORMAT_VERSION:
        raise reject(
            Reason.UNKNOWN_VERSION,
            uid,
            f"traveler format version {version} is not supported by this agent "
            f"(supports {FORMAT_VERSION})",
        )
    try:
        key_id, body, signature = _outer_fields(payload)
    except Malformed as err:
        raise reject(Reason.MALFORMED_TRAVELER, uid, f"traveler record: {err}") from err
    key = keyring.get(key_id)
    if key is None:
        known = ", ".join(sorted(keyring)) or "none"
        raise reject(
            Reason.UNKNOWN_KEY,
            uid,
            f"traveler is signed with key {key_id!r}, not trusted here (trusted: {known})",
        )
    signed = signed_bytes(key_id, uid, body)
    try:
        key.verify(signature, signed)
    except InvalidSignature:
        issued_for = _genuine_for_other_tag(key_id, body, signature, uid, keyring)
        if issued_for is not None:
            raise reject(
                Reason.UID_MISMATCH,
                uid,
                f"traveler was issued for tag {uid_hex(issued_for)} but was read from tag "
                f"{uid_hex(uid)} (copied tag contents?)",
            ) from None
        raise reject(
            Reason.BAD_SIGNATURE,
            uid,
            f"signature of key {key_id!r} does not match (tampered or forged)",
        ) from None
    # Only now is the body trusted enough to be interpreted.
    try:
        traveler = _parse_body(body, key_id, hashlib.sha256(signed).digest())
    except Malformed as err:
        raise reject(Reason.MALFORMED_TRAVELER, uid, f"traveler body: {err}") from err
    if traveler.tag_uid != uid:
        raise reject(
            Reason.UID_MISMATCH,
            uid,
            f"traveler was issued for tag {uid_hex(traveler.tag_uid)} but was read from tag {uid_hex(uid)}",
        )
    return traveler


def encode_traveler(
    recipe: Recipe, uid: bytes, key: Ed25519PrivateKey, key_id: str, issued: int
) -> tuple[bytes, bytes]:
    """The traveler payload for ``recipe`` on tag ``uid``, and its digest."""
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
    body = dumps(fields)
    signed = signed_bytes(key_id, uid, body)
    payload = dumps([FORMAT_VERSION, key_id, body, key.sign(signed)])
    return payload, hashlib.sha256(signed).digest()


def _peek_version(payload: bytes) -> int:
    """The version, read before anything else: every version starts ``[version, ...``."""
    if not payload or payload[0] >> 5 != 4:
        raise Malformed("payload is not a CBOR array")
    info = payload[0] & 0x1F
    if info > 27:
        raise Malformed("indefinite-length or reserved CBOR encoding is not allowed")
    header = 1 if info < 24 else 1 + (1 << (info - 24))
    first_end = scan(payload, header, 1)
    version = loads(payload[header:first_end])
    if type(version) is not int:
        raise Malformed("version is not an integer")
    return version


def _outer_fields(payload: bytes) -> tuple[str, bytes, bytes]:
    outer = decode_exact(payload, "traveler payload")
    if not isinstance(outer, list) or len(outer) != 4:
        raise Malformed("payload must be [version, key id, body, signature]")
    _, key_id, body, signature = outer
    if not isinstance(key_id, str) or not KEY_ID_PATTERN.match(key_id):
        raise Malformed("key id must be 1-16 characters of A-Z a-z 0-9 _ . -")
    if not isinstance(body, bytes):
        raise Malformed("body must be a byte string")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
        raise Malformed(f"signature must be a {SIGNATURE_SIZE}-byte string")
    return key_id, body, signature


def signed_bytes(key_id: str, uid: bytes, body: bytes) -> bytes:
    return SIGNING_CONTEXT + key_id.encode("ascii") + b"\0" + uid + body


def _genuine_for_other_tag(
    key_id: str, body: bytes, signature: bytes, uid: bytes, keyring: KeyRing
) -> bytes | None:
    """The UID a traveler was validly signed for, when that is not ``uid``; else None.

    Only called after verification failed. Claiming "issued for tag X" is safe only once the
    signature checks out for X, so the body's UID is looked up and then verified, not believed.
    """
    try:
        body_map = decode_exact(body, "traveler body")
        other = body_map.get(K_UID) if isinstance(body_map, dict) else None
    except Malformed:
        return None
    if not isinstance(other, bytes) or other == uid or len(other) not in UID_SIZES:
        return None
    try:
        keyring[key_id].verify(signature, signed_bytes(key_id, other, body))
    except InvalidSignature:
        return None
    return other


def text_field(value: object, what: str, max_len: int = MAX_TEXT) -> str:
    problem = text_problem(value, max_len)
    if problem:
        raise Malformed(f"{what} {problem}")
    assert isinstance(value, str)
    return value


def station_field(value: object, what: str) -> str:
    problem = station_problem(value)
    if problem:
        raise Malformed(f"{what} {cbor_text(value)} {problem}")
    assert isinstance(value, str)
    return value


def cbor_text(value: object) -> str:
    """``value`` as CBOR diagnostic notation writes it, for messages: true, null, 5.0, "st-20"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return '"' + value[:40].encode("unicode_escape").decode("ascii") + '"'
    if isinstance(value, bytes):
        return f"h'{value[:40].hex()}'"
    return repr(value)[:40]


def int_field(value: object, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise Malformed(f"{what} must be an integer in {low}..{high}")
    return value


def _parse_body(body: bytes, key_id: str, digest: bytes) -> Traveler:
    fields = decode_exact(body, "traveler body")
    if not isinstance(fields, dict):
        raise Malformed("must be a map")
    for key in fields:  # `true` or `5.0` would pass for 1 and 5 in a dict: a second encoding
        if type(key) is not int:
            raise Malformed(f"field key {cbor_text(key)} is not an unsigned integer")
    keys = set(fields)
    if not keys <= _ALL_KEYS:  # unknown keys may change meaning: a new field needs a new version
        raise Malformed(f"unknown field keys {sorted(map(repr, keys - _ALL_KEYS))}")
    if missing := _REQUIRED_KEYS - keys:
        raise Malformed(f"missing field keys {sorted(missing)}")
    tag_uid = fields[K_UID]
    if not isinstance(tag_uid, bytes) or len(tag_uid) not in UID_SIZES:
        raise Malformed("tag UID must be a 4-10 byte string")
    names = fields[K_NAMES]
    if not isinstance(names, list) or len(names) > MAX_NAMES:
        raise Malformed(f"parameter names must be a list of at most {MAX_NAMES}")
    for name in names:
        if problem := name_problem(name):
            raise Malformed(f"parameter name {problem}")
    if names != sorted(set(names)):
        raise Malformed("parameter names must be sorted and unique")
    raw_steps = fields[K_STEPS]
    if not isinstance(raw_steps, list) or not 1 <= len(raw_steps) <= MAX_STEPS:
        raise Malformed(f"steps must be a list of 1..{MAX_STEPS} steps")
    steps = tuple(_parse_step(raw, i, names) for i, raw in enumerate(raw_steps))
    if len({n for s in steps for n in s.parameters}) != len(names):
        raise Malformed("parameter names table lists names no step uses")
    lot = fields.get(K_LOT)
    if K_LOT in fields and lot is None:
        raise Malformed(f"material lot is null: key {K_LOT} is left out when there is no lot")
    return Traveler(
        part_id=text_field(fields[K_PART], "part id"),
        product=text_field(fields[K_PRODUCT], "product"),
        variant=text_field(fields[K_VARIANT], "variant"),
        order=text_field(fields[K_ORDER], "order"),
        material_lot=None if lot is None else text_field(lot, "material lot"),
        issued_at=int_field(fields[K_ISSUED], "issued_at", 0, MAX_TIME),
        tag_uid=tag_uid,
        steps=steps,
        key_id=key_id,
        digest=digest,
    )


def _parse_step(raw: object, index: int, names: list[str]) -> Step:
    where = f"step {index + 1}"
    if not isinstance(raw, list) or len(raw) != 3:
        raise Malformed(f"{where} must be [operation, parameters, station]")
    operation, params, station = raw
    if problem := name_problem(operation):
        raise Malformed(f"{where} operation {problem}")
    if not isinstance(params, dict) or len(params) > MAX_PARAMS:
        raise Malformed(f"{where} parameters must be a map of at most {MAX_PARAMS} entries")
    parameters: dict[str, ParamValue] = {}
    for name_index, value in params.items():
        if type(name_index) is not int or not 0 <= name_index < len(names):
            raise Malformed(
                f"{where} parameter key {cbor_text(name_index)} is not an index into the "
                f"{len(names)} parameter names"
            )
        name = names[name_index]
        if problem := value_problem(value):
            raise Malformed(f"{where} parameter {name}: {problem}")
        parameters[name] = value
    return Step(
        operation=operation,
        parameters=parameters,
        station=None if station is None else station_field(station, f"{where} station"),
    )
