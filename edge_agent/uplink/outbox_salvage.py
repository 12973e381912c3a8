"""The disk outbox's file, and what it does with damage: rows it cannot send, files it cannot
trust.

``open_db`` opens the file (WAL mode, locked, its tables). One check decides whether a stored row
can go to the broker (``checked_topic``, ``check_row``); a row that fails it is moved to the
``quarantine`` table with the reason, never sent and never deleted. A file SQLite calls malformed
at open is moved aside whole (``outbox.sqlite3.corrupt-<UTC>``) and every row that can still be
read is copied into a fresh file (``open_sound``, ``copy_rows``). A file deleted or replaced under
a running agent is noticed and made anew from the handle still open on the old one
(``FileWatch``, ``copy_over``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from .outbox import OutboxError

log = structlog.get_logger("outbox")

#: SQLite's primary result codes for a file whose structure is broken: no retry mends these.
_CORRUPT, _NOTADB = 11, 26
#: MQTT caps a topic at 65 535 bytes and a payload at 268 435 455 (paho refuses more).
_TOPIC_MAX, _PAYLOAD_MAX = 65_535, 268_435_455

MESSAGE_COLUMNS = "CAST(topic AS BLOB), typeof(topic), payload, qos, retain, keep, created"
HELD_COLUMNS = "CAST(key AS BLOB), CAST(topic AS BLOB), typeof(topic), payload, qos, keep"


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
#: Columns the quarantine table gained after its first version (added to older files at open).
_QUARANTINE_MORE = ("held_key TEXT", "error TEXT")


def open_db(path: Path) -> sqlite3.Connection:
    """The outbox file, created if need be, in WAL mode, locked, with its tables."""
    # Autocommit mode: transactions are explicit (the outbox's _tx) or one statement each.
    db = sqlite3.connect(path, isolation_level=None, timeout=1.0)
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise OutboxError(f"{path}: SQLite refused WAL mode (got {mode})")
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.executescript(_SCHEMA)  # the first write takes the exclusive lock
        have = {row[1] for row in db.execute("PRAGMA table_info(quarantine)")}
        for column in _QUARANTINE_MORE:
            if column.split()[0] not in have:
                db.execute(f"ALTER TABLE quarantine ADD COLUMN {column}")
        db.execute("PRAGMA synchronous=FULL")
    except BaseException:
        db.close()
        raise
    return db


def open_sound(path: Path) -> tuple[sqlite3.Connection, dict[str, Any] | None]:
    """The outbox file opened; a malformed one is moved aside first and what can be read copied
    into a fresh one: then also what was found and done (the ``outbox_salvaged`` event's fields)."""
    db: sqlite3.Connection | None = None
    try:
        db = open_db(path)
        damage = integrity(db)
    except sqlite3.DatabaseError as err:
        if not is_corrupt(err):
            raise
        damage = str(err)
    if damage is None and db is not None:
        return db, None
    if db is not None:
        with suppress(sqlite3.Error):
            db.close()
    aside = move_aside(path, "corrupt")
    db = open_db(path)
    counts = salvage(aside, db)
    log.error(
        "outbox file damaged: moved aside, every readable message copied into a new one",
        path=str(path),
        moved_to=str(aside),
        damage=damage,
        **counts,
    )
    return db, {"damage": damage, "moved_to": str(aside), **counts}


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class FileWatch:
    """The outbox file as opened at ``path``: notices it deleted or replaced under the running
    agent (``look``) and then makes it anew from the handle still open on the old one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = _identity(path)
        self.gone: str | None = None  # what happened to the file, until it is made anew
        self._copied = False  # its rows copied, the old handle closed; not yet reopened

    def look(self) -> str | None:
        """What happened to the file, the first time it is found deleted or replaced."""
        now = _identity(self.path)
        if now == self._file:
            return None
        self.gone = "deleted" if now is None else "replaced by another file"
        log.error(f"outbox file {self.gone} while the agent runs", path=str(self.path))
        return self.gone

    def remake(self, db: sqlite3.Connection) -> tuple[sqlite3.Connection, str | None]:
        """A new file at ``path`` with every row ``db`` still reads, open; and what happened to
        the old one. Raises sqlite3.Error or OSError; the next call goes on where this one stopped."""
        if not self._copied:
            copy_over(db, self.path)
            db.close()  # checkpoints into the old file; deletes "<path>-wal" by name
            # Should it still be there: the old file's, copied already, never to be replayed
            # into the new one.
            self.path.with_name(self.path.name + "-wal").unlink(missing_ok=True)
            self._copied = True
        new = open_db(self.path)
        self._copied = False
        self._file, was, self.gone = _identity(self.path), self.gone, None
        return new, was


def is_corrupt(err: sqlite3.Error) -> bool:
    """True for "database disk image is malformed" and "file is not a database"."""
    code = getattr(err, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_CORRUPT, _NOTADB)


def checked_topic(raw: object, kind: object) -> str:
    """The topic of a stored row, if a broker would take it; ValueError saying why not."""
    if kind != "text" or not isinstance(raw, bytes):
        raise ValueError(f"the topic is stored as {kind}, not as text")
    try:
        topic = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"the topic is not valid UTF-8 (byte {err.start}): {raw[:80]!r}") from err
    if not topic or len(raw) > _TOPIC_MAX:
        raise ValueError(f"the topic is empty or too long ({len(raw)} bytes)")
    for char, name in (("+", "a wildcard '+'"), ("#", "a wildcard '#'"), ("\0", "a NUL")):
        if char in topic:
            raise ValueError(f"the topic {topic[:200]!r} holds {name}: not a topic to publish on")
    return topic


def check_row(payload: object, qos: object) -> bytes:
    """The payload of a stored row, if it can be published with ``qos``; ValueError if not."""
    if qos not in (0, 1, 2) or isinstance(qos, bool):
        raise ValueError(f"QoS {qos!r} is not 0, 1 or 2")
    if not isinstance(payload, bytes):
        raise ValueError(f"the payload is stored as {type(payload).__name__}, not as bytes")
    if len(payload) > _PAYLOAD_MAX:
        raise ValueError(f"the payload is too large for MQTT ({len(payload)} bytes)")
    return payload


def checked_held(row: tuple[object, ...]) -> tuple[str, str, bytes, int, int]:
    """A held report (read with HELD_COLUMNS), if it can be sent; ValueError saying why not.

    It goes out re-stamped with a ``seq`` and releases its key: a JSON object under a UTF-8 key.
    """
    raw_key, raw, kind, payload, qos, keep = row
    if not isinstance(raw_key, bytes):
        raise ValueError(f"the report's key is stored as {type(raw_key).__name__}")
    try:
        key = raw_key.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"the report's key is not valid UTF-8: {raw_key[:80]!r}") from err
    topic, body = checked_topic(raw, kind), check_row(payload, qos)
    try:
        report = json.loads(body)
    except ValueError as err:  # UnicodeDecodeError included
        raise ValueError(f"the held report is not JSON: {err}") from err
    if not isinstance(report, dict):
        raise ValueError("the held report is not a JSON object")
    return key, topic, body, int(qos), int(keep)  # type: ignore[call-overload]


def held_quarantine(row: tuple[object, ...], why: str) -> tuple[object, ...]:
    """A held row as a quarantine row: no id (never queued), its key kept beside it."""
    raw_key, raw, _, payload, qos, keep = row
    key = raw_key.decode("utf-8", "replace") if isinstance(raw_key, bytes) else str(raw_key)
    return (None, raw, payload, qos, 0, keep, time.time(), key, why)


def integrity(db: sqlite3.Connection) -> str | None:
    """None when SQLite finds the file sound, else its first complaint (reads every page)."""
    first = db.execute("PRAGMA quick_check(1)").fetchone()
    if first is not None and first[0] == "ok":
        return None
    return str(first[0] if first else "no answer").replace("*** in database main ***\n", "")


def aside_name(path: Path, why: str) -> Path:
    """``<name>.<why>-<UTC time>``, beside ``path``, not taken yet."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.{why}-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.{why}-{stamp}-{n}")
    return aside


