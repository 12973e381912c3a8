"""``edge-agent profile ...``: certify firmware profiles with detached Ed25519 signatures.

Exit codes: 0 success (verify: the signature is valid), 1 verify found the signature wrong,
2 usage, file or profile problem.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli_common import UsageError, add_keygen, handled
from .instructions.signing import (
    KeyRing,
    check_key_id,
    load_private_key,
    load_public_key,
)
from .machine.profile import load_profile
from .machine.profile_signature import (
    ProfileRefused,
    sign_profile,
    signature_path,
    verify_profile,
)

_run = handled("profile")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    profile = subparsers.add_parser(
        "profile",
        help="certify firmware profiles: keys, detached signatures, verification",
        description="A firmware profile is a machine's certified envelope. Whoever certifies the "
        "machine signs the profile file's exact bytes; stations accept a pushed profile (and, with "
        "machine.require_signed_profile, the one on disk) only with a valid signature by a key in "
        "their profile_keys.",
    )
    commands = profile.add_subparsers(dest="profile_command", metavar="COMMAND", required=True)

    add_keygen(
        commands,
        _run,
        help="generate an Ed25519 certification key pair",
        description="Write ID.key (private, mode 0600; keep it with whoever certifies machines) "
        "and ID.pub (for stations' profile_keys). Never overwrites a key. Exit 0, or 2.",
        keep="keep it with whoever certifies machines, mode 0600",
        give="give it to stations: profile_keys: {{{id}: ...}}",
    )

    sign = commands.add_parser(
        "sign",
        help="validate a profile and write its detached signature PROFILE.sig",
        description="Validate the profile as a station would, then sign the file's exact bytes "
        "with its name, version and the signing time. Exit 0, or 2 naming the problem.",
    )
    sign.add_argument("profile", type=Path, help="firmware profile YAML")
    sign.add_argument("--key", required=True, type=Path, help="private key (PEM), e.g. DIR/ID.key")
    sign.add_argument("--key-id", help="key id named in the signature (default: key file stem)")
    sign.add_argument("--out", type=Path, help="signature file (default: PROFILE.sig)")
    sign.set_defaults(func=_run(_sign))

    verify = commands.add_parser(
        "verify",
        help="check a profile's signature and explain exactly what is wrong",
        description="Check PROFILE.sig against the profile's bytes and the trusted keys, as a "
        "station does. Exit 0 valid, 1 invalid (the reason in words), 2 usage or file problem.",
    )
    verify.add_argument("profile", type=Path, help="firmware profile YAML")
    verify.add_argument("--sig", type=Path, help="signature file (default: PROFILE.sig)")
    verify.add_argument(
        "--trust",
        action="append",
        default=[],
        required=True,
        metavar="ID=PUB.pem",
        help="trusted profile key (repeatable)",
    )
    verify.set_defaults(func=_run(_verify))


def _sign(args: argparse.Namespace) -> int:
    key_id = check_key_id(args.key_id if args.key_id else args.key.stem)
    profile = load_profile(args.profile)  # never certify a profile that does not validate
    data = _read(args.profile)
    signature = sign_profile(
        data,
        name=profile.name,
        version=profile.version,
        key=load_private_key(args.key),
        key_id=key_id,
    )
    out = args.out or signature_path(args.profile)
    try:
        out.write_bytes(signature)
    except OSError as err:
        raise UsageError(f"{out}: cannot write signature: {err.strerror}") from None
    print(f"{out}: profile {profile.name} {profile.version} signed with key '{key_id}'")
    return 0


def _verify(args: argparse.Namespace) -> int:
    keys: dict[str, Path] = {}
    for entry in args.trust:
        key_id, sep, path = entry.partition("=")
        if not sep or not path:
            raise UsageError(f"--trust {entry!r}: expected ID=PUB.pem")
        keys[check_key_id(key_id)] = Path(path)
    ring = KeyRing({k: load_public_key(p) for k, p in keys.items()})
    profile = load_profile(args.profile)
    sig_file = args.sig or signature_path(args.profile)
    signature = _read(sig_file) if sig_file.exists() else None
    try:
        valid = verify_profile(
            _read(args.profile),
            signature,
            ring,
            name=profile.name,
            version=profile.version,
            origin=str(args.profile),
        )
    except ProfileRefused as err:
        print(f"INVALID ({err.reason}): {err}")
        return 1
    print(
        f"valid: profile {valid.profile} {valid.version} signed with key '{valid.key_id}' "
        f"at {valid.signed_at}"
    )
    return 0


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise UsageError(f"{path}: cannot read: {err.strerror}") from None
