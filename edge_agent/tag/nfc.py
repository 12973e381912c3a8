"""NFC readers through nfcpy: ``reader: {type: nfc, device: usb | usb:VID:PID | tty:USB0:pn532 | udp:HOST:PORT}``.

nfcpy is blocking, so one thread owns the reader: it opens the device (``link.Link`` retries with
capped backoff while it is absent), senses, activates the tag in the field, holds it while it stays and
serves ReadTag/WriteTag requests from the event loop through a queue. Results and scan events go
back with ``call_soon_threadsafe``. Tag I/O never happens outside that thread.

Presence: a tag arriving gives one ARRIVED event; while it stays in the field nothing more; when
it leaves, one LEFT. A tag presented again is a new presence (same UID, whatever progress it has).

Write-back on Type 2 tags (NTAG21x, Ultralight): when the new message has the length of the one
on the tag, only the 4-byte pages that differ are written, and the NDEF TLV length is never touched
(nfcpy's own NDEF write zeroes it first, which a tear would leave as an empty tag). The pages
written are read back and compared. Type 3 (FeliCa) tags likewise get only the 16-byte blocks that
differ, with the attribute block left alone, and Type 4 tags an UPDATE BINARY per run of differing
bytes, with NLEN left alone. Other writes go through nfcpy's NDEF write and a full read-back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import select
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from ..errors import TagIOError
from ..link import Link
from .reader import ScanEvent, ScanKind, TagReader

log = structlog.get_logger("reader.nfc")

Opener = Callable[[str], Any]  # device path -> an open nfc.ContactlessFrontend


def open_frontend(device: str) -> Any:
    import nfc

    clf = nfc.ContactlessFrontend(device)
    if device.startswith("udp"):
        _drop_stale_replies(clf.device)
    return clf


def _drop_stale_replies(device: Any) -> None:
    """Make nfcpy's udp transport as synchronous as a reader chip.

    The udp driver pairs replies with commands by order only: a reply that arrives after its command
    timed out and was retried stays queued and is taken as the reply to the next command, shifting
    every later READ by one (seen on a loaded machine). A reader chip never does that. Before each
    command, whatever is still queued is stale and dropped.
    """
    send = device.send_cmd_recv_rsp

    def send_cmd_recv_rsp(target: Any, data: Any, timeout: float) -> Any:
        sock = device.socket
        if sock is not None and data is not None:
            while select.select([sock], [], [], 0)[0]:
                sock.recv(1024)
        return send(target, data, timeout)

    device.send_cmd_recv_rsp = send_cmd_recv_rsp


@dataclass
class _Request:
    uid: bytes
    run: Callable[[Any], Any]  # gets the nfcpy tag, runs in the reader thread
    future: concurrent.futures.Future[Any]


class NfcReader(TagReader):
    def __init__(
        self,
        name: str = "nfc",
        device: str = "usb",
        *,
        targets: tuple[str, ...] = ("106A", "106B", "212F"),
        poll_interval: float = 0.1,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        password: bytes | None = None,
        opener: Opener = open_frontend,
    ) -> None:
        self.name = name
        self.password = password  # NTAG21x PWD (4 bytes) + PACK (2 bytes) of protected tags
        self.device = device
        self.targets = targets
        self.poll_interval = poll_interval
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._opener = opener
        self._link = Link(
            "nfc reader",
            device,
            backoff_min,
            backoff_max,
            logger=log,
            context=lambda: {"reader": name},
        )
        self._events: asyncio.Queue[ScanEvent | None] = asyncio.Queue()
        self._requests: queue.Queue[_Request] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._present: bytes | None = None  # UID of the tag held in the field
        self._fresh: bytes | None = None  # the NDEF read at arrival, until the first write
        self.connected = threading.Event()  # the device is open (tests, health)
        self.last_write_pages: list[int] = []  # pages written by the last write (tests, benchmark)

    # ------------------------------------------------------------------ TagReader

    async def start(self) -> None:
        try:
            import nfc  # noqa: F401  (here, not in the thread: a missing library is fatal at once)
        except ImportError as err:
            raise TagIOError(
                f"reader {self.name}: nfcpy is not installed (pip install 'edge-agent[nfc]')"
            ) from err
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"nfc-{self.name}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            # Every blocking nfcpy call in the thread is bounded (poll interval, frame timeouts).
            await asyncio.to_thread(self._thread.join, 5.0)
            if self._thread.is_alive():
                log.warning("nfc reader thread did not stop in time", reader=self.name)
        self._fail_pending("the reader is stopping")
        self._events.put_nowait(None)

    async def events(self) -> AsyncIterator[ScanEvent]:
        while (event := await self._events.get()) is not None:
            yield event

    async def read_ndef(self, uid: bytes) -> bytes:
        result: bytes = await self._call(uid, self._read)
        return result

    async def write_ndef(self, uid: bytes, message: bytes, previous: bytes | None = None) -> None:
        await self._call(uid, lambda tag: self._write(tag, message, previous))

    async def _call(self, uid: bytes, run: Callable[[Any], Any]) -> Any:
        if self._stopping.is_set():
            raise TagIOError(f"reader {self.name} is stopped")
        if self._present != uid:
            raise TagIOError(f"tag {uid.hex().upper()} is not in the field of reader {self.name}")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._requests.put(_Request(uid, run, future))
        return await asyncio.wrap_future(future)

    # ------------------------------------------------------------------ the reader thread

    def _run(self) -> None:
        self._link.run_blocking(self._session, self._stopping)

    def _session(self) -> None:
        """Open the reader and scan until it fails; the link logs and paces the attempts."""
        clf = self._opener(self.device)
        try:
            self._link.up()
            self.connected.set()
            self._scan(clf)
        except OSError:  # unplugged: nfcpy's drivers raise IOError from the device
            raise
        except Exception:  # a bug here or in nfcpy must not end the thread: reopen and go on
            log.exception("nfc reader failed; reopening", reader=self.name, device=self.device)
            raise
        finally:
            self.connected.clear()
            self._leave()
            self._fail_pending(f"reader {self.name} ({self.device}) is not available")
            with contextlib.suppress(Exception):
                clf.close()

    def _scan(self, clf: Any) -> None:
        import nfc.clf
        import nfc.tag

        targets = [nfc.clf.RemoteTarget(brty) for brty in self.targets]
        while not self._stopping.is_set():
            self._fail_pending("no tag in the field")
            target = clf.sense(*targets, iterations=1)
            tag = nfc.tag.activate(clf, target) if target is not None else None
            if tag is None:
                self._stopping.wait(self.poll_interval)
                continue
            self._hold(tag)

    def _hold(self, tag: Any) -> None:
        """One presence: ARRIVED, serve requests while the tag stays, LEFT."""
        uid = bytes(tag.identifier)
        capacity = 0
        self._fresh = None
        if self.password is not None and not authenticate(tag, self.password):
            log.warning(
                "tag password not accepted; its protected pages cannot be written",
                reader=self.name,
                uid=uid.hex().upper(),
            )
        with contextlib.suppress(*_tag_errors()):
            # Read once at arrival: the cycle's ReadTag comes right after and can use it.
            if tag.ndef is not None and tag.ndef.is_readable:
                self._fresh, capacity = bytes(tag.ndef.octets), tag.ndef.capacity
        self._present = uid
        self._emit(ScanEvent(uid, ScanKind.ARRIVED, self.name, time.time(), _kind(tag), capacity))
        try:
            while not self._stopping.is_set():
                try:
                    request = self._requests.get(timeout=self.poll_interval)
                except queue.Empty:
                    if not _present(tag):
                        return
                    continue
                if self._serve(tag, request) and not _present(tag):
                    return
        finally:
            self._leave()

    def _leave(self) -> None:
        uid, self._present, self._fresh = self._present, None, None
        if uid is not None:
            self._emit(ScanEvent(uid, ScanKind.LEFT, self.name, time.time()))

    def _serve(self, tag: Any, request: _Request) -> bool:
        """Run one request; True when it failed (the caller then checks the tag is still there)."""
        if not request.future.set_running_or_notify_cancel():
            return False  # the caller gave up (cancelled) before the thread got to it
        uid = request.uid.hex().upper()
        try:
            if request.uid != self._present:
                raise TagIOError(f"tag {uid} is not in the field of reader {self.name}")
            result = request.run(tag)
        except TagIOError as err:
            _resolve(request.future, error=err)
            return True
        except _tag_errors() as err:
            error = TagIOError(f"tag {uid} on reader {self.name} ({self.device}): {_why(err)}")
            error.__cause__ = err
            _resolve(request.future, error=error)
            return True
        except OSError as err:
            _resolve(request.future, error=TagIOError(f"reader {self.name} lost: {err}"))
            raise
        _resolve(request.future, result=result)
        return False

    def _fail_pending(self, why: str) -> None:
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            uid = request.uid.hex().upper()
            _resolve(request.future, error=TagIOError(f"tag {uid}: {why}"))

    def _emit(self, event: ScanEvent) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closed between the check and the call
                self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    # ------------------------------------------------------------------ ReadTag / WriteTag

    def _read(self, tag: Any) -> bytes:
        if self._fresh is not None:
            data, self._fresh = self._fresh, None
            return data
        return read_message(tag)

    def _write(self, tag: Any, message: bytes, previous: bytes | None) -> None:
        self._fresh = None
        self.last_write_pages = write_message(tag, message, previous)


# ---------------------------------------------------------------------- tag I/O (in nfcpy's thread)


def ndef_area(tag: Any, *, fresh: bool) -> Any:
    """nfcpy's NDEF object of ``tag`` (``fresh``: read from the tag again), or TagIOError saying why not."""
    uid = bytes(tag.identifier).hex().upper()
    if fresh:
        tag._ndef = None  # nfcpy caches the NDEF area; force a read from the tag
    ndef = tag.ndef
    if ndef is None and not _present(tag):
        raise TagIOError(f"tag {uid} left the field during the read")
    if ndef is None:
        raise TagIOError(
            f"tag {uid} ({_kind(tag)}) holds no NDEF data area: not formatted "
            "(edge-agent tag write formats it) or not readable"
        )
    if not ndef.is_readable:
        raise TagIOError(f"tag {uid} ({_kind(tag)}): NDEF area is read-protected")
    return ndef


