"""An NTAG213/215/216 tag that nfcpy's ``udp`` reader driver can talk to.

nfcpy can emulate only Type 3 tags itself. This simulator answers the frames nfcpy's udp driver
sends (datagrams ``"106A <hex>"``) with the NTAG21x command set over a memory image:
anticollision (SENS_REQ, SDD/SEL cascade levels 1-2), GET_VERSION, READ (16 bytes, roll-over),
WRITE (one 4-byte page; the CC page is one-time programmable: bits are OR-ed) and NAK for anything
else. So everything above the radio - nfcpy's tag detection, its Type 2 NDEF code and our reader
backend - runs for real.

The radio itself (one bound socket, anticollision, the test hooks) is ``typea.py``'s. A tag can
be presented, removed, or torn away after a given number of written bytes, which is how the tear
test cuts a write short.

``NtagSimulator`` runs the radio (``NtagRadio``) in a process of its own, woken as soon as the
reader sends however busy the reader's process is (``tagproc``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .tagproc import Remote, RemoteLog
from .typea import UdpTagRadio, UdpTagSimulator, anticollision, bcc

PAGE = 4

# kind -> (total pages, CC size byte, GET_VERSION storage byte); from the NTAG213/215/216 datasheet.
KINDS = {
    "NTAG213": (45, 0x12, 0x0F),
    "NTAG215": (135, 0x3E, 0x11),
    "NTAG216": (231, 0x6D, 0x13),
}
SENS_RES = bytes([0x44, 0x00])
SAK_DONE = 0x00
ACK, NAK = b"\x0a", b"\x00"


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
        memory[0:4] = uid[0:3] + bytes([bcc(b"\x88" + uid[0:3])])
        memory[4:8] = uid[3:7]
        memory[8] = bcc(uid[3:7])
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


class NtagSimulator(UdpTagSimulator[NtagImage]):
    """Serves one NTAG21x (or none) on a UDP port from its own process (``tagproc``)."""

    radio = "edge_agent.sim.ntag:NtagRadio"
    late_reads: Remote[int] = Remote()  # this many more READ replies come ``late_by`` late
    late_by: Remote[float] = Remote()
    pages_written: RemoteLog[int] = RemoteLog()
