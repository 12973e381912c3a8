"""One tag on one reader, blocking: the ``edge-agent tag`` commands, not the daemon."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from ...errors import TagIOError
from ...messages import uid_hex
from .reader import Opener, open_frontend
from .tags import (
    _kind,
    _tag_errors,
    _why,
    authenticate,
    fresh_ndef,
    has_password,
    ndef_area,
    read_message,
    sense,
    write_message,
)

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
            import nfc  # noqa: F401  (a missing library is one clear line)
        except ImportError as err:
            raise TagIOError("nfcpy is not installed (pip install 'edge-agent[nfc]')") from err
        try:
            self._clf = self._opener(self.device)
        except (OSError, ValueError, TypeError) as err:
            raise TagIOError(f"no reader at {self.device}: {err}") from err
        deadline = time.monotonic() + self.timeout

        def pause() -> bool:
            if time.monotonic() > deadline:
                return True
            time.sleep(0.05)
            return False

        self.tag = sense(self._clf, self.targets, pause)
        if self.tag is None:
            self._clf.close()
            raise TagIOError(f"no tag on {self.device} within {self.timeout:g} s")
        if self.password is not None and not authenticate(self.tag, self.password):
            self._clf.close()
            raise TagIOError(f"tag {uid_hex(self.uid)} ({self.kind}): password not accepted")
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
            raise TagIOError(f"tag {uid_hex(self.uid)} on {self.device}: {_why(err)}") from err

    def formatted(self) -> bool:
        with self._errors():
            return fresh_ndef(self.tag) is not None

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
                raise TagIOError(f"tag {uid_hex(self.uid)} ({self.kind}) cannot be NDEF formatted")

    def protect(self, password: bytes) -> None:
        """Require ``password`` (PWD + PACK) to write pages 4 and up (NTAG21x only)."""
        if not has_password(self.tag):
            raise TagIOError(f"tag {uid_hex(self.uid)} ({self.kind}) has no password protection")
        with self._errors():
            if not self.tag.protect(password, read_protect=False, protect_from=4):
                raise TagIOError(f"tag {uid_hex(self.uid)}: setting the password failed")

    def read(self) -> bytes:
        with self._errors():
            return read_message(self.tag)

    def write(self, message: bytes, previous: bytes | None = None) -> list[int]:
        with self._errors():
            return write_message(self.tag, message, previous)