def move_aside(path: Path, why: str) -> Path:
    """Rename the outbox file (with its WAL) out of the way; its new path."""
    aside = aside_name(path, why)
    path.rename(aside)
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        wal.rename(aside.with_name(aside.name + "-wal"))  # where SQLite looks for it
    path.with_name(path.name + "-shm").unlink(missing_ok=True)  # rebuilt from the WAL
    return aside


@dataclass
class Copied:
    messages: int = 0  # copied as they were, ready to send
    quarantined: int = 0  # readable but not sendable: in the quarantine table
    held: int = 0  # write-ahead reports copied
    unreadable: int = 0  # known to exist but not readable: only in the file moved aside
    seq: int = 0  # the sequence number the copy continues from


def salvage(aside: Path, dst: sqlite3.Connection) -> dict[str, int]:
    """Copy what can be read from the damaged file ``aside`` into ``dst``; the counts."""
    old = sqlite3.connect(aside, isolation_level=None)
    try:
        copied = copy_rows(old, dst)
    finally:
        old.close()
    return {
        "salvaged": copied.messages,
        "held": copied.held,
        "quarantined": copied.quarantined,
        "unreadable": copied.unreadable,
    }


def copy_over(db: sqlite3.Connection, path: Path) -> None:
    """Put a copy of the whole database open as ``db`` (its file deleted or replaced) at
    ``path``; a file found there is kept as ``<name>.replaced-<UTC time>``.

    Copied through the open handle (WAL included) into a file of another name, then renamed:
    the new file has no WAL yet, so closing ``db`` after this, which deletes "<path>-wal" by
    name, deletes only the old file's.
    """
    copy = path.with_name(path.name + ".new")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        copy.unlink(missing_ok=True)
        target = sqlite3.connect(copy)
        try:
            db.backup(target)
        finally:
            target.close()
        if path.exists():  # not ours: kept for a person
            path.rename(aside_name(path, "replaced"))
        copy.rename(path)
    except BaseException:
        copy.unlink(missing_ok=True)
        raise