def authenticate(tag: Any, password: bytes) -> bool:
    """NTAG21x PWD_AUTH with ``password`` (PWD + PACK); False if refused or not an NTAG21x."""
    if len(password) != 6 or not hasattr(tag, "authenticate") or not hasattr(tag, "_cfgpage"):
        return False
    try:
        if tag.authenticate(password):
            return True
        # A refused PWD_AUTH is NAKed and leaves the tag idle: select it again to go on reading.
        tag._target = tag.clf.sense(tag.target)
    except _tag_errors():
        pass
    return False


def read_message(tag: Any) -> bytes:
    return bytes(ndef_area(tag, fresh=True).octets)


def write_message(tag: Any, message: bytes, previous: bytes | None = None) -> list[int]:
    """Write ``message`` and verify it by reading back.

    Returns the Type 2 pages, Type 3 blocks or Type 4 NDEF file offsets written; empty for a full
    NDEF write.
    """
    import nfc.tag.tt2
    import nfc.tag.tt3
    import nfc.tag.tt4

    uid = bytes(tag.identifier).hex().upper()
    ndef = ndef_area(tag, fresh=False)
    if not ndef.is_writeable:
        raise TagIOError(f"tag {uid} ({_kind(tag)}) is read-only")
    if len(message) > ndef.capacity:
        raise TagIOError(
            f"tag {uid} ({_kind(tag)}) holds {ndef.capacity} bytes, the message has "
            f"{len(message)} ({len(message) - ndef.capacity} over)"
        )
    on_tag = bytes(ndef.octets)
    if (
        isinstance(tag, nfc.tag.tt2.Type2Tag)
        and len(on_tag) == len(message)
        and (previous is None or previous == on_tag)
    ):
        try:
            pages = _write_changed_pages(ndef, message)
        except nfc.tag.TagCommandError as err:
            _explain_refused_write(tag, err)
            raise
        expected = bytes(ndef._tag_memory[: len(ndef._tag_memory)])
        for first in sorted({p - p % 4 for p in pages}):  # READ returns 4 pages
            if bytes(tag.read(first)) != expected[first * 4 : first * 4 + 16]:
                raise TagIOError(f"tag {uid}: read-back of pages {first}-{first + 3} differs")
        ndef._data = bytearray(message)
        return pages
    if (
        isinstance(tag, nfc.tag.tt3.Type3Tag)
        and len(on_tag) == len(message)
        and (previous is None or previous == on_tag)
    ):
        blocks = _write_changed_blocks(tag, on_tag, message)
        ndef._data = bytearray(message)
        return blocks
    if (
        isinstance(tag, nfc.tag.tt4.Type4Tag)
        and len(on_tag) == len(message)
        and (previous is None or previous == on_tag)
    ):
        offsets = _write_changed_bytes(ndef, on_tag, message)
        ndef._data = bytearray(message)
        return offsets
    ndef.octets = message
    if bytes(ndef_area(tag, fresh=True).octets) != message:
        raise TagIOError(f"tag {uid}: the NDEF message read back differs from the one written")
    return []


