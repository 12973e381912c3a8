"""The outbox on disk: SQLite in WAL mode, one file in the agent's state directory.

A message is committed with ``synchronous=FULL`` (the WAL is fsynced) before ``put`` returns, so it
survives ``kill -9`` and power loss from the moment the caller holds it. Acknowledgements are
committed with ``synchronous=NORMAL``: the next durable put carries them to disk; losing a few on
power loss only means a duplicate that consumers drop by the message id.

Bounded by ``max_messages`` and, optionally, ``max_bytes`` (the payloads' total size). When full,
a new message makes room by dropping the oldest messages of the lowest class (telemetry, then
events) until it fits both limits; records (cycle reports) are never dropped. A telemetry message
that finds not enough telemetry to drop is refused. A record is always stored, even over a limit;
``full`` then tells the station to stop taking parts until the broker drains the outbox.

Write-ahead (``hold``): a cycle's report is committed, unsent, before the machine is touched and
again before the tag is written back; the final ``put`` replaces it in one transaction. Whatever is
still held at the next start is sent then (``held()``), so a crash at any instant loses no report.

A write that fails (disk full, I/O error) raises OutboxError with the transaction rolled back; the
caller keeps the message and tries again. So does a write after the file was deleted or replaced
under the running agent; the next write then makes the file anew and copies every row over from
the handle still open on the old one, so nothing committed into it is lost.

The file and its damage (``outbox_salvage.py``): a row that cannot be sent as it is stored (a
topic that is not UTF-8 or holds a wildcard, a payload that is not bytes, ...) is moved to the
``quarantine`` table with the reason instead of stopping the sender at every attempt, held rows
too. A file SQLite calls malformed at open is moved aside and what can be read is copied into a
fresh one (``salvaged``); malformed at run time raises OutboxCorrupt, which no retry mends: the
process must restart.

The file is opened with an exclusive lock: a second agent on the same state directory fails at
start instead of interleaving sequence numbers.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import structlog

from . import outbox_salvage as salvage
from .outbox import Keep, OutboxCorrupt, OutboxError, OutMessage, Payload, render

__all__ = ["FileCorrupt", "OutboxError", "SqliteOutbox"]  # OutboxError: what this raises

log = structlog.get_logger("outbox")


def _keep(value: int) -> Keep:
    # A class value this version does not know (a damaged row) counts as an event.
    try:
        return Keep(value)
    except ValueError:
        return Keep.EVENT


#: (messages dropped, class dropped from) -> None; called after the drop is committed.
DropFn = Callable[[int, Keep], None]


class FileCorrupt(OutboxError, OutboxCorrupt):
    """SQLite finds the open file malformed: only a restart (which salvages it) mends that."""


class SqliteOutbox:
    def __init__(
        self,
        path: str | Path,
        *,
        max_messages: int = 100_000,
        max_bytes: int | None = None,
        telemetry_max_age: float | None = None,
        on_drop: DropFn | None = None,
    ) -> None:
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.telemetry_max_age = telemetry_max_age
        self.on_drop = on_drop
        self.dropped = 0  # since start, all classes
        self._notices: list[dict[str, Any]] = []  # for the line, taken by the sender
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db, salvaged = salvage.open_sound(self.path)
            if salvaged is not None:
                self._notice("outbox_salvaged", **salvaged)
            self._durable = True  # open_db sets synchronous=FULL
            self._watch = salvage.FileWatch(self.path)
            self._recount()
            seq = self._db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'messages'"
            ).fetchone()
            self.quarantined = self._db.execute("SELECT count(*) FROM quarantine").fetchone()[0]
        except sqlite3.OperationalError as err:
            hint = " (another edge-agent uses this state directory)" if "locked" in str(err) else ""
            raise OutboxError(f"{self.path}: cannot open the outbox: {err}{hint}") from err
        except (sqlite3.DatabaseError, OSError) as err:
            raise OutboxError(f"{self.path}: cannot open the outbox: {err}") from err
        self._next = (seq[0] if seq else 0) + 1
        self._holding: set[str] = set()  # keys held by this run (the cycle in flight)
        self._purged = 0.0
        if len(self):
            log.info(
                "outbox has a backlog from the last run",
                path=str(self.path),
                backlog=len(self),
                oldest_age_s=self._age(),
            )

    # ----------------------------------------------------------------- the Outbox protocol

    def put(
        self,
        topic: str,
        payload: Payload,
        qos: int,
        retain: bool,
        keep: Keep = Keep.RECORD,
        release: str | None = None,
    ) -> OutMessage | None:
        seq = self._next
        message = OutMessage(seq, topic, render(payload, seq), qos, retain, keep, time.time())
        dropped: tuple[int, Keep] | None = None
        # Replacing a held report need not wait for fsync: if this commit is lost to a power cut,
        # the held version (durable already) is sent at the next start instead.
        refused = False
        try:
            with self._tx("store a message", durable=release is None):
                if release is not None:
                    self._db.execute("DELETE FROM held WHERE key = ?", (release,))
                    self._holding.discard(release)  # one key per cycle in flight, no more
                purged = self._purge_old_telemetry(message.created)
                excess = self._excess(len(message.payload))
                if excess != (0, 0):
                    dropped = self._make_room(keep, *excess)
                    refused = dropped is None
                if not refused:
                    self._db.execute(
                        "INSERT INTO messages (id, topic, payload, qos, retain, keep, created)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (seq, topic, message.payload, qos, retain, int(keep), message.created),
                    )
        except OutboxError:
            with suppress(sqlite3.Error):
                self._recount()  # the counters moved with statements that were rolled back
            raise
        # Told after the commit: the drop callback may itself put a message (an event).
        if purged:
            self._report_purge(purged)
        if refused:
            self._refused(message)
            return None
        self._next += 1
        self._by_class[keep] += 1
        self._bytes[keep] += len(message.payload)
        if dropped is not None and dropped[0]:
            self._report_drop(*dropped)
        return message

    def hold(
        self, key: str, topic: str, payload: bytes, qos: int, keep: Keep = Keep.RECORD
    ) -> None:
        # The first version is fsynced. Replacing it need not be: after a power cut the first one
        # stands (less precise, never lost); a crash of the process alone loses neither.
        with self._tx("hold a report", durable=key not in self._holding):
            self._db.execute(
                "INSERT OR REPLACE INTO held (key, topic, payload, qos, keep) VALUES (?, ?, ?, ?, ?)",
                (key, topic, payload, qos, int(keep)),
            )
        self._holding.add(key)

    def held(self) -> list[tuple[str, str, bytes, int, Keep]]:
        try:
            rows = self._db.execute(
                f"SELECT rowid, {salvage.HELD_COLUMNS} FROM held ORDER BY rowid"
            ).fetchall()
        except sqlite3.Error as err:
            raise self._error("read the held reports", err) from err
        out: list[tuple[str, str, bytes, int, Keep]] = []
        for rowid, *row in rows:
            try:
                key, topic, payload, qos, keep = salvage.checked_held(tuple(row))
                out.append((key, topic, payload, qos, _keep(keep)))
            except (ValueError, TypeError, OverflowError) as err:
                quarantined = salvage.held_quarantine(tuple(row), str(err))
                self._quarantine("DELETE FROM held WHERE rowid = ?", rowid, quarantined)
        return out

    def unhold(self, key: str) -> None:
        # Not fsynced, like a release: a drop lost to a power cut sends the held version later.
        with self._tx("drop a held report", durable=False):
            self._db.execute("DELETE FROM held WHERE key = ?", (key,))
        self._holding.discard(key)

    def oldest(self, limit: int, after: int = 0) -> list[OutMessage]:
        out: list[OutMessage] = []
        # A row set aside is made up by reading on: a short batch means nothing older is left.
        while len(out) < limit:
            want = limit - len(out)
            try:  # a deleted file still reads through the open handle: found at the next write
                rows = self._db.execute(
                    f"SELECT id, {salvage.MESSAGE_COLUMNS} FROM messages"
                    " WHERE id > ? ORDER BY id LIMIT ?",
                    (after, want),
                ).fetchall()
            except sqlite3.Error as err:
                raise self._error("read the outbox", err) from err
            for i, raw, kind, payload, qos, retain, keep, created in rows:
                after = i
                try:
                    topic = salvage.checked_topic(raw, kind)
                    body = salvage.check_row(payload, qos)
                    out.append(
                        OutMessage(i, topic, body, qos, bool(retain), Keep(keep), float(created))
                    )
                except (ValueError, TypeError, OverflowError) as err:
                    row = (i, raw, payload, qos, retain, keep, created, None, str(err))
                    self._quarantine("DELETE FROM messages WHERE id = ?", i, row)
            if len(rows) < want:
                break
        return out

    def ack(self, message_id: int) -> None:
        try:
            self._check_file()
            self._set_durable(False)
            row = self._db.execute(
                "DELETE FROM messages WHERE id = ? RETURNING keep, length(payload)", (message_id,)
            ).fetchone()
        except sqlite3.Error as err:
            raise self._error(f"remove delivered message {message_id}", err) from err
        if row is not None:  # not already dropped
            self._by_class[_keep(row[0])] -= 1
            self._bytes[_keep(row[0])] -= row[1] or 0

    def _quarantine(self, delete: str, rowid: int, row: tuple[object, ...]) -> None:
        # Never sent, never deleted: a person can look at it; the sender goes on with the next.
        what = "held report" if row[0] is None else "message"
        log.error(
            f"outbox: a stored {what} cannot be sent as it is; moved to quarantine",
            path=str(self.path),
            outbox_id=row[0],
            report=row[7],
            error=row[8],
        )
        with self._tx("quarantine a message", durable=True):
            salvage.quarantine(self._db, row)
            gone = self._db.execute(delete + " RETURNING keep, length(payload)", (rowid,))
            found = gone.fetchone()
        if found is not None and row[0] is not None:
            self._by_class[_keep(found[0])] -= 1
            self._bytes[_keep(found[0])] -= found[1] or 0
        self.quarantined += 1
        self._notice("outbox_quarantined", outbox_id=row[0], report=row[7], error=row[8])

    def take_notices(self) -> list[dict[str, Any]]:
        notices, self._notices = self._notices, []
        return notices

    def _notice(self, event: str, **fields: Any) -> None:
        if len(self._notices) < 100:  # one event each; past that, the count in the status
            self._notices.append({"event": event, **fields})

    def __len__(self) -> int:
        return sum(self._by_class.values())

    def newest_by_topic(self) -> dict[str, int]:
        rows = self._db.execute("SELECT CAST(topic AS BLOB), max(id) FROM messages GROUP BY 1")
        # A topic that does not decode is never sent: oldest() quarantines its rows.
        return {t.decode("utf-8", "replace"): newest for t, newest in rows if isinstance(t, bytes)}

    @property
    def full(self) -> bool:
        records = Keep.RECORD
        if self.max_bytes is not None and self._bytes[records] >= self.max_bytes:
            return True
        return self._by_class[records] >= self.max_messages

    @property
    def size(self) -> int:
        """Payload bytes waiting, all classes."""
        return sum(self._bytes.values())

    def oldest_created(self) -> float | None:
        row = self._db.execute("SELECT created FROM messages ORDER BY id LIMIT 1").fetchone()
        return float(row[0]) if row else None

    def close(self) -> None:
        self._db.close()

    # ----------------------------------------------------------------- internals

    def count(self, keep: Keep) -> int:
        return self._by_class[keep]

    def _age(self) -> float:
        oldest = self.oldest_created()
        return round(time.time() - oldest, 1) if oldest is not None else 0.0

    @contextmanager
    def _tx(self, what: str, *, durable: bool) -> Iterator[None]:
        """One transaction; a failed write (disk full, I/O error) is rolled back and raised as
        OutboxError saying what could not be done."""
        try:
            self._check_file()
            self._set_durable(durable)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    with suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:
            raise self._error(what, err) from err

    def _error(self, what: str, err: sqlite3.Error) -> OutboxError:
        if salvage.is_corrupt(err):
            return FileCorrupt(f"{self.path}: cannot {what}: {err}; a restart salvages the file")
        return OutboxError(f"{self.path}: cannot {what}: {err}")

    def _set_durable(self, durable: bool) -> None:
        if durable != self._durable:
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._durable = durable

    def _excess(self, size: int) -> tuple[int, int]:
        """(messages, bytes) to drop before a message of ``size`` bytes fits both limits."""
        count = max(0, len(self) + 1 - self.max_messages)
        if self.max_bytes is None:
            return count, 0
        return count, max(0, self.size + size - self.max_bytes)

    def _make_room(self, keep: Keep, count: int, size: int) -> tuple[int, Keep] | None:
        """Drop the oldest messages a new ``keep`` message may displace, at least ``count`` of them
        and ``size`` bytes; None (nothing dropped) if there are not enough."""
        # Telemetry displaces only telemetry; events and records displace telemetry, then events.
        ceiling = min(keep, Keep.EVENT)
        victims: list[tuple[int, Keep, int]] = []
        freed = 0
        candidates = self._db.execute(
            "SELECT id, keep, length(payload) FROM messages WHERE keep <= ? ORDER BY keep, id",
            (int(ceiling),),
        )
        for message_id, k, n in candidates:
            if len(victims) >= count and freed >= size:
                break
            victims.append((message_id, Keep(k), n))
            freed += n
        candidates.close()
        if (len(victims) < count or freed < size) and keep != Keep.RECORD:
            return None
        self._db.executemany("DELETE FROM messages WHERE id = ?", [(v[0],) for v in victims])
        lowest = Keep.RECORD
        for _, k, n in victims:
            self._by_class[k] -= 1
            self._bytes[k] -= n
            lowest = min(lowest, k)
        return len(victims), lowest

    def _purge_old_telemetry(self, now: float) -> int:
        if self.telemetry_max_age is None or now - self._purged < 1.0:
            return 0
        self._purged = now
        rows = self._db.execute(
            "DELETE FROM messages WHERE keep = ? AND created < ? RETURNING length(payload)",
            (int(Keep.TELEMETRY), now - self.telemetry_max_age),
        ).fetchall()
        self._by_class[Keep.TELEMETRY] -= len(rows)
        self._bytes[Keep.TELEMETRY] -= sum(n for (n,) in rows)
        return len(rows)

    def _report_purge(self, count: int) -> None:
        self.dropped += count
        log.warning(
            "outbox: dropped telemetry older than the age limit",
            dropped=count,
            max_age_s=self.telemetry_max_age,
            backlog=len(self),
        )
        if self.on_drop is not None:
            self.on_drop(count, Keep.TELEMETRY)

    def _recount(self) -> None:
        rows = self._db.execute(
            "SELECT keep, count(*), coalesce(sum(length(payload)), 0) FROM messages GROUP BY keep"
        ).fetchall()
        self._by_class = {k: 0 for k in Keep}
        self._bytes = {k: 0 for k in Keep}  # payload bytes per class
        for keep, n, size in rows:
            self._by_class[_keep(keep)] += n
            self._bytes[_keep(keep)] += size

    # ----------------------------------------------------------------- deletion

    def _check_file(self) -> None:
        """Raise OutboxError once the file was deleted or replaced under the running agent;
        at the next call, make it anew with every row the open handle still reads."""
        if self._watch.gone is None:
            gone = self._watch.look()
            if gone is not None:
                raise OutboxError(f"{self.path}: the outbox file was {gone} while the agent ran")
            return
        try:
            self._db, was = self._watch.remake(self._db)
        except (sqlite3.Error, OSError) as err:
            raise OutboxError(f"{self.path}: cannot make the outbox file anew: {err}") from err
        self._durable = True
        self._recount()
        log.warning("outbox file made anew, every message copied", was=was, backlog=len(self))

    def _refused(self, message: OutMessage) -> None:
        self.dropped += 1
        log.warning(
            "outbox full: new message dropped",
            topic=message.topic,
            keep=message.keep.name.lower(),
            backlog=len(self),
            backlog_bytes=self.size,
            max_messages=self.max_messages,
            max_bytes=self.max_bytes,
        )
        if self.on_drop is not None:
            self.on_drop(1, message.keep)

    def _report_drop(self, n: int, keep: Keep) -> None:
        self.dropped += n
        log.warning(
            "outbox full: dropped the oldest messages",
            dropped=n,
            keep=keep.name.lower(),
            backlog=len(self),
            backlog_bytes=self.size,
            max_messages=self.max_messages,
            max_bytes=self.max_bytes,
        )
        if self.on_drop is not None:
            self.on_drop(n, keep)