def _ids(src: sqlite3.Connection, sql: str) -> Iterator[int]:
    """Row ids from ``sql`` (its one parameter: the id to start after), stepping over damaged
    pages: after an error the scan starts again further on, 1, 2, 4, ... ids later."""
    after, misses = 0, 0
    while misses < 32:
        try:
            for (i,) in src.execute(sql, (after,)):
                yield i
                after, misses = i, 0
            return
        except sqlite3.DatabaseError:
            after += 1 << misses
            misses += 1


def copy_rows(src: sqlite3.Connection, dst: sqlite3.Connection) -> Copied:
    """Copy every readable message, held report and quarantined row from ``src`` into ``dst``
    (one transaction, ids kept); rows that fail the checks go to ``dst``'s quarantine."""
    done = Copied()
    ids = set(_ids(src, "SELECT id FROM messages WHERE id > ? ORDER BY id"))
    # The index is a b-tree of its own: it names rows whose table page is lost, to count them.
    for keep in (0, 1, 2):
        scan = "SELECT id FROM messages INDEXED BY messages_by_class WHERE keep = %d AND id > ?"
        ids.update(_ids(src, scan % keep + " ORDER BY id"))
    dst.execute("BEGIN IMMEDIATE")
    try:
        for i in sorted(ids):
            try:
                row = src.execute(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?", (i,))
                found = row.fetchone()
            except sqlite3.DatabaseError:
                found = None
            if found is None:
                done.unreadable += 1
                continue
            raw, kind, payload, qos, retain, keep, created = found
            try:
                values = (i, checked_topic(raw, kind), check_row(payload, qos), qos, retain)
                float(created)
                dst.execute(
                    "INSERT INTO messages (id, topic, payload, qos, retain, keep, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (*values, int(keep), created),
                )
                done.messages += 1
            except (ValueError, TypeError, OverflowError) as err:
                quarantine(dst, (i, raw, payload, qos, retain, keep, created, None, str(err)))
                done.quarantined += 1
        for rowid in sorted(set(_ids(src, "SELECT rowid FROM held WHERE rowid > ? ORDER BY 1"))):
            try:
                row = src.execute(f"SELECT {HELD_COLUMNS} FROM held WHERE rowid = ?", (rowid,))
                found = row.fetchone()
            except sqlite3.DatabaseError:
                found = None
            if found is None:
                done.unreadable += 1
                continue
            try:
                key, topic, payload, qos, keep = checked_held(found)
                dst.execute(
                    "INSERT OR REPLACE INTO held (key, topic, payload, qos, keep)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (key, topic, payload, qos, int(keep)),
                )
                done.held += 1
            except (ValueError, TypeError, OverflowError) as err:
                quarantine(dst, held_quarantine(found, str(err)))
                done.quarantined += 1
        for rowid in _ids(src, "SELECT rowid FROM quarantine WHERE rowid > ? ORDER BY 1"):
            try:
                kept = src.execute("SELECT * FROM quarantine WHERE rowid = ?", (rowid,)).fetchone()
                quarantine(dst, (*kept, None, None)[:9])
            except sqlite3.DatabaseError:
                done.unreadable += 1
        seq = 0
        try:
            found = src.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'")
            seq = int((found.fetchone() or (0,))[0])
        except (sqlite3.DatabaseError, TypeError, ValueError):
            log.error(
                "outbox: the sequence number cannot be read back; going on from the highest id"
            )
        done.seq = max([seq, *ids])
        dst.execute("DELETE FROM sqlite_sequence WHERE name = 'messages'")
        dst.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('messages', ?)", (done.seq,))
        dst.execute("COMMIT")
    except BaseException:
        if dst.in_transaction:
            dst.execute("ROLLBACK")
        raise
    return done


def quarantine(dst: sqlite3.Connection, row: tuple[object, ...]) -> None:
    """Insert ``row`` (the messages columns, held_key, error) into the quarantine table."""
    topic = row[1]
    if isinstance(topic, bytes):  # read as bytes to check it: kept as text when it is text
        with suppress(UnicodeDecodeError):
            row = (row[0], topic.decode("utf-8"), *row[2:])
    dst.execute(
        "INSERT INTO quarantine (id, topic, payload, qos, retain, keep, created, held_key, error)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        row,
    )
