"""``edge-agent tag write/read/reset-progress/erase`` on a reader (the NTAG simulator over udp) and on image files."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.instructions.codec import decode_tag
from edge_agent.instructions.signing import KeyRing, generate_keypair, load_public_key
from edge_agent.sim.ntag import NtagImage, NtagSimulator
from tests import REPO_ROOT

REPO = REPO_ROOT
RECIPE = REPO / "config" / "recipes" / "bracket-long.yaml"
UID = bytes.fromhex("04A1B2C3D4E5F6")


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair("mes", tmp_path)


def test_image_lifecycle_write_read_reset_erase(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = keys
    img = tmp_path / "part.img"
    trust = ["--trust", f"mes={public}"]
    args = ["tag", "write", "--recipe", str(RECIPE), "--key", str(private), "--image", str(img)]
    assert main([*args, "--uid", "04A1B2C3D4E5F6", "--issued-at", "1795000000"]) == 0
    assert "491/492 bytes written to tag 04A1B2C3D4E5F6 (NTAG215) and read back" in (
        capsys.readouterr().out
    )
    image = NtagImage.load(img)
    message = image.ndef_message()
    assert message is not None
    keyring = KeyRing({"mes": load_public_key(public)})
    assert decode_tag(message, UID, keyring).traveler.part_id == "P-000123"

    assert main(["tag", "read", "--image", str(img), *trust]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tag 04A1B2C3D4E5F6 (NTAG215): 491/492 bytes\nVALID tag 04A1B2C3D4E5F6")
    assert "progress seq 0 in slot A" in out

    assert main(["tag", "reset-progress", "--image", str(img), *trust]) == 0
    assert "progress reset, seq 1 in slot B" in capsys.readouterr().out
    reset = NtagImage.load(img).ndef_message()
    assert reset is not None and decode_tag(reset, UID, keyring).progress.seq == 1
    assert reset[: len(message) - 100] == message[: len(message) - 100]  # traveler untouched

    assert main(["tag", "erase", "--image", str(img)]) == 0
    assert main(["tag", "read", "--image", str(img), *trust]) == 1
    assert "REJECTED no_traveler" in capsys.readouterr().out


def test_write_says_how_many_bytes_over(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    private, _ = keys
    img = tmp_path / "small.img"
    args = ["tag", "write", "--recipe", str(RECIPE), "--key", str(private), "--image", str(img)]
    code = main([*args, "--uid", "04A1B2C3D4E5F6", "--tag", "ntag213"])
    assert code == 2
    err = capsys.readouterr().err
    assert "does not fit tag 04A1B2C3D4E5F6 (NTAG213, 142 bytes)" in err and "155 bytes over" in err
    assert not img.exists()  # nothing written


def test_write_formats_a_blank_tag_in_a_reader(
    keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = keys
    tag = NtagImage.blank("NTAG216", UID, ndef=False)  # no capability container at all
    with NtagSimulator() as sim:
        sim.present(tag)
        args = ["tag", "write", "--recipe", str(RECIPE), "--key", str(private)]
        assert main([*args, "--device", sim.device]) == 0
        out = capsys.readouterr().out
        assert "had no NDEF data area: formatted" in out
        assert "867/868 bytes written to tag 04A1B2C3D4E5F6 (NTAG216)" in out
        assert main(["tag", "read", "--device", sim.device, "--trust", f"mes={public}"]) == 0
    assert tag.memory[12:16] == bytes([0xE1, 0x10, 0x6D, 0x00])


def test_no_reader_and_no_tag_are_exit_3_with_the_device(
    capsys: pytest.CaptureFixture[str], keys: tuple[Path, Path]
) -> None:
    _, public = keys
    trust = ["--trust", f"mes={public}"]
    assert main(["tag", "read", "--device", "tty:USB9:pn532", "--timeout", "0.2", *trust]) == 3
    assert "no reader at tty:USB9:pn532" in capsys.readouterr().err
    with NtagSimulator() as sim:
        assert main(["tag", "erase", "--device", sim.device, "--timeout", "0.2"]) == 3
        assert f"no tag on {sim.device} within 0.2 s" in capsys.readouterr().err
