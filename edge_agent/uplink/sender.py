"""Outbox → broker: every QoS 1 message goes through the outbox and leaves it only on PUBACK.

After a reconnect, whatever was not acknowledged is sent again, oldest first; consumers drop
duplicates by the message id carried in each payload, and see gaps or order by its per-gateway
``seq``. Cycle reports are written ahead (``hold``) and replaced on release; while the outbox
cannot write, messages wait in a bounded memory queue and parts are refused.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ..config_schema import BrokerConfig
from ..errors import EdgeAgentError
from ..link import Backoff
from .outbox import Keep, MemoryOutbox, Outbox, OutboxCorrupt, OutMessage
from .paho_loop import guarded
from .payload import dumps, now_iso, with_seq

log = structlog.get_logger("uplink")

#: Messages kept in memory while the outbox cannot write (disk full, I/O error). Parts are refused
#: meanwhile, so what gathers here is one refusal report per part shown, events and replies.
SPILL_MAX = 1000
#: MQTT 5 properties kept for messages waiting in the outbox (replies on a response topic).
PROPERTIES_MAX = 10_000


class Sender:
    """The sending half of ``MqttUplink``: mixed into it, sharing its paho client."""

    _client: mqtt.Client
    _broker: BrokerConfig
    gateway_id: str
    _status_next: int
    _status_backlog: int

    if TYPE_CHECKING:  # provided by MqttUplink

        @property
        def connected(self) -> bool: ...

        def topic(self, suffix: str) -> str: ...

        def publish(
            self,
            suffix: str,
            payload: dict[str, Any],
            *,
            qos: int = 1,
            retain: bool = False,
            keep: Keep | None = None,
            release: str | None = None,
        ) -> OutMessage | None: ...

        def refresh_status(self) -> None: ...

        def _publish_status(self) -> None: ...

    def _init_sender(self, outbox: Outbox | None) -> None:
        self.outbox: Outbox = outbox if outbox is not None else MemoryOutbox()
        self._wake = asyncio.Event()
        self._acked = asyncio.Event()
        self._inflight: dict[int, int] = {}  # paho mid -> outbox id
        self._last_sent = 0  # outbox id of the newest message handed to paho on this connection
        self._backlog_end = 0  # newest outbox id queued when this connection came up
        self._backlog_topics: dict[str, int] = {}  # topic -> its newest id in that backlog
        self._sent_ahead: set[int] = set()  # ids > _last_sent already handed over (replay)
        self._newest = 0  # id of the newest message this process queued
        self._properties: dict[int, Properties] = {}  # outbox id -> MQTT 5 properties (memory)
        self._replay: tuple[int, float] | None = None  # (backlog at connect, since) until drained
        # While the outbox cannot write: messages waiting to be stored, acks to be stored again.
        self._spill: collections.deque[tuple[str, Any, int, bool, Keep, str | None]] = (
            collections.deque()
        )
        self._ack_retry: set[int] = set()
        self.outbox_error: str | None = None
        self._outbox_trouble = asyncio.Event()
        #: Told when the outbox stops (error text) or resumes (None) being writable.
        self.on_outbox_change: Callable[[str | None], None] | None = None

    def hold(self, suffix: str, key: str, payload: bytes) -> None:
        """Write ahead: commit ``payload`` (encoded, with its ``id`` ``key``) without sending it.

        A later ``publish_encoded(..., release=key)`` replaces it; if the process dies first, the
        next start sends it as it stands. Raises OutboxError when the outbox cannot write: the
        caller must then not touch the machine or the tag.
        """
        try:
            self.outbox.hold(key, self.topic(suffix), payload, 1)
        except EdgeAgentError as err:
            self._outbox_failed(str(err))
            raise

    def unhold(self, key: str) -> None:
        """Drop the report held under ``key`` unsent: its final version went to another output.
        Never raises; a copy the outbox could not drop is sent at the next start."""
        try:
            self.outbox.unhold(key)
        except EdgeAgentError as err:
            log.error("a held cycle report could not be dropped", report=key, error=str(err))
            self._outbox_failed(str(err))

    @property
    def recording(self) -> bool:
        """False while the outbox cannot write: no part may be taken."""
        return self.outbox_error is None

    def _put(
        self, topic: str, payload: Any, qos: int, retain: bool, keep: Keep, release: str | None
    ) -> OutMessage | None:
        if self._spill or self.outbox_error is not None:
            self._queue_spill(topic, payload, qos, retain, keep, release)  # keeps the order
            return None
        try:
            message = self.outbox.put(topic, payload, qos, retain, keep, release)
        except EdgeAgentError as err:
            self._queue_spill(topic, payload, qos, retain, keep, release)
            self._outbox_failed(str(err))
            return None
        if message is not None:
            self._newest = message.id
        self._wake.set()
        return message

    def _queue_spill(
        self, topic: str, payload: Any, qos: int, retain: bool, keep: Keep, release: str | None
    ) -> None:
        if keep is Keep.TELEMETRY:
            return  # the next reading supersedes it
        if len(self._spill) >= SPILL_MAX:
            victim = next((m for m in self._spill if m[4] < Keep.RECORD), self._spill[0])
            self._spill.remove(victim)
            log.error(
                "outbox unwritable and the memory queue full: a message is lost", topic=victim[0]
            )
        self._spill.append((topic, payload, qos, retain, keep, release))

    def _outbox_failed(self, error: str) -> None:
        self._outbox_trouble.set()
        if self.outbox_error is not None:
            return
        self.outbox_error = error
        log.error("outbox cannot write: not taking parts until it can", error=error)
        event = {
            "schema": "edge-agent/event/1",
            "event": "outbox_failed",
            "gateway_id": self.gateway_id,
            "time": now_iso(),
            "error": error,
        }
        body = {"id": uuid.uuid4().hex, **event}
        # Now, straight to the broker if it is there; and stored once the outbox writes again.
        if self.connected:
            self._client.publish(self.topic("events"), dumps(body), qos=1)
        self._queue_spill(self.topic("events"), with_seq(body), 1, False, Keep.EVENT, None)
        if self.on_outbox_change is not None:
            self.on_outbox_change(error)
        self.refresh_status()

    def _retry_pending(self) -> bool:
        """Store what waits in memory, oldest first; True once nothing is left."""
        for message_id in list(self._ack_retry):
            self.outbox.ack(message_id)  # OutboxError: still failing
            self._ack_retry.discard(message_id)
        while self._spill:
            topic, payload, qos, retain, keep, release = self._spill[0]
            message = self.outbox.put(topic, payload, qos, retain, keep, release)
            self._spill.popleft()
            if message is not None:
                self._newest = message.id
            self._wake.set()
        return True

    async def _retry_outbox(self) -> None:
        backoff = Backoff(0.2, 5.0)
        while True:
            await self._outbox_trouble.wait()
            await asyncio.sleep(backoff.remaining() or backoff.minimum)
            try:
                self._retry_pending()
            except OutboxCorrupt:
                raise  # no retry mends a malformed file: the supervisor ends the process
            except EdgeAgentError as err:
                backoff.failed(str(err))
                continue
            backoff.succeeded()
            self._outbox_trouble.clear()
            if self.outbox_error is not None:
                log.info("outbox writes again: taking parts", was=self.outbox_error)
                self.outbox_error = None
                self.publish(
                    "events",
                    {
                        "schema": "edge-agent/event/1",
                        "event": "outbox_recovered",
                        "gateway_id": self.gateway_id,
                        "time": now_iso(),
                    },
                )
                if self.on_outbox_change is not None:
                    self.on_outbox_change(None)
                self.refresh_status()

    def _release_held(self) -> None:
        # Reports held by a run that died (crash, power cut): each goes out as it was last held.
        for key, topic, payload, qos, keep in self.outbox.held():
            body = json.loads(payload)
            log.warning(
                "sending a cycle report held by the last run, which stopped mid-cycle",
                report=key,
                status=body.get("status"),
                reason=body.get("reason"),
            )
            self._put(topic, with_seq(body), qos, False, keep, key)
        self._tell_outbox_notices()

    def _tell_outbox_notices(self) -> None:
        # Rows the outbox set aside or salvaged: the line hears of each as an event.
        for notice in self.outbox.take_notices():
            fields = {k: v for k, v in notice.items() if v is not None}
            fields["quarantined_total"] = self.outbox.quarantined
            self.publish(
                "events",
                {
                    "schema": "edge-agent/event/1",
                    "gateway_id": self.gateway_id,
                    "time": now_iso(),
                    **fields,
                },
            )

    @property
    def oldest_age(self) -> float:
        """Seconds the oldest unacknowledged message has waited (0 when none)."""
        oldest = self.outbox.oldest_created()
        return round(max(0.0, time.time() - oldest), 1) if oldest is not None else 0.0

    async def flush(self, timeout: float) -> bool:
        """Wait until the broker has acknowledged everything queued. False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.outbox):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._acked.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), min(remaining, 0.5))
        return True

    async def wait_outbox_room(self) -> None:
        """Return once the outbox is below its limit: each PUBACK makes room."""
        while self.outbox.full:
            self._acked.clear()
            await self._acked.wait()

    # ----------------------------------------------------------------- sending

    async def _send(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._watch_backlog()
            if not self.connected:
                continue
            room = self._broker.inflight - len(self._inflight)
            if room <= 0:
                continue
            if self._last_sent < self._backlog_end:
                self._send_replay(room)
            else:
                self._send_in_order(room)
            self._tell_outbox_notices()

    def _send_replay(self, room: int) -> None:
        """Replay what was queued before this connection, oldest first, paced by PUBACKs.

        Up to half the window (at least one message) goes to newer messages on topics whose
        backlog is already out, so a long replay does not hold back, say, a command reply; per
        topic the order holds.
        """
        # Count against the window, not the free room: PUBACKs often free one slot at a time,
        # and half of one slot is none, which starved live messages behind a long replay.
        share = max(1, self._broker.inflight // 2)
        ahead = sum(1 for outbox_id in self._inflight.values() if outbox_id in self._sent_ahead)
        live_room = min(room, share - ahead)
        if live_room > 0 and self._newest > self._backlog_end:
            scan = self.outbox.oldest(live_room + self._broker.inflight + 100, self._backlog_end)
            for message in scan:
                if live_room == 0:
                    break
                if message.id in self._sent_ahead:
                    continue
                if self._backlog_topics.get(message.topic, 0) > self._last_sent:
                    continue  # this topic still has backlog to go first
                if not self._hand_over(message):
                    return
                self._sent_ahead.add(message.id)
                live_room -= 1
                room -= 1
        batch = self.outbox.oldest(room, after=self._last_sent)
        for message in batch:
            if message.id > self._backlog_end:
                break
            if not self._hand_over(message):
                return
            self._last_sent = message.id
        if len(batch) < room or (batch and batch[-1].id > self._backlog_end):
            # Nothing older left (the rest was acknowledged or dropped): back to plain order.
            self._last_sent = max(self._last_sent, self._backlog_end)
            self._wake.set()

    def _send_in_order(self, room: int) -> None:
        if self._sent_ahead:
            # Those sent ahead and acknowledged since are never met again in order: forget them.
            self._sent_ahead = {i for i in self._sent_ahead if i > self._last_sent}
        while room > 0:
            batch = self.outbox.oldest(room, after=self._last_sent)
            if not batch:
                return
            for message in batch:
                if message.id in self._sent_ahead:  # went out during the replay
                    self._sent_ahead.discard(message.id)
                elif not self._hand_over(message):
                    return
                else:
                    room -= 1
                self._last_sent = message.id

    def _hand_over(self, message: OutMessage) -> bool:
        info = self._client.publish(
            message.topic,
            message.payload,
            qos=message.qos,
            retain=message.retain,
            properties=self._properties.get(message.id),
        )
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False  # the connection dropped under us; the supervisor reconnects
        if message.qos == 0:
            self.outbox.ack(message.id)
            self._properties.pop(message.id, None)
        else:
            self._inflight[info.mid] = message.id
        return True

    def _watch_backlog(self) -> None:
        # Each tenfold growth (10, 100, 1000, ...) is logged and refreshes the status at once,
        # so the line sees a backlog building up, not only once a minute.
        backlog = len(self.outbox)
        if backlog < self._status_next:
            return
        while backlog >= self._status_next:
            self._status_next *= 10
        log.info("outbox backlog growing", backlog=backlog, oldest_age_s=self.oldest_age)
        self.refresh_status()

    @guarded
    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, code: ReasonCode, props: Any
    ) -> None:
        message_id = self._inflight.pop(mid, None)
        if message_id is not None and code.is_failure:
            # MQTT 5: the broker refused this message (not authorized, quota, ...). It stays in
            # the outbox and is offered again after the next reconnect, never silently dropped.
            log.error("broker refused a message", reason=str(code), outbox_id=message_id)
            self._wake.set()
        elif message_id is not None:
            try:
                self.outbox.ack(message_id)
            except EdgeAgentError as err:  # stored again once the outbox writes
                self._ack_retry.add(message_id)
                self._outbox_failed(str(err))
            self._properties.pop(message_id, None)
            self._acked.set()
            self._wake.set()
            if self._replay is not None and not len(self.outbox):
                count, since = self._replay
                self._replay = None
                log.info(
                    "backlog delivered", messages=count, seconds=round(time.monotonic() - since, 2)
                )
                self._publish_status()  # the retained status says backlog 0 again
            elif self._status_backlog and not len(self.outbox):
                self._publish_status()  # a backlog the status told of (growing) is gone
