"""Detached profile signatures: what verifies, and that every way of getting it wrong is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.instructions.signing import KeyRing, generate_keypair, load_private_key
from edge_agent.instructions.signing import load_public_key as load_pub
from edge_agent.machine.profile import load_profile
from edge_agent.machine.profile_diff import envelope_changes
from edge_agent.machine.profile_signature import (
    ProfileRefused,
    is_newer,
    sign_profile,
    verify_profile,
)
from tests import REPO_ROOT

PROFILES = REPO_ROOT / "firmware_profiles"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    out = tmp_path / "keys"
    generate_keypair("cert-1", out)
    generate_keypair("other", out)
    generate_keypair("mes-2026", out)  # a traveler key: never a profile key
    return out


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    path = tmp_path / "reference-plc.yaml"
    shutil.copy(PROFILES / "reference-plc.yaml", path)
    return path


def _sign(profile: Path, keys: Path, key_id: str = "cert-1") -> bytes:
    p = load_profile(profile)
    return sign_profile(
        profile.read_bytes(),
        name=p.name,
        version=p.version,
        key=load_private_key(keys / f"{key_id}.key"),
        key_id=key_id,
    )


def _verify(profile: Path, signature: bytes | None, keys: Path) -> None:
    p = load_profile(profile)
    ring = KeyRing({"cert-1": load_pub(keys / "cert-1.pub")})
    verify_profile(profile.read_bytes(), signature, ring, name=p.name, version=p.version)


def _reason(profile: Path, signature: bytes | None, keys: Path) -> str:
    with pytest.raises(ProfileRefused) as err:
        _verify(profile, signature, keys)
    assert "profile" in str(err.value)
    return err.value.reason


def test_valid_signature_vouches_for_key_and_time(profile: Path, keys: Path) -> None:
    signature = _sign(profile, keys)
    p = load_profile(profile)
    ring = KeyRing({"cert-1": load_pub(keys / "cert-1.pub")})
    valid = verify_profile(profile.read_bytes(), signature, ring, name=p.name, version=p.version)
    assert valid.key_id == "cert-1"
    assert valid.profile == p.name and valid.version == p.version
    assert "sha256:" + valid.sha256 == p.content_hash
    assert valid.signed_at.endswith("Z")


def test_one_limit_changed_after_signing_is_tampered(profile: Path, keys: Path) -> None:
    signature = _sign(profile, keys)
    text = profile.read_text()
    assert "max: 12000}" in text
    profile.write_text(text.replace("max: 12000}", "max: 13000}", 1))
    assert _reason(profile, signature, keys) == "tampered"


def test_untrusted_and_traveler_keys_are_refused(profile: Path, keys: Path) -> None:
    assert _reason(profile, _sign(profile, keys, "other"), keys) == "untrusted_key"
    assert _reason(profile, _sign(profile, keys, "mes-2026"), keys) == "untrusted_key"


def test_claims_cannot_be_edited(profile: Path, keys: Path) -> None:
    document = json.loads(_sign(profile, keys))
    document["version"] = "99"
    assert _reason(profile, json.dumps(document).encode(), keys) == "bad_signature"
    document = json.loads(_sign(profile, keys))
    document["key_id"] = "other"  # same signature presented under another name
    ring_other = json.dumps(document).encode()
    assert _reason(profile, ring_other, keys) == "untrusted_key"


@pytest.mark.parametrize(
    "signature",
    [
        b"",
        b"not json",
        b"[]",
        b'{"schema": "edge-agent/profile-signature/1"}',
        b"{" * 5000,
        json.dumps({"schema": "something/else"}).encode(),
    ],
)
def test_malformed_signature_files(profile: Path, keys: Path, signature: bytes) -> None:
    assert _reason(profile, signature, keys) == "malformed"


def test_missing_signature(profile: Path, keys: Path) -> None:
    assert _reason(profile, None, keys) == "missing"


def test_version_order() -> None:
    assert is_newer("1.10", "1.9")
    assert is_newer("2", "1.9.9")
    assert not is_newer("1.0", "1.0")
    assert not is_newer("1.0", "1.1")
    assert is_newer("1.0.1", "1.0")


def test_envelope_changes_name_each_limit(profile: Path, tmp_path: Path) -> None:
    old = load_profile(profile)
    changed = tmp_path / "changed.yaml"
    changed.write_text(profile.read_text().replace("max: 12000}", "max: 13000}", 1))
    lines = envelope_changes(old, load_profile(changed))
    assert len(lines) == 1 and lines[0].endswith("spindle_speed.max: 12000 -> 13000"), lines
    assert envelope_changes(old, old) == []


def test_cli_keygen_sign_verify(
    profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "k"
    assert main(["profile", "keygen", "--key-id", "cert-9", "--out", str(out)]) == 0
    assert main(["profile", "sign", str(profile), "--key", str(out / "cert-9.key")]) == 0
    assert (profile.parent / (profile.name + ".sig")).exists()
    capsys.readouterr()
    trust = f"cert-9={out / 'cert-9.pub'}"
    assert main(["profile", "verify", str(profile), "--trust", trust]) == 0
    assert "valid: profile reference-plc" in capsys.readouterr().out

    profile.write_text(profile.read_text().replace("max: 12000}", "max: 13000}", 1))
    assert main(["profile", "verify", str(profile), "--trust", trust]) == 1
    assert "INVALID (tampered)" in capsys.readouterr().out


def test_cli_refuses_to_sign_an_invalid_profile(
    tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: x\nversion: '1'\ndriver: modbus\npoints: {}\n")
    assert main(["profile", "sign", str(bad), "--key", str(keys / "cert-1.key")]) == 2
    assert "bad.yaml" in capsys.readouterr().err
    assert not (tmp_path / "bad.yaml.sig").exists()
