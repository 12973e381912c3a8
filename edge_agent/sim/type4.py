"""An NFC Forum Type 4 tag (ISO 14443-4 Type A) that nfcpy's ``udp`` reader driver can talk to.

On the Type A radio of ``typea.py`` (one bound socket, frames ``"106A <hex>"``): anticollision with
SAK 0x20 (ISO-DEP), RATS answered by an ATS (FSCI 8: 256-byte frames, FWI 8: ~77 ms), then
ISO-DEP I-blocks (chained commands acknowledged, R(NAK) answered by a resend of the last block or
an R(ACK) for nfcpy's presence check) carrying the NDEF Tag Application's APDUs: SELECT by AID
D2760000850101, SELECT of the CC file E103 and the NDEF file E104, READ BINARY and UPDATE BINARY.
Over udp there is no CRC; nfcpy leaves it to the reader chip.

Test hooks as on the NTAG simulator: take the tag away, leave after N commands, tear an UPDATE
BINARY after N written bytes (the bytes before the cut are in the file, no reply comes back), and
lose answers on the way back (ISO-DEP's R(NAK) recovery).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .tagproc import Remote, RemoteLog
from .typea import UdpTagRadio, UdpTagSimulator, anticollision

NDEF_AID = bytes.fromhex("D2760000850101")
CC_FILE, NDEF_FILE = b"\xe1\x03", b"\xe1\x04"
SENS_RES = bytes([0x44, 0x03])  # 7-byte UID, as ISO-DEP Type A tags answer
SAK_ISO_DEP = 0x20
ATS = bytes([0x05, 0x78, 0x80, 0x80, 0x00])  # TL T0(TA,TB,TC; FSCI 8) TA TB(FWI 8) TC
MAX_APDU = 0xF0  # MLe and MLc: a response and a command each fit one 256-byte frame
OK = b"\x90\x00"
NOT_FOUND, DENIED, WRONG_P1P2, BAD_INS = b"\x6a\x82", b"\x69\x82", b"\x6b\x00", b"\x6d\x00"


@dataclass
class Type4Image:
    """One Type 4 tag: its UID, the NDEF file (2-byte NLEN, then the message) and its access."""

    uid: bytes
    ndef_file: bytearray
    read_only: bool = False

    @classmethod
    def blank(cls, uid: bytes, size: int = 1024) -> Type4Image:
        """A formatted tag with an empty NDEF file of ``size`` bytes (NLEN included)."""
        if len(uid) != 7:
            raise ValueError(f"a Type 4 UID here is 7 bytes, got {len(uid)}")
        if not 3 <= size <= 0x7FFF:
            raise ValueError(f"an NDEF file is 3 to 32767 bytes, got {size}")
        return cls(uid, bytearray(size))

    @property
    def capacity(self) -> int:
        return len(self.ndef_file) - 2

    def cc_file(self) -> bytes:
        """CCLEN, mapping version 2.0, MLe, MLc, NDEF File Control TLV (id, size, read, write)."""
        size = len(self.ndef_file).to_bytes(2)
        write = b"\xff" if self.read_only else b"\x00"
        mle = mlc = MAX_APDU.to_bytes(2)
        return b"\x00\x0f\x20" + mle + mlc + b"\x04\x06" + NDEF_FILE + size + b"\x00" + write

    def put_ndef(self, message: bytes) -> None:
        if len(message) > self.capacity:
            raise ValueError(f"{len(message)} bytes do not fit an NDEF file of {self.capacity}")
        self.ndef_file[:] = bytes(len(self.ndef_file))
        self.ndef_file[0 : 2 + len(message)] = len(message).to_bytes(2) + message

    def ndef_message(self) -> bytes:
        return bytes(self.ndef_file[2 : 2 + int.from_bytes(self.ndef_file[0:2])])

    def make_read_only(self) -> None:
        self.read_only = True


class Type4Simulator(UdpTagSimulator[Type4Image]):
    """Serves one Type 4 tag (or none) on a UDP port from its own process (``tagproc``)."""

    radio = "edge_agent.sim.type4:Type4Radio"
    lose_answers: Remote[int] = Remote()  # this many more I-block answers are lost
    updates: RemoteLog[tuple[int, int]] = RemoteLog()  # (offset, length) of each UPDATE BINARY


@dataclass
class Type4Radio(UdpTagRadio[Type4Image]):
    """The Type 4 tag's radio, run in the simulator's process."""

    # Tests: (offset, length) of every UPDATE BINARY that reached the NDEF file.
    updates: list[tuple[int, int]] = field(default_factory=list)
    # Tests: this many more I-block answers are lost on the way back (the command took effect):
    # nfcpy times out, sends R(NAK) and gets the same answer again.
    lose_answers: int = 0
    _app: bool = False  # the NDEF application is selected
    _file: bytes = b""  # the selected elementary file
    _block: int = 1  # ISO-DEP block number of our last I-block
    _last: bytes = b""  # that block, resent on R(NAK)
    _chain: bytes = b""  # the first parts of a chained command

    def _reset(self) -> None:
        self._app, self._file, self._block, self._last, self._chain = False, b"", 1, b"", b""

    def _command(self, tag: Type4Image, data: bytes) -> bytes | None:
        step = anticollision(tag.uid, data, self._state, SENS_RES, SAK_ISO_DEP)
        if step is not None:
            self._state, reply = step
            self._reset()
            return reply
        if self._state == "active" and data[:1] == b"\xe0":  # RATS
            self._state = "protocol"
            return ATS
        if self._state != "protocol" or not data:
            return None  # not activated: silent
        if self._leaving():
            return b""
        pcb, number = data[0], data[0] & 1
        if pcb & 0xF6 == 0xB2:  # R(NAK): our last block was lost, or a presence check
            if number == self._block and self._last:
                return self._last
            return bytes([0xA2 | self._block])
        if pcb & 0xE6 != 0x02:
            return None  # S-blocks (DESELECT, WTX) and anything else: not supported, silent
        self._block = number
        if pcb & 0x10:  # chaining: more of this command follows
            self._chain += data[1:]
            return bytes([0xA2 | number])
        apdu, self._chain = self._chain + data[1:], b""
        response = self._apdu(tag, apdu)
        if response is None:
            return b""  # torn away mid-UPDATE: a garbled frame instead of the answer
        self._last = bytes([0x02 | number]) + response
        if self.lose_answers > 0:
            self.lose_answers -= 1
            return None
        return self._last

    def _apdu(self, tag: Type4Image, apdu: bytes) -> bytes | None:
        if len(apdu) < 4 or apdu[0] != 0x00:
            return BAD_INS
        ins, p1, p2, body = apdu[1], apdu[2], apdu[3], apdu[4:]
        lc = body[0] if body else 0
        data = body[1 : 1 + lc]
        if ins == 0xA4 and p1 == 0x04:  # SELECT by name
            self._app, self._file = data == NDEF_AID, b""
            return OK if self._app else NOT_FOUND
        if ins == 0xA4 and p1 == 0x00:  # SELECT by file id
            found = self._app and data in (CC_FILE, NDEF_FILE)
            self._file = data if found else b""
            return OK if found else NOT_FOUND
        if not self._file:
            return DENIED
        content = tag.cc_file() if self._file == CC_FILE else tag.ndef_file
        offset = p1 << 8 | p2
        if ins == 0xB0:  # READ BINARY, Le 0 meaning 256
            if offset > len(content):
                return WRONG_P1P2
            le = (body[0] or 256) if body else 256
            return bytes(content[offset : offset + le]) + OK
        if ins == 0xD6:  # UPDATE BINARY
            if self._file == CC_FILE or tag.read_only:
                return DENIED
            if offset + len(data) > len(content):
                return WRONG_P1P2
            return self._update(tag, offset, data)
        return BAD_INS

    def _update(self, tag: Type4Image, offset: int, data: bytes) -> bytes | None:
        if self.tear_after_bytes is not None and self.tear_after_bytes < len(data):
            kept = self.tear_after_bytes
            tag.ndef_file[offset : offset + kept] = data[:kept]
            self.tear_after_bytes = None
            self.tag = None
            return None
        if self.tear_after_bytes is not None:
            self.tear_after_bytes -= len(data)
        tag.ndef_file[offset : offset + len(data)] = data
        self.updates.append((offset, len(data)))
        return OK
