"""``edge-agent tag ...``: make signing keys, encode a recipe into tag bytes, decode and verify tag bytes.

Exit codes: 0 success (decode: the tag is valid), 1 decode rejected the tag, 2 usage or config problem,
3 no reader, no tag, or the tag could not be read or written.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .cli_common import UsageError, add_keygen, handled
from .errors import PartRejected
from .instructions.codec import (
    DEFAULT_TAG,
    TAG_CAPACITY,
    TagContents,
    decode_tag,
    encode_tag,
    uid_hex,
    update_progress,
)
from .instructions.model import Progress
from .instructions.recipe import load_recipe
from .instructions.signing import (
    KeyRing,
    check_key_id,
    load_private_key,
    load_public_key,
)

if TYPE_CHECKING:  # nfcpy is imported only by the commands that use a reader
    from .tag.nfc import TagSession


_run = handled("tag")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    tag = subparsers.add_parser(
        "tag",
        help="make keys, encode and decode part tags",
        description="Make signing keys, encode a recipe into tag bytes and decode them, and write, "
        "read, reset or erase a tag in an NFC reader (nfcpy) or in a tag image file.",
        epilog="Exit codes: 0 done (decode, read: the tag is valid), 1 the tag is rejected "
        "(REJECTED <reason>), 2 usage, key or recipe problem, 3 no reader, no tag, or the tag "
        "could not be read or written.",
    )
    commands = tag.add_subparsers(dest="tag_command", metavar="COMMAND", required=True)

    add_keygen(
        commands,
        _run,
        help="generate an Ed25519 signing key pair",
        description="Write ID.key (private, mode 0600: keep it on the MES) and ID.pub (give it to "
        "stations: trusted_keys in their config). Never overwrites a key.",
        keep="keep it on the MES, mode 0600",
        give="give it to stations: --trust {id}={pub}",
    )

    encode = commands.add_parser(
        "encode",
        help="sign a recipe and encode it for one tag",
        description="Sign a recipe with a private key and encode it as the NDEF message for the "
        "tag with this UID (the signature covers the UID: the message is valid on that tag only).",
    )
    encode.add_argument("--recipe", required=True, type=Path, help="recipe YAML file")
    encode.add_argument(
        "--key", required=True, type=Path, help="private key (PEM), e.g. DIR/ID.key"
    )
    encode.add_argument("--key-id", help="key id written on the tag (default: key file stem)")
    encode.add_argument("--uid", required=True, help="tag UID in hex, e.g. 04A1B2C3D4E5F6")
    size = encode.add_mutually_exclusive_group()
    size.add_argument(
        "--tag", choices=sorted(TAG_CAPACITY), help=f"tag type (default {DEFAULT_TAG})"
    )
    size.add_argument("--capacity", type=int, help="usable NDEF bytes of the tag")
    encode.add_argument("--issued-at", type=int, help="unix seconds (default: now)")
    encode.add_argument(
        "--out", required=True, help="file for the raw NDEF message; '-' prints hex to stdout"
    )
    encode.set_defaults(func=_run(_encode))

    decode = commands.add_parser(
        "decode",
        help="decode and verify a tag's NDEF message",
        description="Decode an NDEF message read from a tag, verify its signature with the trusted "
        "keys and print the traveler and its progress.",
    )
    decode.add_argument("file", type=Path, help="NDEF message: binary, or hex text")
    decode.add_argument("--uid", required=True, help="UID of the tag the message was read from")
    decode.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="ID=PUB.pem",
        help="trusted public key (repeatable)",
    )
    decode.set_defaults(func=_run(_decode))
    _register_device_commands(commands)


def _parse_uid(text: str) -> bytes:
    cleaned = re.sub(r"[\s:]", "", text)
    try:
        uid = bytes.fromhex(cleaned)
    except ValueError:
        raise UsageError(f"--uid {text!r} is not hex") from None
    if not 4 <= len(uid) <= 10:
        raise UsageError(f"--uid {text!r}: a tag UID is 4 to 10 bytes, got {len(uid)}")
    return uid


def _encode(args: argparse.Namespace) -> int:
    uid = _parse_uid(args.uid)
    key_id = check_key_id(args.key_id if args.key_id else args.key.stem)
    if args.capacity is not None:
        if args.capacity <= 0:
            raise UsageError("--capacity must be a positive number of bytes")
        capacity, tag_name = args.capacity, f"{args.capacity}-byte tag"
    else:
        tag_name = args.tag or DEFAULT_TAG
        capacity = TAG_CAPACITY[tag_name]
    recipe = load_recipe(args.recipe)
    key = load_private_key(args.key)
    try:
        message = encode_tag(recipe, uid, key, key_id, capacity, issued_at=args.issued_at)
    except ValueError as err:
        raise UsageError(f"{args.recipe}: does not fit a {tag_name}: {err}") from None
    # Slot size for the summary: the payload of the last record, which is a progress slot.
    contents = decode_tag(message, uid, KeyRing({key_id: key.public_key()}))
    if args.out == "-":
        print(message.hex())
    else:
        try:
            Path(args.out).write_bytes(message)
        except OSError as err:
            raise UsageError(f"{args.out}: cannot write: {err.strerror}") from None
    print(
        f"part {recipe.part_id}: {len(message)}/{capacity} bytes ({tag_name}), "
        f"{len(recipe.steps)} steps, progress slots 2 x {contents.slot_size} bytes, "
        f"tag {uid_hex(uid)}, key {key_id}",
        file=sys.stderr if args.out == "-" else sys.stdout,
    )
    return 0


def _read_message(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UsageError(f"{path}: cannot read: {err.strerror}") from None
    # An NDEF message starts with a header byte that has MB set (>= 0x80), never an ASCII hex digit.
    text = data.decode("ascii", errors="replace")
    if data and re.fullmatch(r"[0-9A-Fa-f\s]+", text):
        try:
            return bytes.fromhex("".join(text.split()))
        except ValueError:
            raise UsageError(f"{path}: looks like hex but has an odd number of digits") from None
    return data


def _keyring(specs: list[str]) -> KeyRing:
    if not specs:
        raise UsageError("give at least one --trust ID=PUB.pem")
    keys = {}
    for spec in specs:
        key_id, sep, path = spec.partition("=")
        if not sep or not path:
            raise UsageError(f"--trust {spec!r}: expected ID=PATH")
        keys[check_key_id(key_id)] = load_public_key(path)
    return KeyRing(keys)


def _decode(args: argparse.Namespace) -> int:
    uid = _parse_uid(args.uid)
    keyring = _keyring(args.trust)
    return _verify(_read_message(args.file), uid, keyring)


def _verify(message: bytes, uid: bytes, keyring: KeyRing) -> int:
    """Print what the tag holds (exit code 0), or REJECTED with the reason (exit code 1)."""
    try:
        contents = decode_tag(message, uid, keyring)
    except PartRejected as err:
        print(f"REJECTED {err.reason}: {err}")
        return 1
    print(_describe(contents))
    return 0


def _time(unix: int | None) -> str:
    if unix is None:
        return "-"
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _describe(contents: TagContents) -> str:
    t, p = contents.traveler, contents.progress
    lines = [
        f"VALID tag {uid_hex(contents.uid)}: traveler v1 signed by key {t.key_id!r}",
        f"  part     {t.part_id}",
        f"  product  {t.product} / {t.variant}",
        f"  order    {t.order}",
        f"  lot      {t.material_lot or '-'}",
        f"  issued   {_time(t.issued_at)}",
        f"  digest   {t.digest.hex()}",
        f"  message  {len(contents.message)} bytes, progress slots 2 x {contents.slot_size} bytes",
        f"  progress seq {p.seq} in slot {'AB'[contents.current_slot]} "
        f"(slot A: {contents.slot_notes[0]}, slot B: {contents.slot_notes[1]})",
        "  steps",
    ]
    for i, step in enumerate(t.steps):
        params = " ".join(f"{k}={v!r}" for k, v in step.parameters.items())
        record = p.records[i] if i < len(p.records) else None
        done = (
            "not done"
            if record is None
            else f"{record.status.value} at {record.station} {_time(record.time)}"
        )
        lines.append(f"    {i + 1}. {step.operation} @ {step.station or 'any station'}: {done}")
        lines.append(f"       {params or '(no parameters)'}")
    return "\n".join(lines)


# ------------------------------------------------------------------ commands on a tag in a reader


def _register_device_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """write / read / reset-progress / erase on a tag in a reader, or on a tag image file."""

    def where(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument(
            "--device", help="nfcpy reader path: usb, usb:VID:PID, tty:USB0:pn532, ..."
        )
        group.add_argument(
            "--image", type=Path, help="a tag image file (NTAG213/215/216 memory dump) instead"
        )
        p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a tag")
        p.add_argument(
            "--password",
            metavar="HEX",
            help="NTAG21x password of a protected tag: PWD+PACK, 12 hex",
        )

    def trust(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--trust", action="append", default=[], metavar="ID=PUB.pem", help="trusted public key"
        )

    write = commands.add_parser(
        "write",
        help="sign a recipe for the tag in the reader and write it",
        description="Sign a recipe for the tag in the reader (or the image file) and write it.",
    )
    write.add_argument("--recipe", required=True, type=Path, help="recipe YAML file")
    write.add_argument("--key", required=True, type=Path, help="private key (PEM)")
    write.add_argument("--key-id", help="key id written on the tag (default: key file stem)")
    write.add_argument("--issued-at", type=int, help="unix seconds (default: now)")
    write.add_argument(
        "--protect", metavar="HEX", help="protect the tag with this NTAG21x password (PWD+PACK)"
    )
    write.add_argument("--uid", help="--image only: UID of a new image file")
    write.add_argument(
        "--tag",
        choices=sorted(TAG_CAPACITY),
        help=f"--image only: type of a new image (default {DEFAULT_TAG})",
    )
    where(write)
    write.set_defaults(func=_run(_tag_write))

    read = commands.add_parser(
        "read",
        help="read, decode and verify the tag in the reader",
        description="Read the tag in the reader (or the image file), decode and verify it.",
    )
    where(read)
    trust(read)
    read.set_defaults(func=_run(_tag_read))

    reset = commands.add_parser(
        "reset-progress",
        help="mark every step of the tag not done",
        description="Mark every step of the tag not done, so the part can go through again.",
    )
    where(reset)
    trust(reset)
    reset.set_defaults(func=_run(_tag_reset))

    erase = commands.add_parser(
        "erase",
        help="leave an empty NDEF message on the tag",
        description="Leave an empty NDEF message on the tag (the traveler is gone).",
    )
    where(erase)
    erase.set_defaults(func=_run(_tag_erase))


@contextlib.contextmanager
def _session(
    args: argparse.Namespace, *, save: bool, new_uid: bytes | None = None, new_kind: str = ""
) -> Iterator[TagSession]:
    """The tag in ``--device``, or the ``--image`` file served through nfcpy like a real tag."""
    from .sim.ntag import NtagImage, NtagSimulator
    from .tag.nfc import TagSession

    password = _password(args.password, "--password") if args.password else None
    if args.device:
        with TagSession(args.device, args.timeout, password=password) as session:
            yield session
        return
    path: Path = args.image
    if path.exists():
        try:
            image = NtagImage.load(path)
        except (OSError, ValueError) as err:
            raise UsageError(f"{path}: {err}") from None
    elif new_uid is not None:
        image = NtagImage.blank(new_kind.upper(), new_uid)
    else:
        raise UsageError(f"{path}: no such tag image (tag write --image FILE --uid UID makes one)")
    with NtagSimulator() as sim:
        sim.present(image)
        with TagSession(sim.device, args.timeout, targets=("106A",), password=password) as session:
            yield session
    if save:
        path.write_bytes(image.to_bytes())


def _password(text: str, option: str) -> bytes:
    try:
        password = bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"{option}: not hex") from None
    if len(password) != 6:
        raise UsageError(
            f"{option}: 6 bytes (PWD 4 + PACK 2) as 12 hex digits, got {len(password)}"
        )
    return password


def _tag_write(args: argparse.Namespace) -> int:
    key_id = check_key_id(args.key_id if args.key_id else args.key.stem)
    recipe = load_recipe(args.recipe)
    key = load_private_key(args.key)
    new_uid = _parse_uid(args.uid) if args.uid else None
    with _session(args, save=True, new_uid=new_uid, new_kind=args.tag or DEFAULT_TAG) as tag:
        uid = uid_hex(tag.uid)
        if not tag.formatted():
            tag.format()
            print(f"tag {uid} ({tag.kind}) had no NDEF data area: formatted")
        capacity = tag.capacity()
        try:
            message = encode_tag(recipe, tag.uid, key, key_id, capacity, issued_at=args.issued_at)
        except ValueError as err:
            raise UsageError(
                f"{args.recipe}: does not fit tag {uid} ({tag.kind}, {capacity} bytes): {err}"
            ) from None
        tag.write(message)
        if args.protect:
            tag.protect(_password(args.protect, "--protect"))
            print(f"tag {uid}: pages 4 and up now need the password to be written")
        print(
            f"part {recipe.part_id}: {len(message)}/{capacity} bytes written to tag {uid} "
            f"({tag.kind}) and read back, {len(recipe.steps)} steps, key {key_id}"
        )
    return 0


def _tag_read(args: argparse.Namespace) -> int:
    keyring = _keyring(args.trust)
    with _session(args, save=False) as tag:
        uid, kind = uid_hex(tag.uid), tag.kind
        if not tag.formatted():
            print(f"tag {uid} ({kind}): no NDEF data area (blank, not formatted)")
            return 1
        message, capacity = tag.read(), tag.capacity()
    print(f"tag {uid} ({kind}): {len(message)}/{capacity} bytes")
    return _verify(message, tag.uid, keyring)


def _tag_reset(args: argparse.Namespace) -> int:
    keyring = _keyring(args.trust)
    with _session(args, save=True) as tag:
        message = tag.read()
        try:
            contents = decode_tag(message, tag.uid, keyring)
        except PartRejected as err:
            print(f"REJECTED {err.reason}: {err}")
            return 1
        new = update_progress(contents, Progress())
        pages = tag.write(new, previous=message)
    print(
        f"tag {uid_hex(tag.uid)}: progress reset, seq {contents.progress.seq + 1} in slot "
        f"{'BA'[contents.current_slot]} ({len(pages)} pages written and read back)"
    )
    return 0


def _tag_erase(args: argparse.Namespace) -> int:
    with _session(args, save=True) as tag:
        tag.format()
    print(f"tag {uid_hex(tag.uid)} ({tag.kind}): erased, empty NDEF message")
    return 0
