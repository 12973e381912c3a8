"""Ed25519 keys for travelers: the MES signs with a private key, stations verify with a key ring.

Stations hold public keys only, so a compromised gateway cannot issue instructions. Keys are plain
PEM files (PKCS8 private, SubjectPublicKeyInfo public) so they can be made and inspected with openssl.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import EdgeAgentError

KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,16}\Z")


class KeyFileError(EdgeAgentError):
    """A key file cannot be read, written or is not an Ed25519 key. The message names the file."""


def check_key_id(key_id: str) -> str:
    """Return ``key_id`` if it is 1–16 characters of ``[A-Za-z0-9_.-]``, else raise ValueError."""
    if not isinstance(key_id, str) or not KEY_ID_PATTERN.match(key_id):
        raise ValueError(f"invalid key id {key_id!r}: use 1-16 characters of A-Z a-z 0-9 _ . -")
    return key_id


class KeyRing(Mapping[str, Ed25519PublicKey]):
    """The public keys a station trusts, by key id. Immutable once built."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey] | None = None) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        for key_id, key in (keys or {}).items():
            check_key_id(key_id)
            if not isinstance(key, Ed25519PublicKey):
                raise TypeError(f"key {key_id!r} is not an Ed25519 public key")
            self._keys[key_id] = key

    @classmethod
    def from_files(cls, paths: Mapping[str, str | Path]) -> KeyRing:
        """Load ``{key_id: path to PEM public key}``. Raises KeyFileError or ValueError (bad id)."""
        return cls({check_key_id(k): load_public_key(p) for k, p in paths.items()})

    def __getitem__(self, key_id: str) -> Ed25519PublicKey:
        return self._keys[key_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KeyRing({sorted(self._keys)})"


def generate_keypair(key_id: str, directory: str | Path) -> tuple[Path, Path]:
    """Write ``<key_id>.key`` (PKCS8 PEM, mode 0600) and ``<key_id>.pub``; never overwrite."""
    check_key_id(key_id)
    out = Path(directory)
    private_path, public_path = out / f"{key_id}.key", out / f"{key_id}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(f"{path}: already exists, refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_new(private_path, private_pem, 0o600)
        _write_new(public_path, public_pem, 0o644)
    except OSError as err:
        raise KeyFileError(f"{err.filename or out}: cannot write key: {err.strerror}") from err
    return private_path, public_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: a key that appeared meanwhile is not clobbered. The mode is set at creation, so the
    # private key is never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have removed bits we asked for


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise KeyFileError(f"{path}: cannot read key: {err.strerror}") from err


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Load a PEM PKCS8 Ed25519 private key (unencrypted). Raises KeyFileError naming the file."""
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise KeyFileError(f"{path}: not a readable PEM private key ({err})") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: is a {type(key).__name__}, expected an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Load a PEM SubjectPublicKeyInfo Ed25519 public key. Raises KeyFileError naming the file."""
    data = _read(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise KeyFileError(f"{path}: not a readable PEM public key ({err})") from err
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: is a {type(key).__name__}, expected an Ed25519 public key")
    return key
