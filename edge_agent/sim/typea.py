"""The radio of a simulated ISO 14443 Type A tag that nfcpy's ``udp`` reader driver can talk to.

nfcpy's udp driver sends frames as datagrams ``"106A <hex>"``; ``UdpTagRadio`` answers them from
one socket that stays bound for the simulator's lifetime (an emulator built on nfcpy's own listen
loop re-binds per listen and races the reader, field-notes.md), runs the Type A selection
(``anticollision``) and the test hooks every tag here has (leave the field, tear a write, late or
slow replies). A subclass answers the tag's own command set (``ntag.py``, ``type4.py``).
"""

from __future__ import annotations

import functools
import operator
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Generic, Self, TypeVar

from .tagproc import Remote, SimulatorProcess

SAK_CASCADE = 0x04


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


def bcc(data: bytes) -> int:
    return functools.reduce(operator.xor, data, 0)


TagT = TypeVar("TagT")


def anticollision(
    uid: bytes, data: bytes, state: str, sens_res: bytes, sak: int
) -> tuple[str, bytes] | None:
    """ISO 14443-3 Type A selection of a 7-byte UID: (next state, reply), None for any other frame.

    States: idle | ready1 | ready2 | active; ``sak`` is the SEL_RES of the last cascade level.
    """
    cl1 = bytes([0x88]) + uid[0:3] + bytes([bcc(b"\x88" + uid[0:3])])
    cl2 = uid[3:7] + bytes([bcc(uid[3:7])])
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


class UdpTagSimulator(SimulatorProcess[TagT]):
    """A Type A tag simulator in its own process, with the test hooks every radio here has."""

    # After this many more bytes written the tag leaves the field; the unit being written when
    # it happens keeps only its first bytes, like a real torn write.
    tear_after_bytes: Remote[int | None] = Remote()
    # After this many more commands (after anticollision) the tag leaves the field.
    leave_after_commands: Remote[int | None] = Remote()
    delay: Remote[float] = Remote()  # seconds every reply takes
