"""The abort journal: whether the machine may have been left mid-cycle, kept across a crash.

Marked (and fsynced) before the handshake sets a trigger, cleared once the machine is back idle.
A daemon killed between the two finds it marked at the next start and runs the profile's abort
steps for that operation before the first part. Without a state directory it lives in memory.

The file is one fixed-size record written in place (``pwrite`` at offset 0, never truncated), so a
write torn by a power cut leaves either record or a mix that does not parse: an unreadable journal
is logged and taken as marked, which costs one abort at most.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

log = structlog.get_logger("journal")

FILE_NAME = "abort-journal.json"
RECORD_SIZE = 256


@dataclass(frozen=True)
class PendingAbort:
    """An abort owed to the machine: for ``operation`` (None when the journal was unreadable)."""

    operation: str | None
    program: int | None = None
    since: str | None = None


class AbortJournal:
    def __init__(self, directory: Path | None) -> None:
        self.path = directory / FILE_NAME if directory is not None else None
        self.pending: PendingAbort | None = _load(self.path) if self.path is not None else None

    def mark(self, operation: str, program: int | None) -> None:
        """Record, durably, that a trigger is about to be set for ``operation``."""
        since = datetime.now(UTC).isoformat(timespec="milliseconds")
        self.pending = PendingAbort(operation, program, since)
        record = {"pending": True, "operation": operation, "program": program, "since": since}
        self._write(record, sync=True)

    def clear(self) -> None:
        """The machine is idle again. Not fsynced: a clear lost in a crash repeats one abort."""
        if self.pending is None:
            return
        self.pending = None
        self._write({"pending": False}, sync=False)

    def _write(self, record: dict[str, object], *, sync: bool) -> None:
        if self.path is None:
            return
        data = json.dumps(record).encode().ljust(RECORD_SIZE)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))  # a no-op unless an earlier record was longer
                if sync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            # The abort still runs at every start; only the record of which operation is lost.
            log.error(
                "cannot write the abort journal; it is kept in memory only",
                file=str(self.path),
                error=err.strerror or str(err),
            )
            self.path = None


def _load(path: Path) -> PendingAbort | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        log.error(
            "cannot read the abort journal; aborting the machine before the first part",
            file=str(path),
            error=err.strerror or str(err),
        )
        return PendingAbort(None)
    try:
        record = json.loads(raw.decode())
        if not isinstance(record, dict) or not isinstance(record.get("pending"), bool):
            raise ValueError("not a journal record")
        if not record["pending"]:
            return None
        operation, program = record.get("operation"), record.get("program")
        since = record.get("since")
        return PendingAbort(
            operation if isinstance(operation, str) else None,
            program if isinstance(program, int) and not isinstance(program, bool) else None,
            since if isinstance(since, str) else None,
        )
    except (UnicodeDecodeError, ValueError):
        log.error(
            "the abort journal is unreadable; aborting the machine before the first part",
            file=str(path),
        )
        return PendingAbort(None)
