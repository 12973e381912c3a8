"""NFC readers through nfcpy: ``reader: {type: nfc, device: usb | usb:VID:PID | tty:USB0:pn532 | udp:HOST:PORT}``.

    reader.py   the daemon's reader: one thread owns the device, scan events and requests
    tags.py     tag operations in that thread: NDEF read, tear-safe write-back, presence, passwords
    session.py  one tag, blocking, for the ``edge-agent tag`` commands

Nothing here imports nfcpy at import time: a station without NFC never loads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from ..reader import ReaderSettings
from .reader import NfcReader, Opener, open_frontend
from .session import TagSession

__all__ = [
    "SETTINGS_MODEL",
    "NfcReader",
    "NfcSettings",
    "Opener",
    "TagSession",
    "create",
    "open_frontend",
]


class NfcSettings(ReaderSettings):
    """``reader: {type: nfc}``: an NFC reader through nfcpy; ``device`` as nfcpy takes it
    (docs/readers.md)."""

    type: Literal["nfc"]
    name: str = "nfc"
    device: str = Field("usb", pattern=r"^(usb|tty|com|udp)(:.*)?$")  # usb:VID:PID, tty:USB0:pn532
    targets: list[Literal["106A", "106B", "212F", "424F"]] = Field(
        default=["106A", "106B", "212F"], min_length=1
    )
    poll_interval: float = Field(0.1, gt=0, le=5)  # between senses, and presence checks
    backoff_max: float = Field(30.0, gt=0, le=600)  # longest wait between attempts to open it
    # NTAG21x password of protected tags: PWD (4 bytes) + PACK (2 bytes) in hex; use ${ENV}.
    password: str | None = Field(None, pattern=r"^[0-9A-Fa-f]{12}$")


SETTINGS_MODEL = NfcSettings


def create(settings: NfcSettings | Mapping[str, Any]) -> NfcReader:
    """The reader, not opened: nfcpy itself is imported by the reader thread."""
    if not isinstance(settings, NfcSettings):
        settings = NfcSettings.model_validate(dict(settings))
    return NfcReader(
        settings.name,
        settings.device,
        targets=tuple(settings.targets),
        poll_interval=settings.poll_interval,
        backoff_max=settings.backoff_max,
        password=bytes.fromhex(settings.password) if settings.password else None,
    )
