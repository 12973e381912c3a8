"""A Type 3 (FeliCa) tag emulated by nfcpy itself, on a loopback UDP port.

nfcpy ships card emulation for Type 3 tags only (``clf.connect(card=...)``, its
``Type3TagEmulation``): its udp driver listens on the port, answers the reader's SENSF_REQ and runs
the NFC Forum Type 3 commands (Check / Update without encryption) against the block functions given
here. So both sides of the radio are nfcpy's own code; only the NDEF memory (an attribute block and
16-byte data blocks, service codes 0x000B read / 0x0009 write, system code 12FC) is ours.

nfcpy's listen loop binds the port only while a tag is presented (and re-binds it for each new
presence); in between, the simulator holds the port and answers the reader's SENSF_REQ with RFOFF so
its sense returns at once instead of after nfcpy's 1 s timeout.
A presented tag stays in the field until ``remove()``: the command that arrives after it gets no
answer, as from a tag that has left. A write can be torn after N more blocks (tests).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from .ntag import bind_udp

BLOCK = 16
SYSTEM_CODE = bytes.fromhex("12FC")  # NFC Forum Type 3 NDEF
# PMm: IC code 0x44 is none of Sony's product codes (0xF0 would be a FeliCa Lite, which holds 224
# bytes), so nfcpy treats it as a plain NFC Forum Type3Tag; the rest are response time parameters.
PMM = bytes.fromhex("00440000000000FF")
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


@dataclass
class FelicaSimulator:
    """Presents one Type 3 tag (or none) through nfcpy's emulation. ``device`` is for the reader."""

    host: str = "127.0.0.1"
    port: int = 0
    tag: FelicaImage | None = None
    # Tests: after this many more blocks written the tag leaves the field (that Update unanswered).
    tear_after_blocks: int | None = None
    blocks_written: list[int] = field(default_factory=list)
    _thread: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)
    _changed: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def device(self) -> str:
        return f"udp:{self.host}:{self.port}"

    def start(self) -> str:
        import nfc  # noqa: F401  (fail here, not in the thread)

        if self.port == 0:  # nfcpy binds the port itself: find a free one
            with bind_udp(self.host) as probe:
                self.port = probe.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name="felica-sim", daemon=True)
        self._thread.start()
        return self.device

    def stop(self) -> None:
        self._stopping.set()
        self._changed.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def __enter__(self) -> FelicaSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def present(self, tag: FelicaImage) -> None:
        with self._lock:
            self.tag = tag
        self._changed.set()

    def remove(self) -> FelicaImage | None:
        with self._lock:
            tag, self.tag = self.tag, None
        self._changed.set()
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

        # nfcpy logs a failed bind or a dropped link at ERROR; here they are the field emptying.
        logging.getLogger("nfc.clf").setLevel(logging.CRITICAL)
        clf = nfc.ContactlessFrontend(self.device)
        clf.device.mute()  # nfcpy binds the port when it listens; until then the field is ours
        try:
            while not self._stopping.is_set():
                with self._lock:
                    tag = self.tag
                if tag is None:
                    self._empty_field()
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
                clf.device.mute()  # release the port (no RFOFF: it is nfcpy's own listen port)
        finally:
            with contextlib.suppress(Exception):
                clf.close()

    def _empty_field(self) -> None:
        """Hold the port while no tag is presented and answer each SENSF_REQ with RFOFF.

        nfcpy's sense then returns at once, as with a reader chip, instead of waiting out its
        1 s timeout for a tag that is not there.
        """
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((self.host, self.port))
            except OSError:  # nfcpy has not let go of it yet
                self._changed.wait(0.01)
                return
            while not self._stopping.is_set() and self.tag is None:
                if not select.select([sock], [], [], 0.05)[0]:
                    continue
                datagram, addr = sock.recvfrom(1024)
                # Only the reader's sense (a wildcard SENSF_REQ) gets RFOFF; a tag command, the
                # presence check's polling included, goes unanswered as from a tag that left:
                # nfcpy 1.0.4's Type 3 retry loop fails with UnboundLocalError when every retry
                # of a command ends in RFOFF.
                if datagram.startswith(b"212F 0600ffff") and addr[1] != self.port:
                    sock.sendto(b"RFOFF", addr)
        self._changed.clear()

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
