"""A reader absent at start, unplugged mid-run and plugged back: logged, retried with backoff, recovered.

A USB reader cannot be unplugged here, so the only fake is at the lowest layer: nfcpy's udp device
underneath raises what nfcpy's USB drivers raise when the device goes (OSError ENODEV on open, EIO on
I/O). Everything above it - nfcpy's frontend and tag code, our reader thread - is real.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import structlog.testing

from edge_agent.sim.ntag import NtagSimulator
from edge_agent.tag.nfc import NfcReader
from edge_agent.tag.nfc.reader import open_frontend
from edge_agent.tag.reader import ScanKind
from tests.fixtures_nfc import UID, image, next_event, traveler


class UsbPort:
    """A reader on a port that can be unplugged: the simulator's udp device, failing like USB does."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.plugged = False
        self.open_attempts = 0

    def open(self, path: str) -> Any:
        self.open_attempts += 1
        if not self.plugged:
            raise OSError(errno.ENODEV, f"no reader on {path}")
        clf = open_frontend(self.device)  # nfcpy's udp device, as the reader opens it
        for name in ("sense_tta", "send_cmd_recv_rsp"):
            real = getattr(clf.device, name)

            def io(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
                if not self.plugged:
                    raise OSError(errno.EIO, "Input/output error")
                return _real(*args, **kwargs)

            setattr(clf.device, name, io)
        return clf


async def _wait(condition: Any, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_reader_absent_then_unplugged_mid_presence_then_back(ntag_sim: NtagSimulator) -> None:
    port = UsbPort(ntag_sim.device)
    reader = NfcReader(
        "door", "usb:054c:06c3", targets=("106A",), poll_interval=0.02,
        backoff_min=0.02, backoff_max=0.08, opener=port.open,
    )  # fmt: skip
    with structlog.testing.capture_logs() as logs:
        await _run_through_outages(reader, port, ntag_sim)
    seen = [(e["log_level"], e["event"]) for e in logs if e["event"].startswith("nfc reader")]
    absent = [level for level, event in seen if event == "nfc reader unreachable"]
    assert absent[0] == "warning" and set(absent[1:]) == {"debug"}  # WARNING once, then DEBUG
    assert ("warning", "nfc reader link lost") in seen
    assert seen.count(("info", "nfc reader link recovered")) == 2


async def _run_through_outages(reader: NfcReader, port: UsbPort, ntag_sim: NtagSimulator) -> None:
    await reader.start()
    try:
        await _wait(lambda: port.open_attempts >= 4)  # absent: retried, backing off
        assert not reader.connected.is_set()

        port.plugged = True
        await _wait(reader.connected.is_set)
        ntag_sim.present(image(traveler()))
        assert (await next_event(reader, ScanKind.ARRIVED)).uid == UID

        port.plugged = False  # unplugged while the tag is held
        assert (await next_event(reader, ScanKind.LEFT)).uid == UID
        await _wait(lambda: not reader.connected.is_set())

        port.plugged = True  # back: the tag still on it arrives again
        assert (await next_event(reader, ScanKind.ARRIVED)).uid == UID
        assert await reader.read_ndef(UID) == traveler()
    finally:
        await reader.stop()


async def test_an_unexpected_error_in_the_reader_thread_reopens_the_reader(
    ntag_sim: NtagSimulator,
) -> None:
    opened: list[Any] = []

    def opener(path: str) -> Any:
        clf = open_frontend(ntag_sim.device)
        if not opened:  # the first session hits a bug in the driver layer
            clf.device.sense_tta = lambda target: {"": None}["no such key"]  # a KeyError
        opened.append(clf)
        return clf

    reader = NfcReader(
        "r", "usb", targets=("106A",), poll_interval=0.02, backoff_min=0.02, opener=opener
    )
    with structlog.testing.capture_logs() as logs:
        await reader.start()
        try:
            ntag_sim.present(image(traveler()))
            assert (await next_event(reader, ScanKind.ARRIVED)).uid == UID
        finally:
            await reader.stop()
    assert len(opened) == 2
    assert any(e["event"] == "nfc reader failed; reopening" for e in logs)
