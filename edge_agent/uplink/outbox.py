"""Messages waiting for the broker's acknowledgement.

A message enters the outbox before it is handed to MQTT and leaves it only on PUBACK, so a broker
that is down or a connection that drops loses nothing: unacknowledged messages are sent again, in
order, after the reconnect. ``MemoryOutbox`` survives broker outages; ``SqliteOutbox``
(``outbox_sqlite.py``) has the same interface and survives the gateway's own restarts.

Each message has a class saying what may be dropped when a bounded outbox is full: telemetry first
(the next reading supersedes it), then events, never records (cycle reports: a quality record of a
physical part).
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

from ..errors import EdgeAgentError


class Keep(IntEnum):
    """What a full outbox may drop, lowest first."""

    TELEMETRY = 0
    EVENT = 1
    RECORD = 2  # never dropped


class OutboxCorrupt(EdgeAgentError):
    """The outbox's file is malformed: no retry in this process mends it; a restart (which
    salvages what can be read) does. Raised by the disk outbox, let through by the sender."""


class OutboxError(EdgeAgentError):
    """The outbox file cannot be opened or written: the agent must not run without it."""


#: A payload, or a function that renders it from the message's sequence number.
Payload = bytes | Callable[[int], bytes]


@dataclass(frozen=True)
class OutMessage:
    id: int  # per-gateway sequence number, strictly increasing in publish order
    topic: str
    payload: bytes
    qos: int
    retain: bool
    keep: Keep = Keep.RECORD
    created: float = 0.0  # unix time it entered the outbox


class Outbox(Protocol):
    def put(
        self,
        topic: str,
        payload: Payload,
        qos: int,
        retain: bool,
        keep: Keep = Keep.RECORD,
        release: str | None = None,
    ) -> OutMessage | None:
        """Store a message (and drop the held one ``release``, atomically); None when it was
        refused because the outbox is full of records. Raises OutboxError when it cannot write."""
        ...

    def oldest(self, limit: int, after: int = 0) -> list[OutMessage]:
        """Up to ``limit`` messages with id > ``after``, oldest first."""
        ...

    def ack(self, message_id: int) -> None: ...

    def hold(
        self, key: str, topic: str, payload: bytes, qos: int, keep: Keep = Keep.RECORD
    ) -> None:
        """Write ahead: store (or replace) ``payload`` under ``key`` without sending it.

        A later ``put(..., release=key)`` replaces it in the same transaction. What is still held
        when the process dies is returned by ``held()`` at the next start, to be sent then.
        """
        ...

    def held(self) -> list[tuple[str, str, bytes, int, Keep]]:
        """What a previous run held and never released: (key, topic, payload, qos, keep)."""
        ...

    def unhold(self, key: str) -> None:
        """Drop what ``hold`` stored under ``key`` unsent: its final version went elsewhere."""
        ...

    def __len__(self) -> int: ...

    def newest_by_topic(self) -> dict[str, int]:
        """Each topic with a waiting message -> the id of its newest one."""
        ...

    @property
    def full(self) -> bool:
        """True when only records are left and the limit is reached: take no new parts."""
        ...

    def oldest_created(self) -> float | None:
        """Unix time the oldest waiting message was put, None when empty."""
        ...

    #: Stored rows set aside because they cannot be sent as they are (kept, never sent).
    quarantined: int

    def take_notices(self) -> list[dict[str, Any]]:
        """Events for the line since the last call (``outbox_quarantined``, ``outbox_salvaged``)."""
        ...

    def close(self) -> None: ...


def render(payload: Payload, seq: int) -> bytes:
    return payload(seq) if callable(payload) else payload


class MemoryOutbox:
    """Ordered outbox in memory, bounded like the disk one: past ``max_messages`` the oldest
    telemetry, then the oldest events make room; records are kept and make it ``full``."""

    def __init__(self, max_messages: int = 100_000) -> None:
        self.max_messages = max_messages
        self._records = 0
        self._messages: OrderedDict[int, OutMessage] = OrderedDict()
        self._ids = itertools.count(1)
        self._held: dict[str, bytes] = {}  # at most the cycles in flight
        self.quarantined = 0  # nothing here is ever read back from a file

    def put(
        self,
        topic: str,
        payload: Payload,
        qos: int,
        retain: bool,
        keep: Keep = Keep.RECORD,
        release: str | None = None,
    ) -> OutMessage | None:
        if release is not None:
            self._held.pop(release, None)
        seq = next(self._ids)
        message = OutMessage(seq, topic, render(payload, seq), qos, retain, keep, time.time())
        if len(self._messages) >= self.max_messages and not self._make_room(keep):
            return None
        self._messages[message.id] = message
        self._records += keep is Keep.RECORD
        return message

    def _make_room(self, keep: Keep) -> bool:
        for lowest in (Keep.TELEMETRY, Keep.EVENT):
            if lowest > keep and keep is not Keep.RECORD:
                break
            victim = next((i for i, m in self._messages.items() if m.keep is lowest), None)
            if victim is not None:
                del self._messages[victim]
                return True
        return keep is Keep.RECORD  # a record is always kept; ``full`` stops the parts

    def oldest(self, limit: int, after: int = 0) -> list[OutMessage]:
        out: list[OutMessage] = []
        for message_id, message in self._messages.items():
            if message_id > after:
                out.append(message)
                if len(out) >= limit:
                    break
        return out

    def ack(self, message_id: int) -> None:
        message = self._messages.pop(message_id, None)
        if message is not None and message.keep is Keep.RECORD:
            self._records -= 1

    def hold(
        self, key: str, topic: str, payload: bytes, qos: int, keep: Keep = Keep.RECORD
    ) -> None:
        self._held[key] = payload  # lost with the process, like every message here

    def held(self) -> list[tuple[str, str, bytes, int, Keep]]:
        return []

    def unhold(self, key: str) -> None:
        self._held.pop(key, None)

    def __len__(self) -> int:
        return len(self._messages)

    def newest_by_topic(self) -> dict[str, int]:
        return {m.topic: m.id for m in self._messages.values()}

    @property
    def full(self) -> bool:
        return self._records >= self.max_messages

    def oldest_created(self) -> float | None:
        return next(iter(self._messages.values())).created if self._messages else None

    def take_notices(self) -> list[dict[str, Any]]:
        return []

    def close(self) -> None:
        pass
