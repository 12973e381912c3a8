"""The tag reader interface, shaped like the OPC UA AutoID model (OPC 30010).

A reader reports scan events (a tag arrived / left, with its identifier) and offers ReadTag/WriteTag
on the tag's NDEF area. The station cycle uses only this, so an NFC reader on USB, an industrial
RFID head behind OPC UA and the simulated reader are interchangeable.

Each reader module (found by ``registry.py`` from the config's ``reader.type``) exports
``SETTINGS_MODEL``, a ``ReaderSettings`` subclass for its ``reader:`` section, and
``create(settings) -> TagReader``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from pydantic import Field

from ..yamlfile import StrictModel


class ScanKind(StrEnum):
    ARRIVED = "arrived"
    LEFT = "left"


@dataclass(frozen=True)
class ScanEvent:
    """A tag came into or left the reader's field. One ARRIVED per presence, never repeated."""

    uid: bytes
    kind: ScanKind
    reader: str
    time: float  # time.time() of the scan
    tag_type: str = ""  # e.g. "NTAG215", "Type3Tag"
    capacity: int = 0  # usable NDEF bytes, 0 when unknown


class ReaderSettings(StrictModel):
    """The keys of the ``reader:`` section every reader has; a reader's own model adds its keys
    and narrows ``type`` to its name."""

    # A tag taken away and presented again: next_step (the cycle decides) or ignore it within
    # return_window seconds of leaving (0: until another tag came); docs/readers.md.
    on_return: Literal["next_step", "ignore"] = "next_step"
    return_window: float = Field(0.0, ge=0, le=86400)
    type: str
    name: str  # in logs and cycle reports


class TagReader(ABC):
    """One reader head. ``events()`` may be iterated once, for the lifetime of the reader."""

    name: str

    @abstractmethod
    async def start(self) -> None:
        """Open the reader. A reader that is absent is retried in the background, not an error."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop scanning and release the device promptly. Never raises."""

    @abstractmethod
    def events(self) -> AsyncIterator[ScanEvent]:
        """Scan events, in order, until ``stop()``."""

    @abstractmethod
    async def read_ndef(self, uid: bytes) -> bytes:
        """ReadTag: the NDEF message bytes of the tag in the field. Raises TagIOError."""

    @abstractmethod
    async def write_ndef(self, uid: bytes, message: bytes, previous: bytes | None = None) -> None:
        """WriteTag: replace the NDEF message and verify it by reading back. Raises TagIOError.

        ``previous`` is the message as last read; a reader that can write part of the tag writes only
        the bytes that differ, which is what makes progress write-back tear-safe.
        """
