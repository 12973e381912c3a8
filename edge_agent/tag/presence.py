"""What a reader does with a tag that is taken away and presented again (``reader.on_return``).

``next_step`` (the default) hands every arrival to the station cycle, which runs the next step only
if it is this station's; a part that comes back after its step gets a report saying why it was not
run, with the machine untouched. ``ignore`` drops the arrival of the tag that was last in the
field when it comes back within ``return_window`` seconds of leaving (0: until another tag has
been presented): no cycle, no report, one INFO line. It suits stations where operators lift the
part and put it back while fixturing it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

import structlog

from ..messages import uid_hex
from .reader import ScanEvent, ScanKind, TagReader

log = structlog.get_logger("reader.presence")

OnReturn = Literal["next_step", "ignore"]


class ReturnFilter(TagReader):
    """Wraps a reader; drops the arrival (and its leaving) of a tag presented again too soon."""

    def __init__(self, reader: TagReader, *, return_window: float = 0.0) -> None:
        self.inner = reader
        self.name = reader.name
        self.return_window = return_window
        self._last: bytes | None = None  # the tag last handed on, and when it left
        self._left_at: float | None = None
        self._dropped: bytes | None = None  # its LEFT is dropped too

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def events(self) -> AsyncIterator[ScanEvent]:
        async for event in self.inner.events():
            if self._keep(event):
                yield event

    def _keep(self, event: ScanEvent) -> bool:
        if event.kind is ScanKind.LEFT:
            if event.uid == self._dropped:
                self._dropped = None
                self._left_at = event.time
                return False
            if event.uid == self._last:
                self._left_at = event.time
            return True
        if event.uid == self._last and self._within_window(event.time):
            self._dropped = event.uid
            log.info(
                "tag presented again; not run (reader.on_return: ignore)",
                reader=self.name,
                uid=uid_hex(event.uid),
                window_s=self.return_window or "until another tag",
            )
            return False
        self._last, self._left_at = event.uid, None
        return True

    def _within_window(self, now: float) -> bool:
        if self.return_window <= 0:
            return True
        return self._left_at is None or now - self._left_at < self.return_window

    async def read_ndef(self, uid: bytes) -> bytes:
        return await self.inner.read_ndef(uid)

    async def write_ndef(self, uid: bytes, message: bytes, previous: bytes | None = None) -> None:
        await self.inner.write_ndef(uid, message, previous)
