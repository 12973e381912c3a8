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
caller keeps the message and tries again. A row that cannot be read back is moved to the
``quarantine`` table (logged once) instead of stopping the sender at every attempt.

The file is opened with an exclusive lock: a second agent on the same state directory fails at
start instead of interleaving sequence numbers.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import structlog

from ..errors import EdgeAgentError
from .outbox import Keep, OutMessage, Payload, render

log = structlog.get_logger("outbox")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the per-gateway sequence number, never reused
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    keep INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_class ON messages (keep, id);
-- Write-ahead: a cycle's report as it stands, before the machine or the tag is touched.
CREATE TABLE IF NOT EXISTS held (
    key TEXT PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    keep INTEGER NOT NULL
);
-- Rows that could not be read back as a message: kept for a person, never sent.
CREATE TABLE IF NOT EXISTS quarantine AS SELECT * FROM messages WHERE 0;
"""


def _keep(value: int) -> Keep:
    # A class value this version does not know (a damaged row) counts as an event.
    try:
        return Keep(value)
    except ValueError:
        return Keep.EVENT


#: (messages dropped, class dropped from) -> None; called after the drop is committed.
DropFn = Callable[[int, Keep], None]


class OutboxError(EdgeAgentError):
    """The outbox file cannot be opened or written: the agent must not run without it."""


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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are explicit (_tx) or one statement each.
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=1.0)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise OutboxError(f"{self.path}: SQLite refused WAL mode (got {mode})")
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.executescript(_SCHEMA)  # the first write takes the exclusive lock
            self._db.execute("PRAGMA synchronous=FULL")
            self._durable = True
            rows = self._db.execute(
                "SELECT keep, count(*), coalesce(sum(length(payload)), 0) FROM messages GROUP BY keep"
            )
            self._by_class = {k: 0 for k in Keep}
            self._bytes = {k: 0 for k in Keep}  # payload bytes per class
            for keep, n, size in rows:
                self._by_class[_keep(keep)] += n
                self._bytes[_keep(keep)] += size
            seq = self._db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'messages'"
            ).fetchone()
        except sqlite3.OperationalError as err:
            hint = " (another edge-agent uses this state directory)" if "locked" in str(err) else ""
            raise OutboxError(f"{self.path}: cannot open the outbox: {err}{hint}") from err
        except sqlite3.DatabaseError as err:
            # Never replaced silently: it may hold undelivered cycle reports.
            raise OutboxError(
                f"{self.path}: the outbox is not a readable SQLite file ({err}); "
                "move it aside to start with an empty outbox"
            ) from err
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
        rows = self._db.execute("SELECT key, topic, payload, qos, keep FROM held ORDER BY rowid")
        return [(k, t, bytes(p), q, Keep(c)) for k, t, p, q, c in rows]

    def unhold(self, key: str) -> None:
        # Not fsynced, like a release: a drop lost to a power cut sends the held version later.
        with self._tx("drop a held report", durable=False):
            self._db.execute("DELETE FROM held WHERE key = ?", (key,))
        self._holding.discard(key)

    def oldest(self, limit: int, after: int = 0) -> list[OutMessage]:
        try:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain, keep, created FROM messages"
                " WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
        except sqlite3.Error as err:
            raise OutboxError(f"{self.path}: cannot read the outbox: {err}") from err
        out: list[OutMessage] = []
        for row in rows:
            try:
                i, t, p, q, r, k, c = row
                if not isinstance(t, str) or q not in (0, 1, 2) or not isinstance(p, bytes):
                    raise ValueError(f"topic {t!r}, qos {q!r}, payload of type {type(p).__name__}")
                out.append(OutMessage(i, t, p, q, bool(r), Keep(k), float(c)))
            except (ValueError, TypeError) as err:
                self._quarantine(row[0], str(err))
        return out

    def ack(self, message_id: int) -> None:
        try:
            self._set_durable(False)
            row = self._db.execute(
                "DELETE FROM messages WHERE id = ? RETURNING keep, length(payload)", (message_id,)
            ).fetchone()
        except sqlite3.Error as err:
            raise OutboxError(
                f"{self.path}: cannot remove delivered message {message_id}: {err}"
            ) from err
        if row is not None:  # not already dropped
            self._by_class[_keep(row[0])] -= 1
            self._bytes[_keep(row[0])] -= row[1] or 0

    def _quarantine(self, message_id: int, why: str) -> None:
        # Never sent, never deleted: a person can look at it; the sender goes on with the next.
        log.error(
            "outbox: a stored message cannot be read back; moved to quarantine",
            path=str(self.path),
            outbox_id=message_id,
            error=why,
        )
        with self._tx("quarantine a message", durable=True):
            self._db.execute(
                "INSERT INTO quarantine SELECT * FROM messages WHERE id = ?", (message_id,)
            )
            row = self._db.execute(
                "DELETE FROM messages WHERE id = ? RETURNING keep, length(payload)", (message_id,)
            ).fetchone()
        if row is not None:
            self._by_class[_keep(row[0])] -= 1
            self._bytes[_keep(row[0])] -= row[1] or 0

    def __len__(self) -> int:
        return sum(self._by_class.values())

    def newest_by_topic(self) -> dict[str, int]:
        rows = self._db.execute("SELECT topic, max(id) FROM messages GROUP BY topic")
        return {topic: newest for topic, newest in rows}

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
            raise OutboxError(f"{self.path}: cannot {what}: {err}") from err

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
        with suppress(sqlite3.Error):
            rows = self._db.execute(
                "SELECT keep, count(*), coalesce(sum(length(payload)), 0) FROM messages GROUP BY keep"
            ).fetchall()
            self._by_class = {k: 0 for k in Keep}
            self._bytes = {k: 0 for k in Keep}
            for keep, n, size in rows:
                self._by_class[_keep(keep)] += n
                self._bytes[_keep(keep)] += size

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
