"""Detached Ed25519 signatures over firmware profiles: the certified envelope changes only when a
trusted certifier signed it.

A signature file (``<profile>.sig``, JSON) names the key, the profile's name and version, the
SHA-256 of the profile file's exact bytes and when it was signed; the Ed25519 signature covers
all of these, so neither the profile nor the claims about it can be changed without the private
key. Profile keys form a trust list of their own (``profile_keys``), separate from the travelers'
``trusted_keys``: whoever issues parts is not whoever certifies machines.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import EdgeAgentError
from ..instructions.signing import KeyRing, check_key_id

SCHEMA = "edge-agent/profile-signature/1"
#: Domain separation: a signature made for a traveler or anything else never verifies here.
_CONTEXT = b"edge-agent firmware profile signature\n"
_MAX_SIGNATURE_FILE = 4096  # a real one is ~400 bytes; anything larger is not ours
_SIGNED_FIELDS = ("schema", "profile", "version", "sha256", "key_id", "signed_at")


class ProfileRefused(EdgeAgentError):
    """A profile is not accepted as the machine's envelope. ``reason`` is a stable code: its
    signature is ``missing``, ``malformed``, by an ``untrusted_key``, a ``bad_signature``, over a
    ``tampered`` file or the ``wrong_profile``; or its version is ``not_newer`` than the active
    one. The message says what is wrong in words."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class ProfileSignature:
    """What a valid signature vouches for. ``signed_at`` is ISO 8601 UTC."""

    key_id: str
    profile: str
    version: str
    sha256: str
    signed_at: str

    def describe(self) -> dict[str, str]:
        return {"key_id": self.key_id, "signed_at": self.signed_at}


def signature_path(profile_path: str | Path) -> Path:
    """Where the signature of ``profile_path`` lives: beside it, ``<file>.sig``."""
    path = Path(profile_path)
    return path.with_name(path.name + ".sig")


def sign_profile(
    profile_bytes: bytes,
    *,
    name: str,
    version: str,
    key: Ed25519PrivateKey,
    key_id: str,
    signed_at: datetime | None = None,
) -> bytes:
    """The signature file's bytes for a profile file's exact ``profile_bytes``."""
    check_key_id(key_id)
    when = (signed_at or datetime.now(UTC)).astimezone(UTC)
    claims = {
        "schema": SCHEMA,
        "profile": name,
        "version": version,
        "sha256": hashlib.sha256(profile_bytes).hexdigest(),
        "key_id": key_id,
        "signed_at": when.isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    signature = key.sign(_signed_message(claims))
    document = {**claims, "signature": base64.b64encode(signature).decode("ascii")}
    return (json.dumps(document, indent=2) + "\n").encode()


def verify_profile(
    profile_bytes: bytes,
    signature_file: bytes | None,
    keys: KeyRing,
    *,
    name: str,
    version: str,
    origin: str = "profile",
) -> ProfileSignature:
    """Check ``signature_file`` against the profile's exact bytes and parsed name/version.

    Raises ProfileRefused saying exactly what is wrong; returns what the signature vouches for.
    """
    if signature_file is None:
        raise ProfileRefused("missing", f"{origin}: no signature (expected a detached .sig)")
    claims, signature = _parse(signature_file, origin)
    key_id = claims["key_id"]
    key = keys.get(key_id)
    if key is None:
        trusted = ", ".join(sorted(keys)) or "none"
        raise ProfileRefused(
            "untrusted_key",
            f"{origin}: signed with key '{key_id}', which is not a trusted profile key "
            f"(profile_keys: {trusted})",
        )
    try:
        key.verify(signature, _signed_message(claims))
    except InvalidSignature:
        raise ProfileRefused(
            "bad_signature",
            f"{origin}: the signature does not verify with profile key '{key_id}' "
            "(the signature file was altered or made with another key)",
        ) from None
    digest = hashlib.sha256(profile_bytes).hexdigest()
    if digest != claims["sha256"]:
        raise ProfileRefused(
            "tampered",
            f"{origin}: the profile was changed after it was signed "
            f"(sha256 {digest[:16]}…, signed {claims['sha256'][:16]}…)",
        )
    if (claims["profile"], claims["version"]) != (name, version):
        raise ProfileRefused(
            "wrong_profile",
            f"{origin}: the signature is for profile {claims['profile']} {claims['version']}, "
            f"the file says {name} {version}",
        )
    return ProfileSignature(
        key_id=key_id,
        profile=claims["profile"],
        version=claims["version"],
        sha256=claims["sha256"],
        signed_at=claims["signed_at"],
    )


def _signed_message(claims: dict[str, str]) -> bytes:
    canonical = json.dumps(
        {k: claims[k] for k in _SIGNED_FIELDS}, sort_keys=True, separators=(",", ":")
    )
    return _CONTEXT + canonical.encode()


def _parse(data: bytes, origin: str) -> tuple[dict[str, str], bytes]:
    def bad(why: str) -> ProfileRefused:
        return ProfileRefused("malformed", f"{origin}: signature file is not usable: {why}")

    if len(data) > _MAX_SIGNATURE_FILE:
        raise bad(f"{len(data)} bytes, at most {_MAX_SIGNATURE_FILE}")
    try:
        document: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad(f"not JSON ({err})") from None
    if not isinstance(document, dict):
        raise bad("not a JSON object")
    if document.get("schema") != SCHEMA:
        raise bad(f"schema is {document.get('schema')!r}, expected {SCHEMA!r}")
    expected = {*_SIGNED_FIELDS, "signature"}
    missing = sorted(expected - document.keys())
    unknown = sorted(document.keys() - expected)
    if missing or unknown:
        raise bad(
            "; ".join(
                part
                for part in (
                    missing and f"missing {', '.join(missing)}",
                    unknown and f"unknown {', '.join(unknown)}",
                )
                if part
            )
        )
    if not all(isinstance(document[k], str) for k in expected):
        raise bad("every field must be text")
    try:
        check_key_id(document["key_id"])
    except ValueError as err:
        raise bad(str(err)) from None
    if not re.fullmatch(r"[0-9a-f]{64}", document["sha256"]):
        raise bad("sha256 must be 64 lowercase hex digits")
    try:
        datetime.fromisoformat(document["signed_at"])
    except ValueError:
        raise bad(f"signed_at {document['signed_at']!r} is not an ISO 8601 time") from None
    try:
        signature = base64.b64decode(document["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise bad("signature is not base64") from None
    if len(signature) != 64:
        raise bad(f"signature is {len(signature)} bytes, an Ed25519 signature is 64")
    return {k: document[k] for k in _SIGNED_FIELDS}, signature


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Order profile versions: dot/dash separated parts, numbers numerically ("1.10" > "1.9")."""
    parts = re.split(r"[.\-+]", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def is_newer(candidate: str, current: str) -> bool:
    return version_key(candidate) > version_key(current)
