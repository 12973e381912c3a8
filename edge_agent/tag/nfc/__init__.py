"""NFC readers through nfcpy: ``reader: {type: nfc, device: usb | usb:VID:PID | tty:USB0:pn532 | udp:HOST:PORT}``.

    reader.py   the daemon's reader: one thread owns the device, scan events and requests
    tags.py     tag operations in that thread: NDEF read, tear-safe write-back, presence, passwords
    session.py  one tag, blocking, for the ``edge-agent tag`` commands

Nothing here imports nfcpy at import time: a station without NFC never loads it.
"""

from __future__ import annotations

from .reader import NfcReader, Opener, open_frontend
from .session import TagSession

__all__ = ["NfcReader", "Opener", "TagSession", "open_frontend"]
