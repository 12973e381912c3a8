"""Industrial RFID readers behind OPC UA (OPC 30010 AutoID): ``reader: {type: autoid, url: opc.tcp://...}``.

Scan results come from ``AutoIdScanEventType`` events of the reader object (the ScanResult's ScanData
is the tag identifier) and from a subscription to its ``LastScanData`` (the identifier, empty when the
field is empty, which is how a tag leaving is seen); ReadTag/WriteTag are called on the user memory region. The NDEF message sits in
that region as a 2-byte big-endian length followed by the message. A write-back of a message with
the same length writes only the span of bytes that differ from ``previous`` (one progress slot), then
reads that span back. A status other than SUCCESS is a TagIOError naming the status.

The connection is supervised (``link.Link``): absent or lost, the reader is retried with capped
backoff (WARNING once, DEBUG after, INFO when recovered); a tag in the field when the link drops
gets its LEFT event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Any, Literal

import structlog
from pydantic import Field

from ..errors import TagIOError
from ..link import Link
from ..messages import uid_hex
from .reader import ReaderSettings, ScanEvent, ScanKind, TagReader

log = structlog.get_logger("reader.autoid")


class AutoIdSettings(ReaderSettings):
    """``reader: {type: autoid, url: opc.tcp://...}``: an RFID reader behind OPC UA (OPC 30010
    AutoID); docs/readers.md."""

    type: Literal["autoid"]
    name: str = "autoid"
    url: str = Field(pattern=r"^opc\.tcp://")
    region: int = Field(3, ge=0, le=65535)  # memory region holding the NDEF message (3: USER)
    timeout: float = Field(4.0, gt=0, le=60)
    backoff_max: float = Field(30.0, gt=0, le=600)


SETTINGS_MODEL = AutoIdSettings


def create(settings: AutoIdSettings | Mapping[str, Any]) -> AutoIdReader:
    """The reader, not connected: asyncua itself is imported when it connects."""
    if not isinstance(settings, AutoIdSettings):
        settings = AutoIdSettings.model_validate(dict(settings))
    return AutoIdReader(
        settings.name,
        settings.url,
        region=settings.region,
        timeout=settings.timeout,
        backoff_max=settings.backoff_max,
    )


NAMESPACE = "http://opcfoundation.org/UA/AutoID/"
LENGTH_PREFIX = 2
STATUS_NAMES = [
    "SUCCESS",
    "MISC_ERROR_TOTAL",
    "MISC_ERROR_PARTIAL",
    "PERMISSON_ERROR",
    "PASSWORD_ERROR",
    "REGION_NOT_FOUND_ERROR",
    "OP_NOT_POSSIBLE_ERROR",
    "OUT_OF_RANGE_ERROR",
    "NO_IDENTIFIER",
    "MULTIPLE_IDENTIFIERS",
    "READ_ERROR",
    "DECODING_ERROR",
    "MATCH_ERROR",
    "CODE_NOT_SUPPORTED",
    "WRITE_ERROR",
]


def status_name(status: int) -> str:
    name = STATUS_NAMES[status] if 0 <= status < len(STATUS_NAMES) else "status"
    return f"{name} ({status})"


class _ScanHandler:
    """asyncua subscription handler: AutoIdScanEvents and LastScanData changes become scan events."""

    def __init__(self, reader: AutoIdReader) -> None:
        self.reader = reader

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        value = data.monitored_item.Value
        self.reader._last_scan_data(bytes(val or b""), getattr(value, "SourceTimestamp", None))

    def event_notification(self, event: Any) -> None:
        self.reader._scan_event(getattr(event, "ScanResult", None), getattr(event, "Time", None))


class AutoIdReader(TagReader):
    def __init__(
        self,
        name: str = "autoid",
        url: str = "opc.tcp://localhost:4840",
        *,
        region: int = 3,
        timeout: float = 4.0,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        watch_interval: float = 1.0,
    ) -> None:
        self.name, self.url, self.region, self.timeout = name, url, region, timeout
        self.backoff_min, self.backoff_max, self.watch_interval = (
            backoff_min,
            backoff_max,
            watch_interval,
        )
        self._link = Link(
            "autoid reader",
            url,
            backoff_min,
            backoff_max,
            logger=log,
            context=lambda: {"reader": name},
        )
        self._events: asyncio.Queue[ScanEvent | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._reader: Any = None  # the RfidReader object node while connected
        self._methods: dict[str, Any] = {}
        self._present: bytes | None = None
        self._cleared_at: datetime | None = None  # server time LastScanData last became empty
        self.connected = asyncio.Event()

    async def start(self) -> None:
        try:
            import asyncua  # noqa: F401  (a missing library is fatal at once, not retried)
        except ImportError as err:
            raise TagIOError(
                f"reader {self.name}: asyncua is not installed (pip install 'edge-agent[opcua]')"
            ) from err
        self._task = asyncio.create_task(self._supervise(), name=f"autoid-{self.name}")

    async def stop(self) -> None:
        self._link.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._events.put_nowait(None)

    async def events(self) -> AsyncIterator[ScanEvent]:
        while (event := await self._events.get()) is not None:
            yield event

    # ------------------------------------------------------------------ the link

    async def _supervise(self) -> None:
        await self._link.run(self._session)

    async def _session(self) -> None:
        """Connect, subscribe, then read every watch interval until the link fails."""
        from asyncua import Client

        client = Client(self.url, timeout=self.timeout)
        try:
            await client.connect()
            idx = await client.get_namespace_index(NAMESPACE)
            reader = await client.nodes.objects.get_child(f"{idx}:RfidReader")
            last_scan = await reader.get_child(f"{idx}:LastScanData")
            self._methods = {
                name: await reader.get_child(f"{idx}:{name}") for name in ("ReadTag", "WriteTag")
            }
            self._reader = reader
            subscription = await client.create_subscription(50, _ScanHandler(self))
            await subscription.subscribe_data_change(last_scan)
            await self._subscribe_scan_events(client, subscription, reader, idx)
            self._link.up()
            self.connected.set()
            while True:  # liveness: a read every watch interval
                await asyncio.sleep(self.watch_interval)
                await last_scan.read_value()
        finally:  # asyncua raises many types for a lost link; the link retries on any
            self.connected.clear()
            self._reader = None
            self._scan(b"")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 2)

    async def _subscribe_scan_events(
        self, client: Any, subscription: Any, reader: Any, idx: int
    ) -> None:
        """AutoIdScanEvents from the reader, when its server has the type (LastScanData alone if not).

        The ScanResult structure is decoded from the server's own type dictionary.
        """
        from asyncua import ua

        try:
            event_type = await client.nodes.base_event_type.get_child(f"{idx}:AutoIdScanEventType")
            await client.load_data_type_definitions()
        except ua.UaError as err:
            log.info("autoid reader has no AutoIdScanEventType; LastScanData only", error=str(err))
            return
        await subscription.subscribe_events(reader, event_type)

    def _last_scan_data(self, uid: bytes, when: datetime | None) -> None:
        if not uid:
            self._cleared_at = when
        self._scan(uid)

    def _scan_event(self, result: Any, when: datetime | None) -> None:
        """An AutoIdScanEvent: its ScanResult's ScanData is the identifier of a tag being scanned.

        An event raised before the field was last seen empty is stale (the two arrive through
        separate notifications) and would report a tag that has already left.
        """
        data = getattr(result, "ScanData", None)
        if not isinstance(data, bytes | bytearray) or not data:
            log.debug("autoid scan event without a ByteString ScanData", reader=self.name)
            return
        cleared = self._cleared_at
        if cleared is not None and when is not None and when <= cleared:
            return
        self._scan(bytes(data))

    def _scan(self, uid: bytes) -> None:
        if uid == (self._present or b""):
            return
        now = time.time()
        if self._present is not None:
            self._events.put_nowait(ScanEvent(self._present, ScanKind.LEFT, self.name, now))
        self._present = uid or None
        if uid:
            self._events.put_nowait(ScanEvent(uid, ScanKind.ARRIVED, self.name, now, "RFID"))

    # ------------------------------------------------------------------ ReadTag / WriteTag

    async def _call(self, method: str, uid: bytes, *args: Any) -> Any:
        from asyncua import ua

        reader = self._reader
        where = f"tag {uid_hex(uid)} on reader {self.name} ({self.url})"
        if reader is None:
            raise TagIOError(f"{where}: reader not connected")
        if self._present != uid:
            raise TagIOError(f"{where}: the tag is not in the field")
        try:
            result = await reader.call_method(
                self._methods[method],
                ua.Variant(uid, ua.VariantType.ByteString),
                ua.Variant("RAW:BYTES", ua.VariantType.String),
                ua.Variant(self.region, ua.VariantType.UInt16),
                *args,
                ua.Variant(b"", ua.VariantType.ByteString),
            )
        except (ua.UaError, OSError, TimeoutError) as err:
            raise TagIOError(f"{where}: {method} failed: {err}") from err
        status = result[-1] if isinstance(result, list) else result
        if status != 0:
            raise TagIOError(f"{where}: {method} failed with {status_name(int(status))}")
        return result[0] if isinstance(result, list) else None

    async def _read(self, uid: bytes, offset: int, length: int) -> bytes:
        from asyncua import ua

        data = await self._call(
            "ReadTag",
            uid,
            ua.Variant(offset, ua.VariantType.UInt32),
            ua.Variant(length, ua.VariantType.UInt32),
        )
        return bytes(data or b"")

    async def _write(self, uid: bytes, offset: int, data: bytes) -> None:
        from asyncua import ua

        await self._call(
            "WriteTag",
            uid,
            ua.Variant(offset, ua.VariantType.UInt32),
            ua.Variant(data, ua.VariantType.ByteString),
        )

    async def read_ndef(self, uid: bytes) -> bytes:
        length = int.from_bytes(await self._read(uid, 0, LENGTH_PREFIX))
        return await self._read(uid, LENGTH_PREFIX, length) if length else b""

    async def write_ndef(self, uid: bytes, message: bytes, previous: bytes | None = None) -> None:
        if previous is not None and len(previous) == len(message):
            differ = [i for i in range(len(message)) if message[i] != previous[i]]
            if not differ:
                return
            first, last = differ[0], differ[-1] + 1
            offset, data = LENGTH_PREFIX + first, message[first:last]
        else:
            offset, data = 0, len(message).to_bytes(LENGTH_PREFIX) + message
        await self._write(uid, offset, data)
        if await self._read(uid, offset, len(data)) != data:
            raise TagIOError(
                f"tag {uid_hex(uid)} on reader {self.name}: read-back differs from the write"
            )
