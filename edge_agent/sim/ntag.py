"""An NTAG213/215/216 tag that nfcpy's ``udp`` reader driver can talk to.

nfcpy can emulate only Type 3 tags itself. This simulator answers the frames nfcpy's udp driver
sends (datagrams ``"106A <hex>"``) with the NTAG21x command set over a memory image:
anticollision (SENS_REQ, SDD/SEL cascade levels 1-2), GET_VERSION, READ (16 bytes, roll-over),
WRITE (one 4-byte page; the CC page is one-time programmable: bits are OR-ed) and NAK for anything
else. So everything above the radio - nfcpy's tag detection, its Type 2 NDEF code and our reader
backend - runs for real.

One socket stays bound for the simulator's lifetime: an emulator built on nfcpy's own listen loop
re-binds per listen and races the reader (field-notes.md). A tag can be presented, removed, or
torn away after a given number of written bytes, which is how the tear test cuts a write short.

``NtagSimulator`` runs the radio (``NtagRadio``) in a process of its own, woken as soon as the
reader sends however busy the reader's process is (``tagproc``).
"""

from __future__ import annotations

import functools
import operator
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Self, TypeVar

from .tagproc import Remote, RemoteLog, SimulatorProcess

PAGE = 4

# kind -> (total pages, CC size byte, GET_VERSION storage byte); from the NTAG213/215/216 datasheet.
KINDS = {
    "NTAG213": (45, 0x12, 0x0F),
    "NTAG215": (135, 0x3E, 0x11),
    "NTAG216": (231, 0x6D, 0x13),
}
SENS_RES = bytes([0x44, 0x00])
SAK_CASCADE, SAK_DONE = 0x04, 0x00
ACK, NAK = b"\x0a", b"\x00"


def bind_udp(host: str, port: int = 0) -> socket.socket:
    """A UDP socket bound to ``port``, or to a free port nfcpy's udp driver can be given.

    nfcpy resolves ``udp:HOST:PORT`` with getnameinfo without NI_NUMERICSERV, so a port that has a
    service name in /etc/services (60179 is "fido") comes back as that name and int() fails.
    """
    for _ in range(20):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, port))
        bound = sock.getsockname()[1]
        if port or socket.getnameinfo((host, bound), socket.NI_NUMERICHOST)[1] == str(bound):
            return sock
        sock.close()
    raise OSError(f"no free UDP port without a service name on {host}")


def _bcc(data: bytes) -> int:
    return functools.reduce(operator.xor, data, 0)