_CC_SIZE = {"NTAG213": 0x12, "NTAG215": 0x3E, "NTAG216": 0x6D}  # CC byte 2: data area / 8


class TagSession:
    """One tag on one reader, blocking: for the ``edge-agent tag`` commands, not the daemon."""

    def __init__(
        self,
        device: str,
        timeout: float = 10.0,
        targets: tuple[str, ...] = ("106A", "106B", "212F"),
        opener: Opener = open_frontend,
        password: bytes | None = None,
    ) -> None:
        self.device, self.timeout, self.targets, self._opener = device, timeout, targets, opener
        self.password = password
        self.tag: Any = None
        self._clf: Any = None

    def __enter__(self) -> TagSession:
        try:
            import nfc.clf
            import nfc.tag
        except ImportError as err:
            raise TagIOError("nfcpy is not installed (pip install 'edge-agent[nfc]')") from err
        try:
            self._clf = self._opener(self.device)
        except (OSError, ValueError, TypeError) as err:
            raise TagIOError(f"no reader at {self.device}: {err}") from err
        targets = [nfc.clf.RemoteTarget(brty) for brty in self.targets]
        deadline = time.monotonic() + self.timeout
        while self.tag is None:
            target = self._clf.sense(*targets, iterations=1)
            self.tag = nfc.tag.activate(self._clf, target) if target is not None else None
            if self.tag is None:
                if time.monotonic() > deadline:
                    self._clf.close()
                    raise TagIOError(f"no tag on {self.device} within {self.timeout:g} s")
                time.sleep(0.05)
        if self.password is not None and not authenticate(self.tag, self.password):
            self._clf.close()
            raise TagIOError(f"tag {self.uid.hex().upper()} ({self.kind}): password not accepted")
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self._clf.close()

    @property
    def uid(self) -> bytes:
        return bytes(self.tag.identifier)

    @property
    def kind(self) -> str:
        return _kind(self.tag)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except _tag_errors() as err:
            raise TagIOError(f"tag {self.uid.hex().upper()} on {self.device}: {_why(err)}") from err

    def formatted(self) -> bool:
        with self._errors():
            self.tag._ndef = None
            return self.tag.ndef is not None

    def capacity(self) -> int:
        with self._errors():
            return int(ndef_area(self.tag, fresh=False).capacity)

    def format(self) -> None:
        """Give a blank or foreign-formatted tag an empty NDEF area (CC written if it has none)."""
        with self._errors():
            cc_size = _CC_SIZE.get(self.kind)
            if not self.formatted() and cc_size is not None and self.tag.read(3)[:4] == bytes(4):
                self.tag.write(3, bytes([0xE1, 0x10, cc_size, 0x00]))
            if not self.tag.format() or not self.formatted():
                raise TagIOError(
                    f"tag {self.uid.hex().upper()} ({self.kind}) cannot be NDEF formatted"
                )

    def protect(self, password: bytes) -> None:
        """Require ``password`` (PWD + PACK) to write pages 4 and up (NTAG21x only)."""
        if not hasattr(self.tag, "_cfgpage"):
            raise TagIOError(
                f"tag {self.uid.hex().upper()} ({self.kind}) has no password protection"
            )
        with self._errors():
            if not self.tag.protect(password, read_protect=False, protect_from=4):
                raise TagIOError(f"tag {self.uid.hex().upper()}: setting the password failed")

    def read(self) -> bytes:
        with self._errors():
            return read_message(self.tag)

    def write(self, message: bytes, previous: bytes | None = None) -> list[int]:
        with self._errors():
            return write_message(self.tag, message, previous)


