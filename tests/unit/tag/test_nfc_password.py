"""NTAG21x password protection: set by ``tag write --protect``, needed by readers to write progress."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.errors import TagIOError
from edge_agent.instructions.codec import decode_tag, update_progress
from edge_agent.instructions.model import StepRecord, StepStatus
from edge_agent.instructions.signing import generate_keypair
from edge_agent.sim.ntag import PAGE, NtagImage, NtagSimulator
from edge_agent.tag.nfc import NfcReader
from edge_agent.tag.reader import ScanKind
from tests import REPO_ROOT
from tests.fixtures_nfc import KEYRING, UID, image, next_event, traveler

REPO = REPO_ROOT
PASSWORD = bytes.fromhex("A1B2C3D4E5F6")


def test_tool_protects_and_then_needs_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = generate_keypair("mes", tmp_path)
    img = tmp_path / "part.img"
    recipe = REPO / "config" / "recipes" / "bracket-long.yaml"
    write = ["tag", "write", "--recipe", str(recipe), "--key", str(private), "--image", str(img)]
    assert main([*write, "--uid", UID.hex(), "--protect", PASSWORD.hex()]) == 0
    assert "pages 4 and up now need the password" in capsys.readouterr().out
    tag = NtagImage.load(img)
    cfg = tag.config_page * PAGE
    assert tag.auth0 == 4
    assert tag.memory[cfg + 8 : cfg + 14] == PASSWORD  # PWD + PACK

    reset = ["tag", "reset-progress", "--image", str(img), "--trust", f"mes={public}"]
    assert main(reset) == 3  # the write is refused without the password
    assert "04A1B2C3D4E5F6 (NTAG215) is password-protected from page 4" in capsys.readouterr().err
    assert main([*reset, "--password", "000000000000"]) == 3
    assert "password not accepted" in capsys.readouterr().err
    assert main([*reset, "--password", PASSWORD.hex()]) == 0


async def _protected(sim: NtagSimulator) -> tuple[NtagImage, bytes, bytes]:
    tag = image(traveler(done=1))
    cfg = tag.config_page * PAGE
    tag.memory[cfg + 3] = 4  # AUTH0: pages 4 and up need the password
    tag.memory[cfg + 8 : cfg + 14] = PASSWORD
    old = traveler(done=1)
    contents = decode_tag(old, UID, KEYRING)
    new = update_progress(
        contents, contents.progress.with_record(1, StepRecord(StepStatus.OK, "st-20", 9), 3)
    )
    sim.present(tag)
    return tag, old, new


@pytest.mark.parametrize(
    "password", [None, bytes.fromhex("000000000000")], ids=["no-password", "wrong-password"]
)
async def test_reader_without_the_right_password_cannot_write_progress(
    ntag_sim: NtagSimulator, password: bytes | None
) -> None:
    reader = NfcReader(
        "p", ntag_sim.device, targets=("106A",), poll_interval=0.02, password=password
    )
    await reader.start()
    try:
        tag, old, new = await _protected(ntag_sim)
        await next_event(reader, ScanKind.ARRIVED)
        assert await reader.read_ndef(UID) == old  # reading is not protected
        with pytest.raises(TagIOError, match=r"04A1B2C3D4E5F6 .* password-protected from page 4"):
            await reader.write_ndef(UID, new, previous=old)
    finally:
        await reader.stop()
    ntag_sim.sync()  # the simulator's copy of the tag, written by the reader or not
    assert tag.ndef_message() == old


async def test_reader_with_the_password_writes_progress(ntag_sim: NtagSimulator) -> None:
    reader = NfcReader(
        "p", ntag_sim.device, targets=("106A",), poll_interval=0.02, password=PASSWORD
    )
    await reader.start()
    try:
        tag, old, new = await _protected(ntag_sim)
        await next_event(reader, ScanKind.ARRIVED)
        await reader.write_ndef(UID, await reader.read_ndef(UID), previous=old)
        await reader.write_ndef(UID, new, previous=old)
    finally:
        await reader.stop()
    ntag_sim.sync()
    assert tag.ndef_message() == new
