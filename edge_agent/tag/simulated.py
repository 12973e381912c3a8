"""A reader with no hardware: tags live in memory, or as files in a directory.

For the demo, the tests and an integrator's bench. Directory mode: a file ``<UID-hex>.ndef``
appearing is a tag arriving, its removal the tag leaving, and write-back goes into the file, so
a payload made with ``edge-agent tag encode`` can be put "on the reader" with ``cp``.
"""

from __future__ import annotations

import asyncio
import contextlib
import string
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import Field

from ..errors import TagIOError
from ..messages import uid_hex
from .reader import ReaderSettings, ScanEvent, ScanKind, TagReader

log = structlog.get_logger("reader.simulated")


class SimulatedSettings(ReaderSettings):
    """``reader: {type: simulated}``. Tags are files ``<UID-hex>.ndef`` in ``directory``: a file
    appearing is a tag arriving; without a directory, tags are presented by code."""

    type: Literal["simulated"]
    name: str = "sim"
    directory: Path | None = None
    poll_interval: float = Field(0.2, gt=0, le=10)


SETTINGS_MODEL = SimulatedSettings


def create(settings: SimulatedSettings | Mapping[str, Any]) -> SimulatedReader:
    if not isinstance(settings, SimulatedSettings):
        settings = SimulatedSettings.model_validate(dict(settings))
    return SimulatedReader(settings.name, settings.directory, settings.poll_interval)


@dataclass
class SimulatedTag:
    uid: bytes
    message: bytes
    tag_type: str = "NTAG215"
    capacity: int = 492
    read_only: bool = False
    writes: int = 0


class SimulatedReader(TagReader):
    def __init__(
        self, name: str = "sim", directory: Path | None = None, poll_interval: float = 0.2
    ) -> None:
        self.name = name
        self.directory = directory
        self.poll_interval = poll_interval
        self.tags: dict[bytes, SimulatedTag] = {}  # tags in the field
        self._files: dict[bytes, Path] = {}  # directory mode: the file each tag came from
        self.fail_next_write: str | None = None  # tests: the next write fails with this reason
        self._events: asyncio.Queue[ScanEvent | None] = asyncio.Queue()
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._watcher = asyncio.create_task(self._watch(), name="sim-reader-watch")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        self._events.put_nowait(None)

    async def events(self) -> AsyncIterator[ScanEvent]:
        while (event := await self._events.get()) is not None:
            yield event

    # --------------------------------------------------------------- the field, driven by code

    def present(self, tag: SimulatedTag) -> None:
        """A tag enters the field. Presenting the tag already in the field does nothing."""
        if tag.uid in self.tags:
            return
        self.tags[tag.uid] = tag
        self._emit(tag, ScanKind.ARRIVED)

    def remove(self, uid: bytes) -> None:
        tag = self.tags.pop(uid, None)
        if tag is not None:
            self._emit(tag, ScanKind.LEFT)

    def _emit(self, tag: SimulatedTag, kind: ScanKind) -> None:
        self._events.put_nowait(
            ScanEvent(tag.uid, kind, self.name, time.time(), tag.tag_type, tag.capacity)
        )

    # --------------------------------------------------------------- ReadTag / WriteTag

    def _tag(self, uid: bytes) -> SimulatedTag:
        tag = self.tags.get(uid)
        if tag is None:
            raise TagIOError(f"tag {uid_hex(uid)} is not in the field of reader {self.name}")
        return tag

    async def read_ndef(self, uid: bytes) -> bytes:
        return self._tag(uid).message

    async def write_ndef(self, uid: bytes, message: bytes, previous: bytes | None = None) -> None:
        tag = self._tag(uid)
        if self.fail_next_write:
            reason, self.fail_next_write = self.fail_next_write, None
            raise TagIOError(f"writing tag {uid_hex(uid)} failed: {reason}")
        if tag.read_only:
            raise TagIOError(f"tag {uid_hex(uid)} is read-only")
        if len(message) > tag.capacity:
            raise TagIOError(
                f"tag {uid_hex(uid)} holds {tag.capacity} bytes, message has {len(message)}"
            )
        tag.message = message
        tag.writes += 1
        if self.directory is not None:
            path = self._files.get(uid, self.directory / f"{uid_hex(uid)}.ndef")
            path.write_bytes(message)  # the file it came from, lower-case name or not

    # --------------------------------------------------------------- directory mode

    async def _watch(self) -> None:
        assert self.directory is not None
        ignored: set[str] = set()  # bad file names warned about, while they are there
        while True:
            seen: set[bytes] = set()
            bad: set[str] = set()
            for path in sorted(self.directory.glob("*.ndef")):
                uid = _uid(path.stem)
                if uid is None:
                    bad.add(path.name)
                    if path.name not in ignored:  # once per file, not once per poll
                        log.warning("ignoring file whose name is not a hex UID", file=str(path))
                    continue
                seen.add(uid)
                if uid not in self.tags:
                    with contextlib.suppress(OSError):  # a file being copied in: next poll
                        message = path.read_bytes()
                        self._files[uid] = path
                        self.present(SimulatedTag(uid, message, capacity=868))
            for uid in set(self.tags) - seen:
                self._files.pop(uid, None)
                self.remove(uid)
            ignored = bad  # a file removed and put back is warned about again
            await asyncio.sleep(self.poll_interval)


def _uid(stem: str) -> bytes | None:
    """The UID a file name gives: hex digits only (``04A1B2C3D4E5F6``), at least one byte."""
    if not stem or not all(c in string.hexdigits for c in stem):
        return None
    try:
        return bytes.fromhex(stem)
    except ValueError:  # an odd number of digits
        return None
