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
from typing import Protocol


class Keep(IntEnum):
    """What a full outbox may drop, lowest first."""

    TELEMETRY = 0
    EVENT = 1
    RECORD = 2  # never dropped


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
        self, topic: str, payload: Payload, qos: int, retain: bool, keep: Keep = Keep.RECORD
    ) -> OutMessage | None:
        """Store a message; None when it was refused because the outbox is full of records."""
        ...

    def oldest(self, limit: int, after: int = 0) -> list[OutMessage]:
        """Up to ``limit`` messages with id > ``after``, oldest first."""
        ...

    def ack(self, message_id: int) -> None: ...

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

    def close(self) -> None: ...


def render(payload: Payload, seq: int) -> bytes:
    return payload(seq) if callable(payload) else payload


class MemoryOutbox:
    """Ordered, unbounded outbox in memory."""

    def __init__(self) -> None:
        self._messages: OrderedDict[int, OutMessage] = OrderedDict()
        self._ids = itertools.count(1)

    def put(
        self, topic: str, payload: Payload, qos: int, retain: bool, keep: Keep = Keep.RECORD
    ) -> OutMessage:
        seq = next(self._ids)
        message = OutMessage(seq, topic, render(payload, seq), qos, retain, keep, time.time())
        self._messages[message.id] = message
        return message

    def oldest(self, limit: int, after: int = 0) -> list[OutMessage]:
        out: list[OutMessage] = []
        for message_id, message in self._messages.items():
            if message_id > after:
                out.append(message)
                if len(out) >= limit:
                    break
        return out

    def ack(self, message_id: int) -> None:
        self._messages.pop(message_id, None)

    def __len__(self) -> int:
        return len(self._messages)

    def newest_by_topic(self) -> dict[str, int]:
        return {m.topic: m.id for m in self._messages.values()}

    @property
    def full(self) -> bool:
        return False

    def oldest_created(self) -> float | None:
        return next(iter(self._messages.values())).created if self._messages else None

    def close(self) -> None:
        pass