def _explain_refused_write(tag: Any, err: Exception) -> None:
    """A NAKed WRITE on an NTAG21x is often password protection: say so when AUTH0 shows it."""
    import nfc.tag.tt2

    if getattr(err, "errno", None) != nfc.tag.tt2.INVALID_PAGE_ERROR or not hasattr(
        tag, "_cfgpage"
    ):
        return
    try:
        tag._target = tag.clf.sense(tag.target)  # the NAK left the tag idle: select it again
        auth0 = tag.read(tag._cfgpage)[3] if tag.target else 0xFF
    except _tag_errors():
        return
    if auth0 < tag._cfgpage:
        uid = bytes(tag.identifier).hex().upper()
        raise TagIOError(
            f"tag {uid} ({_kind(tag)}) is password-protected from page {auth0}: "
            "give the reader its password (reader.password / --password)"
        ) from err


def _write_changed_pages(ndef: Any, message: bytes) -> list[int]:
    """Put ``message`` into the NDEF TLV's value (length unchanged) and write the pages that differ.

    Uses nfcpy's own memory image of the tag from the last read (TLV offset, lock/reserved bytes to
    skip) and its page-diffing ``synchronize``.
    """
    memory = ndef._tag_memory
    skip = ndef._skip_bytes
    offset = ndef._ndef_tlv_offset + (2 if len(message) < 255 else 4)
    changed: set[int] = set()
    for index, octet in enumerate(message):
        while offset + index in skip:
            offset += 1
        if memory[offset + index] != octet:
            memory[offset + index] = octet
            changed.add((offset + index) // 4)
    memory.synchronize()
    return sorted(changed)


def _write_changed_blocks(tag: Any, on_tag: bytes, message: bytes) -> list[int]:
    """Type 3: write the 16-byte data blocks that differ, one Update each, and read them back.

    The attribute block (length, WriteFlag) is left alone: nfcpy's NDEF write raises WriteFlag
    first and clears it last, so a tear in between leaves the tag unreadable. A FeliCa block
    write is all or nothing, so a tear leaves each block old or new.
    """
    padded_old = on_tag + bytes(-len(on_tag) % 16)
    padded_new = message + bytes(-len(message) % 16)
    blocks = [
        1 + i // 16
        for i in range(0, len(padded_new), 16)
        if padded_new[i : i + 16] != padded_old[i : i + 16]
    ]
    for block in blocks:
        tag.write_to_ndef_service(padded_new[(block - 1) * 16 : block * 16], block)
    if blocks:
        # One block per Check: any tag's Nbr allows it, and a progress update changes two or three.
        back = b"".join(bytes(tag.read_from_ndef_service(block)) for block in blocks)
        if back != b"".join(padded_new[(b - 1) * 16 : b * 16] for b in blocks):
            uid = bytes(tag.identifier).hex().upper()
            raise TagIOError(f"tag {uid}: read-back of blocks {blocks[0]}-{blocks[-1]} differs")
    return blocks


def _write_changed_bytes(ndef: Any, on_tag: bytes, message: bytes) -> list[int]:
    """Type 4: UPDATE BINARY each run of bytes that differs, then READ BINARY the runs back.

    NLEN is never touched: nfcpy's NDEF write of a message longer than MLc zeroes it first and
    sets it last, so a tear in between leaves an empty tag. Returns the NDEF file offsets written.
    """
    runs: list[tuple[int, int]] = []  # (start, end) in the message
    for i, (old, new) in enumerate(zip(on_tag, message, strict=True)):
        if old != new:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
    if not runs:
        return []
    uid = bytes(ndef.tag.identifier).hex().upper()
    if not ndef._select_fid(ndef._ndef_file):
        raise TagIOError(f"tag {uid}: the NDEF file cannot be selected for writing")
    base = ndef._nlen_size  # the message follows NLEN in the NDEF file
    for start, end in runs:
        while start < end:  # _update_binary writes at most MLc bytes per APDU
            start += ndef._update_binary(base + start, message[start:end])
    for start, end in runs:
        back = b""
        while len(back) < end - start:
            chunk = bytes(ndef._read_binary(base + start + len(back), end - start - len(back)))
            if not chunk:
                break
            back += chunk
        if back != message[start:end]:
            where = f"{base + start}-{base + end - 1}"
            raise TagIOError(f"tag {uid}: read-back of NDEF file bytes {where} differs")
    return [base + i for start, end in runs for i in range(start, end)]


def _present(tag: Any) -> bool:
    import nfc.tag.tt2

    try:
        if isinstance(tag, nfc.tag.tt2.Type2Tag):
            # One READ of page 0 with nfcpy's short read timeout: ~15 ms to notice a tag is gone,
            # where tag.is_present waits 3 x 100 ms and logs a warning for a garbled frame.
            return len(tag.read(0)) == 16
        return bool(tag.is_present)
    except _tag_errors():
        return False


def _tag_errors() -> tuple[type[BaseException], ...]:
    import nfc.clf
    import nfc.tag

    # RuntimeError: nfcpy's Type 2 transceive raises it for a broken link it does not classify.
    return (
        nfc.tag.TagCommandError,
        nfc.clf.CommunicationError,
        RuntimeError,
        AttributeError,
        ValueError,
    )


def _why(err: BaseException) -> str:
    import nfc.tag

    if isinstance(err, nfc.tag.TagCommandError):
        return f"tag command failed ({err}); was the tag moved away?"
    return str(err) or type(err).__name__


def _kind(tag: Any) -> str:
    product = str(getattr(tag, "product", "") or tag.type)
    return product.removeprefix("NXP ")


def _resolve(
    future: concurrent.futures.Future[Any],
    *,
    result: Any = None,
    error: BaseException | None = None,
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
