"""The daemon's NFC reader through nfcpy.

nfcpy is blocking, so one thread owns the reader: it opens the device (``link.Link`` retries with
capped backoff while it is absent), senses, activates the tag in the field, holds it while it stays and
serves ReadTag/WriteTag requests from the event loop through a queue. Results and scan events go
back with ``call_soon_threadsafe``. Tag I/O never happens outside that thread.

Presence: a tag arriving gives one ARRIVED event; while it stays in the field nothing more; when
it leaves, one LEFT. A tag presented again is a new presence (same UID, whatever progress it has).

The tag operations themselves (read, tear-safe write-back, presence) are in ``tags.py``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import select
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from ...errors import TagIOError
from ...link import Link
from ...messages import uid_hex
from ..reader import ScanEvent, ScanKind, TagReader
from .tags import (
    _kind,
    _present,
    _tag_errors,
    _why,
    authenticate,
    read_message,
    sense,
    write_message,
)

log = structlog.get_logger("reader.nfc")

Opener = Callable[[str], Any]  # device path -> an open nfc.ContactlessFrontend

# Seconds a udp "reader chip" waits for a reply at least. A chip times the air interface, so a
# host busy elsewhere never makes a tag late; over udp the host's scheduler is the air, and on a
# loaded machine a loopback round trip to an idle process took up to 140 ms (p99 12 ms).
UDP_REPLY_WAIT = 0.25


def open_frontend(device: str) -> Any:
    import nfc

    clf = nfc.ContactlessFrontend(device)
    if device.startswith("udp"):
        _one_reply_per_command(clf.device)
    return clf


def _one_reply_per_command(device: Any) -> None:
    """Make nfcpy's udp transport as synchronous as a reader chip.

    The udp driver pairs replies with commands by order only. When a command times out, nfcpy
    sends it again; a late reply to the first copy then comes with the reply to the second, and
    the spare is taken as the reply to the next command, shifting every later READ by one (seen
    on a loaded machine). Dropping what is queued before each command is not enough: the spare
    can land just after the next command went out. So a retry is not sent again: it waits on
    for the reply to the copy already sent, one reply per command. Whatever is still queued
    before a new command or a sense is stale.

    nfcpy's timeouts are air-interface times (a Type 2 READ 5 ms, GET_VERSION 10 ms); a real
    reader keeps them whatever the host does. Here each wait is at least ``UDP_REPLY_WAIT``, so a
    tag is taken for gone only when it does not answer, not when the machine is busy.
    """
    import nfc.clf

    send = device.send_cmd_recv_rsp
    unanswered: list[Any] = [None]  # the command that timed out, until it is answered

    def drain() -> None:
        sock = device.socket
        while sock is not None and select.select([sock], [], [], 0)[0]:
            sock.recv(1024)

    def send_cmd_recv_rsp(target: Any, data: Any, timeout: float) -> Any:
        retry = data is not None and data == unanswered[0]
        if data is not None and not retry:
            drain()
        unanswered[0] = None
        try:
            return send(target, None if retry else data, max(timeout, UDP_REPLY_WAIT))
        except nfc.clf.TimeoutError:
            unanswered[0] = data
            raise

    def sensing(sense: Any) -> Any:
        def sense_target(target: Any) -> Any:
            unanswered[0] = None  # a new activation: nothing before it is waited for
            drain()
            return sense(target)

        return sense_target

    device.send_cmd_recv_rsp = send_cmd_recv_rsp
    for name in ("sense_tta", "sense_ttb", "sense_ttf"):
        setattr(device, name, sensing(getattr(device, name)))


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
            raise TagIOError(f"tag {uid_hex(uid)} is not in the field of reader {self.name}")
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
        while not self._stopping.is_set():
            self._fail_pending("no tag in the field")
            tag = sense(clf, self.targets, self._idle)
            if tag is not None:
                self._hold(tag)

    def _idle(self) -> bool:
        """Between two senses: wait the poll interval; True when the reader is stopping."""
        stopping = self._stopping.wait(self.poll_interval)
        if not stopping:
            self._fail_pending("no tag in the field")
        return stopping

    def _hold(self, tag: Any) -> None:
        """One presence: ARRIVED, serve requests while the tag stays, LEFT."""
        uid = bytes(tag.identifier)
        capacity = 0
        self._fresh = None
        if self.password is not None and not authenticate(tag, self.password):
            log.warning(
                "tag password not accepted; its protected pages cannot be written",
                reader=self.name,
                uid=uid_hex(uid),
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
        uid = uid_hex(request.uid)
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
            uid = uid_hex(request.uid)
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