@dataclass
class NtagImage:
    """The whole memory of one tag: pages 0-2 UID/lock, page 3 CC, user memory, config pages."""

    kind: str
    memory: bytearray

    @classmethod
    def blank(cls, kind: str, uid: bytes, *, ndef: bool = True) -> NtagImage:
        """A tag as it leaves the factory: CC written, an empty NDEF TLV (``ndef=False``: no CC)."""
        if kind not in KINDS:
            raise ValueError(f"unknown tag kind {kind!r}, expected one of {', '.join(KINDS)}")
        if len(uid) != 7:
            raise ValueError(f"an NTAG UID is 7 bytes, got {len(uid)}")
        pages, cc_size, _ = KINDS[kind]
        memory = bytearray(pages * PAGE)
        memory[0:4] = uid[0:3] + bytes([_bcc(b"\x88" + uid[0:3])])
        memory[4:8] = uid[3:7]
        memory[8] = _bcc(uid[3:7])
        memory[9] = 0x48  # internal byte
        if ndef:
            memory[12:16] = bytes([0xE1, 0x10, cc_size, 0x00])
            memory[16:19] = bytes([0x03, 0x00, 0xFE])
        cfg = (pages - 4) * PAGE  # CFG0 CFG1 PWD PACK, factory defaults: no password protection
        memory[cfg : cfg + 16] = bytes([4, 0, 0, 0xFF, 0, 5, 0, 0]) + b"\xff" * 4 + bytes(4)
        return cls(kind, memory)

    @classmethod
    def from_bytes(cls, data: bytes) -> NtagImage:
        """An image as saved by ``to_bytes`` (a plain memory dump); the size gives the kind."""
        for kind, (pages, _, _) in KINDS.items():
            if len(data) == pages * PAGE:
                return cls(kind, bytearray(data))
        sizes = ", ".join(f"{pages * PAGE} ({kind})" for kind, (pages, _, _) in KINDS.items())
        raise ValueError(f"a tag image is {sizes} bytes, got {len(data)}")

    @classmethod
    def load(cls, path: Path) -> NtagImage:
        return cls.from_bytes(path.read_bytes())

    def to_bytes(self) -> bytes:
        return bytes(self.memory)

    @property
    def uid(self) -> bytes:
        return bytes(self.memory[0:3] + self.memory[4:8])

    @property
    def pages(self) -> int:
        return len(self.memory) // PAGE

    @property
    def user_pages(self) -> range:
        """Pages the NDEF data area may use: from page 4 to the end of user memory."""
        _, cc_size, _ = KINDS[self.kind]
        return range(4, 4 + cc_size * 8 // PAGE)

    def put_ndef(self, message: bytes) -> None:
        """Lay ``message`` out as an NDEF TLV at page 4, as a tag programmed elsewhere would hold it."""
        length = bytes([len(message)]) if len(message) < 255 else b"\xff" + len(message).to_bytes(2)
        tlv = b"\x03" + length + message + b"\xfe"
        area = self.user_pages
        if len(tlv) - 1 > len(area) * PAGE:
            raise ValueError(f"{len(message)} bytes do not fit a {self.kind}")
        start = area.start * PAGE
        self.memory[start : area.stop * PAGE] = bytes(len(area) * PAGE)
        tlv = tlv[: len(area) * PAGE]  # a full tag has no room for the terminator
        self.memory[start : start + len(tlv)] = tlv

    def ndef_message(self) -> bytes | None:
        """The NDEF message in the first NDEF TLV (after NULL/lock/memory TLVs), None if there is none.

        For looking at a tag image without a reader (demo summary, tests); the agent reads tags only
        through nfcpy.
        """
        if self.memory[12] != 0xE1:
            return None
        pos, end = 16, 16 + KINDS[self.kind][1] * 8
        while pos < end:
            t = self.memory[pos]
            if t == 0x00:
                pos += 1
                continue
            if t == 0xFE or pos + 1 >= end:
                return None
            length, pos = self.memory[pos + 1], pos + 2
            if length == 0xFF:
                length, pos = int.from_bytes(self.memory[pos : pos + 2]), pos + 2
            if t == 0x03:
                return bytes(self.memory[pos : pos + length])
            pos += length
        return None

    @property
    def config_page(self) -> int:
        """CFG0 (AUTH0 in byte 3); CFG1 (ACCESS: PROT in bit 7), PWD and PACK follow."""
        return self.pages - 4

    @property
    def auth0(self) -> int:
        """First page protected by the password (AUTH0); beyond the last page when there is none."""
        return self.memory[self.config_page * PAGE + 3]

    def make_read_only(self) -> None:
        """Set the CC write-access nibble, as a locked tag reports it."""
        self.memory[15] |= 0x0F


TagT = TypeVar("TagT")


def anticollision(
    uid: bytes, data: bytes, state: str, sens_res: bytes, sak: int
) -> tuple[str, bytes] | None:
    """ISO 14443-3 Type A selection of a 7-byte UID: (next state, reply), None for any other frame.

    States: idle | ready1 | ready2 | active; ``sak`` is the SEL_RES of the last cascade level.
    """
    cl1 = bytes([0x88]) + uid[0:3] + bytes([_bcc(b"\x88" + uid[0:3])])
    cl2 = uid[3:7] + bytes([_bcc(uid[3:7])])
    if data in (b"\x26", b"\x52"):  # SENS_REQ / ALL_REQ
        return "ready1", sens_res
    if data == b"\x93\x20" and state == "ready1":
        return state, cl1
    if data == b"\x93\x70" + cl1 and state == "ready1":
        return "ready2", bytes([SAK_CASCADE])
    if data == b"\x95\x20" and state == "ready2":
        return state, cl2
    if data == b"\x95\x70" + cl2 and state == "ready2":
        return "active", bytes([sak])
    return None


@dataclass
class UdpTagRadio(Generic[TagT]):
    """The radio of a simulated Type A tag: one bound UDP socket, frames ``"106A <hex>"``.

    Subclasses answer the frames in ``_command``. It runs in the simulator's own process
    (``tagproc``); ``UdpTagSimulator`` is what callers use.
    """

    host: str = "127.0.0.1"
    port: int = 0
    tag: TagT | None = None
    # Tests: after this many more bytes written the tag leaves the field; the unit being written
    # when it happens keeps only its first bytes, like a real torn write.
    tear_after_bytes: int | None = None
    # Tests: after this many more commands (after anticollision) the tag leaves the field.
    leave_after_commands: int | None = None
    late_by: float = 0.0  # Tests: seconds a late reply comes late (NtagRadio.late_reads)
    delay: float = 0.0  # Tests: seconds every reply takes, as from a host busy elsewhere
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _state: str = "idle"  # idle | ready1 | ready2 | active

    @property
    def device(self) -> str:
        return f"udp:{self.host}:{self.port}"

    def start(self) -> str:
        self._sock = bind_udp(self.host, self.port)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="tag-sim", daemon=True)
        self._thread.start()
        return self.device

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            # A datagram to ourselves wakes the blocking recvfrom; then the socket closes.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
                waker.sendto(b"STOP", sock.getsockname())
            if self._thread is not None:
                self._thread.join(timeout=2)
            sock.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------- the field

    def present(self, tag: TagT) -> None:
        with self._lock:
            self.tag, self._state = tag, "idle"
            self._reset()

    def remove(self) -> TagT | None:
        with self._lock:
            tag, self.tag = self.tag, None
            return tag

    # ------------------------------------------------------------------------- the radio

    def _reset(self) -> None:
        """The tag lost power (field off, newly presented): drop per-session state."""

    def _late(self, datagram: bytes) -> bool:
        """Tests: whether the reply to ``datagram`` comes ``late_by`` seconds late."""
        return False

    def _command(self, tag: TagT, data: bytes) -> bytes | None:
        """The reply to one frame: bytes, b"" for a garbled frame, None for silence."""
        raise NotImplementedError

    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        spare: list[tuple[bytes, tuple[str, int]]] = []
        while self._sock is not None:
            try:
                datagram, addr = sock.recvfrom(1024)
            except OSError:
                return
            if datagram == b"STOP":
                continue
            with self._lock:
                reply = self._frame(datagram)
                late = self._late(datagram)
            replies, spare = [*spare, (reply, addr)] if reply is not None else spare, []
            pause = self.late_by if late else self.delay  # frames meanwhile wait their turn
            if pause:
                time.sleep(pause)
            if late:  # past the reader's first wait for it
                spare = self._copies(sock, datagram)
            try:
                for data, to in replies:
                    sock.sendto(data, to)
            except OSError:
                return

    def _copies(self, sock: socket.socket, command: bytes) -> list[tuple[bytes, tuple[str, int]]]:
        """Replies to copies of ``command`` the reader sent again while its reply was late.

        A second reply for one command: it goes out with the reply to the reader's next command
        (just after that command, as on a loaded machine), where only a reader that waits for
        one reply per command is not misled.
        """
        copies = []
        while select.select([sock], [], [], 0)[0]:
            head, addr = sock.recvfrom(1024, socket.MSG_PEEK)
            if head != command:
                break
            sock.recvfrom(1024)
            with self._lock:
                reply = self._frame(head)
            if reply is not None:
                copies.append((reply, addr))
        return copies

    def _frame(self, datagram: bytes) -> bytes | None:
        if datagram.startswith(b"RFOFF"):
            self._state = "idle"  # the field dropped: the tag resets
            self._reset()
            return None
        try:
            brty, payload = datagram.split()
            data = bytes.fromhex(payload.decode("ascii"))
        except ValueError:
            return None
        if brty != b"106A":
            return b"RFOFF"  # no tag of that technology: nfcpy's sense returns at once
        if self.tag is None:
            # An empty field. RFOFF makes nfcpy's sense return at once instead of waiting out its
            # 1 s timeout; a command in flight gets an empty frame, a reception error, as when a
            # real tag leaves mid-frame.
            return b"RFOFF" if data in (b"\x26", b"\x52") else b"106A"
        response = self._command(self.tag, data)
        if response is None:
            return None
        return b"106A " + response.hex().encode() if response else b"106A"

    def _leaving(self) -> bool:
        """Counts one command against ``leave_after_commands``; True when the tag leaves now."""
        if self.leave_after_commands is None:
            return False
        if self.leave_after_commands <= 0:
            self.tag = None
            return True
        self.leave_after_commands -= 1
        return False


