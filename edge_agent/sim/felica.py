"""A Type 3 (FeliCa) tag emulated by nfcpy itself, on a loopback UDP port.

nfcpy ships card emulation for Type 3 tags only (``clf.connect(card=...)``, its
``Type3TagEmulation``): its udp driver listens on the port, answers the reader's SENSF_REQ and runs
the NFC Forum Type 3 commands (Check / Update without encryption) against the block functions given
here. So both sides of the radio are nfcpy's own code; only the NDEF memory (an attribute block and
16-byte data blocks, service codes 0x000B read / 0x0009 write, system code 12FC) is ours.

The port stays bound for the simulator's lifetime (nfcpy's udp device is given that one socket
instead of re-binding per listen, which loses the reader's SENSF_REQ in the gap). While no tag is
presented the simulator answers the reader's SENSF_REQ with RFOFF so its sense returns at once
instead of after nfcpy's 1 s timeout.
A presented tag stays in the field until ``remove()``: a command that arrives after it gets an
empty frame, a reception error as from a tag leaving mid-frame. A write can be torn after N more blocks (tests).

``FelicaSimulator`` runs the emulation (``FelicaRadio``) in a process of its own, woken as soon
as the reader sends however busy the reader's process is (``tagproc``).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from .tagproc import Remote, RemoteLog, SimulatorProcess
from .typea import bind_udp

BLOCK = 16
SYSTEM_CODE = bytes.fromhex("12FC")  # NFC Forum Type 3 NDEF
# PMm: IC code 0x44 is none of Sony's product codes (0xF0 would be a FeliCa Lite, which holds 224
# bytes), so nfcpy treats it as a plain NFC Forum Type3Tag. The response time parameters are a
# real card's (Check 0x49: 4.8 ms, Update 0x93: 34 ms for one block); zeros gave 0.6 ms, which a
# busy machine misses three times in a row now and then.
PMM = bytes.fromhex("00444B024F4993FF")
NBR, NBW = 4, 1  # blocks per Check / per Update command, as the attribute block announces


@dataclass
class FelicaImage:
    """The NDEF memory of one Type 3 tag: block 0 the attribute block, then data blocks."""

    idm: bytes
    blocks: list[bytearray]

    @classmethod
    def blank(cls, idm: bytes, data_blocks: int = 64) -> FelicaImage:
        """An NDEF-formatted tag with an empty message; ``data_blocks`` x 16 bytes of capacity."""
        if len(idm) != 8:
            raise ValueError(f"an IDm is 8 bytes, got {len(idm)}")
        if idm[:2] == b"\x01\xfe":
            raise ValueError("an IDm starting 01FE is a peer-to-peer device, not a tag")
        image = cls(idm, [bytearray(BLOCK) for _ in range(1 + data_blocks)])
        image._set_attributes(length=0)
        return image

    @property
    def capacity(self) -> int:
        return (len(self.blocks) - 1) * BLOCK

    def _set_attributes(self, *, length: int, writef: int = 0, rwflag: int = 1) -> None:
        nmaxb = len(self.blocks) - 1
        attr = bytearray(BLOCK)
        attr[0:5] = bytes([0x10, NBR, NBW]) + nmaxb.to_bytes(2, "big")
        attr[9], attr[10] = writef, rwflag
        attr[11:14] = length.to_bytes(3, "big")
        attr[14:16] = sum(attr[0:14]).to_bytes(2, "big")
        self.blocks[0] = attr

    def put_ndef(self, message: bytes) -> None:
        if len(message) > self.capacity:
            raise ValueError(f"{len(message)} bytes do not fit {self.capacity}")
        padded = message + bytes(-len(message) % BLOCK)
        for i in range(0, len(padded), BLOCK):
            self.blocks[1 + i // BLOCK] = bytearray(padded[i : i + BLOCK])
        self._set_attributes(length=len(message))

    def ndef_message(self) -> bytes | None:
        """The message the attribute block announces; None while a write is flagged in progress."""
        attr = self.blocks[0]
        if attr[9] != 0:
            return None
        length = int.from_bytes(attr[11:14], "big")
        return b"".join(bytes(b) for b in self.blocks[1:])[:length]

    def make_read_only(self) -> None:
        attr = self.blocks[0]
        self._set_attributes(length=int.from_bytes(attr[11:14], "big"), rwflag=0)


class FelicaSimulator(SimulatorProcess[FelicaImage]):
    """Presents one Type 3 tag (or none) from its own process (``tagproc``): ``device`` is for
    the reader."""

    radio = "edge_agent.sim.felica:FelicaRadio"
    # After this many more blocks written the tag leaves the field (that Update unanswered).
    tear_after_blocks: Remote[int | None] = Remote()
    blocks_written: RemoteLog[int] = RemoteLog()


@dataclass
class FelicaRadio:
    """Presents one Type 3 tag (or none) through nfcpy's emulation, in the simulator's process."""

    host: str = "127.0.0.1"
    port: int = 0
    tag: FelicaImage | None = None
    # Tests: after this many more blocks written the tag leaves the field (that Update unanswered).
    tear_after_blocks: int | None = None
    blocks_written: list[int] = field(default_factory=list)
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def device(self) -> str:
        return f"udp:{self.host}:{self.port}"

    def start(self) -> str:
        import nfc  # noqa: F401  (fail here, not in the thread)

        self._sock = bind_udp(self.host, self.port)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name="felica-sim", daemon=True)
        self._thread.start()
        return self.device

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def __enter__(self) -> FelicaRadio:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def present(self, tag: FelicaImage) -> None:
        with self._lock:
            self.tag = tag
        self._wake()  # the empty field's loop hands over to nfcpy's emulation now

    def remove(self) -> FelicaImage | None:
        with self._lock:
            tag, self.tag = self.tag, None
        self._wake()  # end the emulation now, not after answering one more command
        return tag

    # ------------------------------------------------------------------ nfcpy's emulation

    def _wake(self) -> None:
        # nfcpy's emulation blocks waiting for the next command: a datagram ends that wait.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
            waker.sendto(b"RFOFF", (self.host, self.port))

    def _run(self) -> None:
        import nfc
        import nfc.clf

        sock = self._sock
        assert sock is not None
        # nfcpy logs a dropped link at ERROR; here it is the field emptying.
        logging.getLogger("nfc.clf").setLevel(logging.CRITICAL)
        clf = nfc.ContactlessFrontend(self.device)
        _keep_socket(clf.device, sock)
        try:
            while not self._stopping.is_set():
                with self._lock:
                    tag = self.tag
                if tag is None:
                    self._empty_field(sock)
                    continue
                target = nfc.clf.LocalTarget("212F")
                target.sensf_res = b"\x01" + tag.idm + PMM + SYSTEM_CODE
                clf.connect(
                    card={
                        "on-startup": lambda _t, target=target: target,
                        "on-connect": lambda emulation, tag=tag: self._serve(emulation, tag),
                        "on-release": lambda _e: True,
                        "timeout": 0.2,
                    },
                    terminate=lambda tag=tag: self._stopping.is_set() or self.tag is not tag,
                )
        finally:
            with contextlib.suppress(Exception):
                clf.close()
            sock.close()

    def _empty_field(self, sock: socket.socket) -> None:
        """No tag presented: answer each SENSF_REQ with RFOFF.

        nfcpy's sense then returns at once, as with a reader chip, instead of waiting out its
        1 s timeout for a tag that is not there.
        """
        while not self._stopping.is_set() and self.tag is None:
            if not select.select([sock], [], [], 0.05)[0]:  # present() and stop() wake it
                continue
            datagram, addr = sock.recvfrom(1024)
            # Only the reader's sense (a wildcard SENSF_REQ) gets RFOFF: nfcpy 1.0.4's Type 3
            # retry loop fails with UnboundLocalError when every retry of a command ends in
            # RFOFF. A tag command, the presence check's polling included, gets an empty frame,
            # a reception error as from a tag leaving mid-frame, so the reader need not wait
            # for the silence of a tag that is gone.
            if addr[1] == self.port:
                continue
            if datagram.startswith(b"212F 0600ffff"):
                sock.sendto(b"RFOFF", addr)
            elif datagram.startswith(b"212F "):
                sock.sendto(b"212F", addr)

    def _serve(self, emulation: Any, tag: FelicaImage) -> bool:
        def read(block: int, _rb: int, _re: int) -> bytes | None:
            if self.tag is not tag or block >= len(tag.blocks):
                return None
            return bytes(tag.blocks[block])

        def write(block: int, data: bytes, _wb: int, _we: int) -> bool:
            with self._lock:
                if self.tag is not tag or block >= len(tag.blocks):
                    return False
                if self.tear_after_blocks is not None:
                    if self.tear_after_blocks <= 0:
                        self.tear_after_blocks, self.tag = None, None
                        return False
                    self.tear_after_blocks -= 1
                tag.blocks[block] = bytearray(data)
                self.blocks_written.append(block)
                return True

        emulation.add_service(0x0009, read, write)  # NDEF, read/write
        emulation.add_service(0x000B, read, lambda *_: False)  # NDEF, read-only access
        return True


def _keep_socket(device: Any, sock: socket.socket) -> None:
    """Make nfcpy's udp device listen on ``sock`` for good instead of re-binding per listen.

    Its listen loop closes and re-binds the port for every presence; a SENSF_REQ the reader sends
    in between is lost and its sense waits 1 s (field-notes.md). One bound socket has no gap.
    """
    if device.socket is not None:
        device.socket.close()

    def create_socket() -> None:
        if device.socket is None:
            device.socket, device.sent_data, device.rcvd_data = sock, 0, 0

    device._create_socket = create_socket
    device._bind_socket = lambda _time_to_return: True
    device.mute = lambda: setattr(device, "socket", None)  # never close it, never send RFOFF
    create_socket()
