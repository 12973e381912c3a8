"""Messages waiting for the broker's acknowledgement.

A message enters the outbox before it is handed to MQTT and leaves it only on PUBACK, so a broker
that is down or a connection that drops loses nothing: unacknowledged messages are sent again, in
order, after the reconnect. This in-memory outbox survives broker outages; a disk-backed one with
the same interface survives the gateway's own restarts.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class OutMessage:
    id: int  # per-gateway sequence number, strictly increasing in publish order
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Outbox(Protocol):
    def put(self, topic: str, payload: bytes, qos: int, retain: bool) -> OutMessage: ...

    def oldest(self, limit: int, after: int = 0) -> list[OutMessage]:
        """Up to ``limit`` messages with id > ``after``, oldest first."""
        ...

    def ack(self, message_id: int) -> None: ...

    def __len__(self) -> int: ...


class MemoryOutbox:
    """Ordered, unbounded outbox in memory."""

    def __init__(self) -> None:
        self._messages: OrderedDict[int, OutMessage] = OrderedDict()
        self._ids = itertools.count(1)

    def put(self, topic: str, payload: bytes, qos: int, retain: bool) -> OutMessage:
        message = OutMessage(next(self._ids), topic, payload, qos, retain)
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