@dataclass
class NtagRadio(UdpTagRadio[NtagImage]):
    """The NTAG21x's radio, run in the simulator's process (``NtagSimulator``)."""

    # Tests: this many more READ replies come ``late_by`` seconds late: after the reader's first
    # wait for them, before it gives up.
    late_reads: int = 0
    pages_written: list[int] = field(default_factory=list)
    _authenticated: bool = False  # PWD_AUTH succeeded since the tag was selected
    # Configuration takes effect when the tag is selected, as on the chip: AUTH0 and PROT as then.
    _auth0: int = 0xFF
    _prot: bool = False

    def _reset(self) -> None:
        self._authenticated = False

    def _late(self, datagram: bytes) -> bool:
        late = self.late_reads > 0 and datagram.startswith(b"106A 30")
        self.late_reads -= late
        return late

    def _command(self, tag: NtagImage, data: bytes) -> bytes | None:
        step = anticollision(tag.uid, data, self._state, SENS_RES, SAK_DONE)
        if step is not None:
            self._state, reply = step
            self._authenticated = False
            if self._state == "active":
                self._auth0 = tag.auth0
                self._prot = bool(tag.memory[(tag.config_page + 1) * PAGE] & 0x80)
            return reply
        if self._state != "active":
            return None  # a tag that is not selected stays silent
        if self._leaving():
            return b""
        if data == b"\x60":  # GET_VERSION
            return bytes([0x00, 0x04, 0x04, 0x02, 0x01, 0x00, KINDS[tag.kind][2], 0x03])
        if len(data) == 2 and data[0] == 0x30:  # READ: 4 pages, rolling over at the end
            start = data[1]
            if start >= tag.pages or (self._locked(start) and self._prot):
                return self._nak()
            pages = [(start + i) % tag.pages for i in range(4)]
            return b"".join(
                bytes(PAGE) if p >= tag.config_page + 2 else tag.memory[p * PAGE :][:PAGE]
                for p in pages  # PWD and PACK always read as zeros
            )
        if len(data) == 5 and data[0] == 0x1B:  # PWD_AUTH
            pwd = (tag.config_page + 2) * PAGE
            if data[1:5] != tag.memory[pwd : pwd + 4]:
                return self._nak()
            self._authenticated = True
            return bytes(tag.memory[pwd + 4 : pwd + 6])  # PACK
        if len(data) == 6 and data[0] == 0xA2:  # WRITE one page
            return self._write(tag, data[1], data[2:6])
        return self._nak()  # unsupported (e.g. nfcpy's AUTHENTICATE probe): NAK, back to idle

    def _nak(self) -> bytes:
        self._state, self._authenticated = "idle", False
        return NAK

    def _locked(self, page: int) -> bool:
        return page >= self._auth0 and not self._authenticated

    def _write(self, tag: NtagImage, page: int, value: bytes) -> bytes | None:
        writable = page in (2, 3) or page in tag.user_pages or page >= tag.config_page
        if not writable or (page != 3 and tag.memory[15] & 0x0F) or self._locked(page):
            return self._nak()
        offset = page * PAGE
        if page == 3:  # capability container: one-time programmable
            value = bytes(
                a | b for a, b in zip(tag.memory[offset : offset + 4], value, strict=True)
            )
        if self.tear_after_bytes is not None and self.tear_after_bytes < PAGE:
            kept = self.tear_after_bytes
            tag.memory[offset : offset + kept] = value[:kept]
            self.tear_after_bytes = None
            self.tag = None  # pulled away mid-write: a garbled frame instead of the ACK
            return b""
        if self.tear_after_bytes is not None:
            self.tear_after_bytes -= PAGE
        tag.memory[offset : offset + PAGE] = value
        self.pages_written.append(page)
        return ACK


class UdpTagSimulator(SimulatorProcess[TagT]):
    """A Type A tag simulator in its own process, with the test hooks every radio here has."""

    # After this many more bytes written the tag leaves the field; the unit being written when
    # it happens keeps only its first bytes, like a real torn write.
    tear_after_bytes: Remote[int | None] = Remote()
    # After this many more commands (after anticollision) the tag leaves the field.
    leave_after_commands: Remote[int | None] = Remote()
    delay: Remote[float] = Remote()  # seconds every reply takes


class NtagSimulator(UdpTagSimulator[NtagImage]):
    """Serves one NTAG21x (or none) on a UDP port from its own process (``tagproc``)."""

    radio = "edge_agent.sim.ntag:NtagRadio"
    late_reads: Remote[int] = Remote()  # this many more READ replies come ``late_by`` late
    late_by: Remote[float] = Remote()
    pages_written: RemoteLog[int] = RemoteLog()
