"""Ed25519 key files and the key ring."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from edge_agent.instructions.signing import (
    KeyFileError,
    KeyRing,
    check_key_id,
    generate_keypair,
    load_private_key,
    load_public_key,
)


def test_generated_pair_signs_and_verifies(tmp_path: Path) -> None:
    private_path, public_path = generate_keypair("mes-1", tmp_path / "keys")
    assert (private_path.name, public_path.name) == ("mes-1.key", "mes-1.pub")
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    signature = load_private_key(private_path).sign(b"data")
    ring = KeyRing.from_files({"mes-1": public_path})
    ring["mes-1"].verify(signature, b"data")  # raises InvalidSignature on failure
    assert list(ring) == ["mes-1"] and ring.get("mes-2") is None


def test_never_overwrites_a_key(tmp_path: Path) -> None:
    private_path, _ = generate_keypair("k", tmp_path)
    before = private_path.read_bytes()
    with pytest.raises(KeyFileError, match=r"k\.key: already exists"):
        generate_keypair("k", tmp_path)
    assert private_path.read_bytes() == before


def test_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pub"
    with pytest.raises(KeyFileError, match=rf"{missing}: cannot read key"):
        load_public_key(missing)
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key")
    with pytest.raises(KeyFileError, match=rf"{garbage}: not a readable PEM private key"):
        load_private_key(garbage)
    ec = tmp_path / "ec.key"
    ec.write_bytes(
        generate_private_key(SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyFileError, match=rf"{ec}: is a .*expected an Ed25519 private key"):
        load_private_key(ec)


@pytest.mark.parametrize("key_id", ["", "x" * 17, "mes 1", "mes/1", "mé"])
def test_bad_key_ids(key_id: str) -> None:
    with pytest.raises(ValueError, match="invalid key id"):
        check_key_id(key_id)


def test_key_ids_at_the_limits() -> None:
    assert check_key_id("A" * 16) == "A" * 16
    assert check_key_id("a.b_c-1") == "a.b_c-1"
