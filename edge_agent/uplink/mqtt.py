"""The MQTT link to the line: status, cycle reports and (later) commands.

paho-mqtt is driven from the asyncio event loop (socket readiness callbacks), not from paho's own
thread, so callbacks run on the loop and touch our state without locks. Only the blocking TCP
connect runs in a worker thread.

The connection is supervised by ``link.Link`` like every other link: capped exponential backoff
with jitter (a plant's gateways must not all reconnect in the same second after a broker restart),
each round of the broker list one step, one WARNING when the link goes down, DEBUG while it stays
down, one INFO when it recovers.

Delivery: every QoS 1 message goes through the outbox and leaves it only on PUBACK. After a
reconnect, whatever was not acknowledged is sent again, oldest first; consumers drop duplicates by
the message id carried in each payload, and see gaps or order by its per-gateway ``seq``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import socket
import ssl
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from ..config import BrokerConfig
from ..errors import EdgeAgentError
from ..link import Backoff, Link, LinkDown
from ..supervisor import Spawn, plain_spawn
from .outbox import Keep, MemoryOutbox, Outbox, OutMessage

log = structlog.get_logger("uplink")

StatusFn = Callable[[], dict[str, Any]]
#: Called on the event loop after each CONNACK (e.g. to announce devices again).
ConnectHook = Callable[[], None]
#: The last will for the next connection: (topic, payload, qos, retain).
WillFn = Callable[[], tuple[str, bytes, int, bool]]
#: Called on the event loop with (topic, payload, MQTT 5 properties or None) for each message.
MessageHandler = Callable[[str, bytes, Any], None]


def dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def response_properties(correlation: bytes | None) -> Properties:
    """MQTT 5 PUBLISH properties of a reply on a request's response topic."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if correlation is not None:
        props.CorrelationData = correlation
    return props


def classify(suffix: str) -> Keep:
    """What a full outbox may drop: cycle reports never, telemetry first."""
    if suffix == "cycles":
        return Keep.RECORD
    return Keep.TELEMETRY if suffix.split("/")[0] == "telemetry" else Keep.EVENT


#: Messages kept in memory while the outbox cannot write (disk full, I/O error). Parts are refused
#: meanwhile, so what gathers here is one refusal report per part shown, events and replies.
SPILL_MAX = 1000
#: MQTT 5 properties kept for messages waiting in the outbox (replies on a response topic).
PROPERTIES_MAX = 10_000


def _with_seq(body: dict[str, Any]) -> Callable[[int], bytes]:
    return lambda seq: dumps({**body, "seq": seq})


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


_F = TypeVar("_F", bound=Callable[..., None])


def _guarded(callback: _F) -> _F:
    """Nothing raises into paho: its loop would drop the connection, or worse, stop reading."""

    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            callback(*args, **kwargs)
        except Exception:
            log.exception("MQTT callback failed", callback=callback.__name__)

    return cast(_F, run)


#: CONNACK reasons that another attempt with the same settings cannot fix: wait longest.
_AUTH_REFUSED = {
    "Not authorized",
    "Bad user name or password",
    "Banned",
    "Client identifier not valid",
}


class MqttUplink:
    def __init__(
        self,
        broker: BrokerConfig,
        gateway_id: str,
        client_id: str,
        *,
        outbox: Outbox | None = None,
        offline_status: dict[str, Any] | None = None,
    ) -> None:
        self._broker = broker
        self.gateway_id = gateway_id
        self.outbox: Outbox = outbox if outbox is not None else MemoryOutbox()
        self._prefix = f"{broker.topic_prefix}/{gateway_id}"
        self._v5 = broker.protocol == "5"
        # A persistent session (clean_session false) keeps what the broker queued for us (commands)
        # while we were away; our own publishes are redelivered from the outbox either way.
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            clean_session=None if self._v5 else broker.clean_session,
        )
        if broker.username:
            self._client.username_pw_set(broker.username, broker.password)
        if broker.use_tls:
            tls = broker.tls
            self._client.tls_set(
                ca_certs=str(tls.ca_file) if tls else None,
                certfile=str(tls.cert_file) if tls and tls.cert_file else None,
                keyfile=str(tls.key_file) if tls and tls.key_file else None,
            )
            self._client.tls_insecure_set(bool(tls and not tls.verify_hostname))
        self._endpoints = broker.endpoints
        self._endpoint = 0  # index of the broker tried next / connected to
        self._link = Link(
            "broker",
            self._address,
            broker.reconnect_min,
            broker.reconnect_max,
            logger=log,
            context=lambda: {"backlog": len(self.outbox), "oldest_age_s": self.oldest_age},
            per_round=len(self._endpoints),
            spread=True,  # a broker restart drops every gateway of the plant at once
        )
        offline = offline_status or {
            "state": "offline",
            "gateway_id": gateway_id,
            "reason": "connection lost",
        }
        self._client.will_set(self.topic("status"), dumps(offline), qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        self._client.on_socket_open = self._on_socket_open
        self._client.on_socket_close = self._on_socket_close
        self._client.on_socket_register_write = self._on_socket_register_write
        self._client.on_socket_unregister_write = self._on_socket_unregister_write

        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = asyncio.Event()
        self._connack: asyncio.Future[ReasonCode] | None = None
        self._connecting = False
        self._lost = asyncio.Event()
        self._wake = asyncio.Event()
        self._acked = asyncio.Event()
        self._inflight: dict[int, int] = {}  # paho mid -> outbox id
        self._last_sent = 0  # outbox id of the newest message handed to paho on this connection
        self._backlog_end = 0  # newest outbox id queued when this connection came up
        self._backlog_topics: dict[str, int] = {}  # topic -> its newest id in that backlog
        self._sent_ahead: set[int] = set()  # ids > _last_sent already handed over (replay)
        self._newest = 0  # id of the newest message this process queued
        self._last_error: str | None = None  # paho's last socket error on this attempt
        self._status_fn: StatusFn = lambda: {}
        self._subscriptions: dict[
            str, tuple[int, MessageHandler]
        ] = {}  # full topic filter -> handler
        self._properties: dict[int, Properties] = {}  # outbox id -> MQTT 5 properties (memory)
        self._connect_hooks: list[ConnectHook] = []
        self._will: WillFn | None = None  # replaces the status will (Sparkplug's NDEATH)
        self._no_retained: set[str] = set()  # filters whose retained messages are dropped
        self._retained_seen: OrderedDict[str, None] = OrderedDict()  # topics already logged
        self._stopping = False
        self._replay: tuple[int, float] | None = None  # (backlog at connect, since) until drained
        self._status_at = 0.0  # monotonic time the retained status was last published
        self._status_next = 10  # the backlog that makes the next status and log line (x10 each)
        self._status_backlog = 0  # the backlog the last status told
        # While the outbox cannot write: messages waiting to be stored, acks to be stored again.
        self._spill: collections.deque[tuple[str, Any, int, bool, Keep, str | None]] = (
            collections.deque()
        )
        self._ack_retry: set[int] = set()
        self.outbox_error: str | None = None
        self._outbox_trouble = asyncio.Event()
        #: Told when the outbox stops (error text) or resumes (None) being writable.
        self.on_outbox_change: Callable[[str | None], None] | None = None

    # ----------------------------------------------------------------- public API

    def topic(self, suffix: str) -> str:
        return f"{self._prefix}/{suffix}"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def backlog(self) -> int:
        return len(self.outbox)

    async def start(self, status: StatusFn, spawn: Spawn = plain_spawn) -> None:
        """Begin connecting in the background; returns at once (a broker that is down is not fatal).

        ``spawn`` starts the link's long-lived tasks (the agent's supervisor restarts them).
        """
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._status_fn = status
        self._release_held()
        self._tasks = [
            spawn("mqtt-supervisor", self._supervise),
            spawn("mqtt-sender", self._send),
            spawn("mqtt-misc", self._misc),
            spawn("mqtt-status", self._refresh_status),
            spawn("outbox-retry", self._retry_outbox),
        ]

    def publish(
        self,
        suffix: str,
        payload: dict[str, Any],
        *,
        qos: int = 1,
        retain: bool = False,
        keep: Keep | None = None,
        release: str | None = None,
    ) -> OutMessage | None:
        """Queue a message. It is delivered when the broker is reachable, in order.

        ``release``: the id of a report ``hold()`` committed; this message replaces it.

        The payload gains a stable ``id`` (kept if it has one) and the per-gateway ``seq``, so
        consumers can drop redelivered duplicates. None when a full outbox refused it (telemetry).
        """
        body = {"id": uuid.uuid4().hex, **payload}
        keep = classify(suffix) if keep is None else keep
        return self._put(self.topic(suffix), _with_seq(body), qos, retain, keep, release)

    def hold(self, suffix: str, payload: dict[str, Any]) -> None:
        """Write ahead: commit ``payload`` (keyed by its ``id``) without sending it.

        A later ``publish(..., release=id)`` replaces it; if the process dies first, the next start
        sends it as it stands. Raises OutboxError when the outbox cannot write: the caller must
        then not touch the machine or the tag.
        """
        try:
            self.outbox.hold(payload["id"], self.topic(suffix), dumps(payload), 1)
        except EdgeAgentError as err:
            self._outbox_failed(str(err))
            raise

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
            "time": _now_iso(),
            "error": error,
        }
        body = {"id": uuid.uuid4().hex, **event}
        # Now, straight to the broker if it is there; and stored once the outbox writes again.
        if self.connected:
            self._client.publish(self.topic("events"), dumps(body), qos=1)
        self._queue_spill(self.topic("events"), _with_seq(body), 1, False, Keep.EVENT, None)
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
                        "time": _now_iso(),
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
            self._put(topic, _with_seq(body), qos, False, keep, key)

    @property
    def oldest_age(self) -> float:
        """Seconds the oldest unacknowledged message has waited (0 when none)."""
        oldest = self.outbox.oldest_created()
        return round(max(0.0, time.time() - oldest), 1) if oldest is not None else 0.0

    def subscribe(self, suffix: str, handler: MessageHandler, *, qos: int = 1) -> str:
        """Deliver messages on ``<prefix>/<gateway_id>/<suffix>`` (wildcards allowed) to ``handler``.

        Subscriptions are renewed on every reconnect. Returns the full topic filter.
        """
        return self.subscribe_absolute(self.topic(suffix), handler, qos=qos)

    # Absolute topics: for other APIs spoken on the same connection (ThingsBoard gateway API,
    # MQTT 5 response topics). The payload is sent as given: no ``id``/``seq`` added.

    def publish_absolute(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        keep: Keep = Keep.EVENT,
        properties: Properties | None = None,
    ) -> OutMessage | None:
        """Queue ``payload`` on ``topic`` through the outbox, like ``publish()``.

        ``properties`` (MQTT 5 only, ignored on 3.1.1) are kept in memory beside the outbox: a
        message replayed from a disk outbox after a restart goes out without them.
        """
        if not topic or "+" in topic or "#" in topic or "\0" in topic:
            raise ValueError(f"not a topic to publish on: {topic!r}")
        message = self._put(topic, payload, qos, retain, keep, None)
        if message is not None and properties is not None and self._v5:
            self._properties[message.id] = properties
            if len(self._properties) > PROPERTIES_MAX:
                # Their messages were dropped by a full outbox, or never come back: forget the
                # oldest, so this map cannot grow with the number of replies.
                del self._properties[next(iter(self._properties))]
        return message

    def subscribe_absolute(
        self, topic: str, handler: MessageHandler, *, qos: int = 1, retained: bool = True
    ) -> str:
        """Deliver messages on ``topic`` (a full filter, wildcards allowed) to ``handler``.

        ``retained=False``: retained messages are dropped, with one WARNING per topic.
        """
        self._subscriptions[topic] = (qos, handler)
        if not retained:
            self._no_retained.add(topic)
        if self.connected:
            self._subscribe(topic, qos)
        return topic

    def set_will(self, will: WillFn) -> None:
        """Use ``will()`` as the last will instead of the offline status, asked before every
        connect (Sparkplug: the NDEATH, with a new bdSeq for each session)."""
        self._will = will

    def publish_now(
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False
    ) -> bool:
        """Hand ``payload`` to the current connection at once, outside the outbox; False when not
        connected. For messages valid only on the session they were made for (Sparkplug ``seq``):
        their sender keeps what must not be lost until this returns True."""
        if not self.connected:
            return False
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def _subscribe(self, topic: str, qos: int) -> None:
        # MQTT 5: keep the retain flag as published, so a retained message published while we
        # are connected is recognised too (3.1.1 clears it on live delivery).
        if self._v5:
            self._client.subscribe(topic, options=SubscribeOptions(qos=qos, retainAsPublished=True))
        else:
            self._client.subscribe(topic, qos=qos)

    def on_connect(self, hook: ConnectHook) -> None:
        """Call ``hook`` on the loop after every CONNACK, once subscriptions are renewed."""
        self._connect_hooks.append(hook)

    def refresh_status(self) -> None:
        """Publish the retained status now (when connected): something the line must see changed."""
        if self.connected:
            self._publish_status()

    async def wait_connected(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
            return True
        except TimeoutError:
            return False

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

    async def stop(self, offline_status: dict[str, Any], timeout: float = 5.0) -> None:
        """Publish the offline status, deliver what is queued (bounded), disconnect."""
        self.publish("status", offline_status, qos=1, retain=True)
        delivered = await self.flush(timeout) if self.connected else False
        if not delivered:
            log.warning("uplink stopped with undelivered messages", backlog=len(self.outbox))
        self._stopping = True
        self._link.stop()
        if self.connected:
            self._client.disconnect()  # a clean DISCONNECT: the broker does not send the last will
            await asyncio.sleep(0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        sock = self._client.socket()
        if sock is not None:
            self._unwatch(sock)

    # ----------------------------------------------------------------- connection supervisor

    async def _supervise(self) -> None:
        await self._link.run(self._session)

    async def _session(self) -> None:
        """Connect to the next broker of the list and hold the connection until it is lost."""
        self._link.device = self._address
        failed = await self._connect_once()
        if failed is not None:
            # Failover: the next broker in the list; the backoff grows with each round of it.
            self._endpoint = (self._endpoint + 1) % len(self._endpoints)
            reason, refused = failed
            raise LinkDown(reason, refused=refused)
        self._link.up()
        self._lost.clear()
        await self._lost.wait()

    @property
    def _address(self) -> str:
        host, port = self._endpoints[self._endpoint]
        return f"{'mqtts' if self._broker.use_tls else 'mqtt'}://{host}:{port}"

    async def _connect_once(self) -> tuple[str, bool] | None:
        """Connect and wait for CONNACK. None on success, else (reason in words, login refused)."""
        assert self._loop is not None
        self._connack = self._loop.create_future()
        self._last_error = None
        self._client.on_log = self._on_log  # until CONNACK only: paho formats every log line
        host, port = self._endpoints[self._endpoint]
        kwargs: dict[str, Any] = {}
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = (
                0 if self._broker.clean_session else self._broker.session_expiry
            )
            kwargs = {"clean_start": self._broker.clean_session, "properties": props}
        if self._will is not None:
            self._client.will_set(*self._will())
        self._connecting = True  # keeps loop_misc() off the client while the thread connects
        try:
            await asyncio.to_thread(
                self._client.connect, host, port, self._broker.keepalive, **kwargs
            )
        except ssl.SSLCertVerificationError as err:
            return f"TLS: broker certificate rejected: {err.verify_message}", False
        except ssl.SSLError as err:
            return f"TLS: {err.reason or err}", False
        except (OSError, socket.gaierror) as err:
            return err.strerror or str(err) or type(err).__name__, False
        finally:
            self._connecting = False
        try:
            code = await asyncio.wait_for(self._connack, timeout=10)
        except ConnectionError as err:
            return str(err), False
        except TimeoutError:
            self._client.disconnect()
            return "no CONNACK within 10 s", False
        if code.is_failure:
            self._client.disconnect()
            return f"broker refused the connection: {code}", str(code) in _AUTH_REFUSED
        return None

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

    async def _refresh_status(self) -> None:
        # The retained status is refreshed every status_interval while connected, so its
        # backlog and oldest_age_s stay current for the line.
        interval = self._broker.status_interval
        while True:
            wait = self._status_at + interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            elif self.connected:
                self._publish_status()
            else:
                await self._connected.wait()  # the connect publishes it

    async def _misc(self) -> None:
        # paho's keepalive pings and timeouts
        while True:
            await asyncio.sleep(1)
            if self._client.socket() is not None and not self._connecting:
                self._client.loop_misc()

    # ----------------------------------------------------------------- paho callbacks (on the loop)

    @_guarded
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, code: ReasonCode, props: Any
    ) -> None:
        client.on_log = None
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(code)
        if code.is_failure:
            return
        # Whatever paho still holds from the last connection is resent from the outbox instead,
        # oldest first, so the outbox stays the one source of truth.
        client.drop_out_messages()
        self._inflight.clear()
        self._last_sent = 0
        self._sent_ahead.clear()
        # Everything queued now is the backlog: replayed before newer messages of the same topic.
        self._backlog_topics = self.outbox.newest_by_topic()
        self._backlog_end = max(self._backlog_topics.values(), default=0)
        self._connected.set()
        for topic, (qos, _) in self._subscriptions.items():
            self._subscribe(topic, qos)
        self._publish_status()
        for hook in self._connect_hooks:
            try:
                hook()
            except Exception:  # a hook's bug must not take the link down
                log.exception("connect hook failed")
        self._replay = (len(self.outbox), time.monotonic()) if len(self.outbox) else None
        self._wake.set()

    def _publish_status(self) -> None:
        # Straight to paho, not through the outbox: it must not wait behind a backlog.
        status = {
            "state": "online",
            **self._status_fn(),
            "backlog": len(self.outbox),
            "oldest_age_s": self.oldest_age,
        }
        self._client.publish(self.topic("status"), dumps(status), qos=1, retain=True)
        self._status_at, self._status_backlog = time.monotonic(), status["backlog"]
        # Thresholds count again from what is waiting now: a backlog that grows anew is reported.
        self._status_next = max(10, 10 ** len(str(status["backlog"])))

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, code: ReasonCode, props: Any
    ) -> None:
        self._connected.clear()
        self._lost.set()
        if self._connack is not None and not self._connack.done():
            # Closed before CONNACK: the supervisor retries now instead of waiting out its timeout.
            self._connack.set_exception(
                ConnectionError(f"connection closed before CONNACK ({self._last_error or code})")
            )

    @_guarded
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

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
        # The reason a TLS peer hung up (e.g. "certificate required") reaches us only as a log.
        if level == mqtt.MQTT_LOG_ERR:
            self._last_error = buf

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        for topic, (_, handler) in self._subscriptions.items():
            if mqtt.topic_matches_sub(topic, msg.topic):
                if msg.retain and topic in self._no_retained:
                    self._drop_retained(msg.topic)
                    continue
                try:
                    handler(msg.topic, bytes(msg.payload), getattr(msg, "properties", None))
                except Exception:  # a handler bug must not take the link down
                    log.exception("message handler failed", topic=msg.topic)

    def _drop_retained(self, topic: str) -> None:
        # Once per topic (a bounded memory of topics): the broker sends it again at each connect.
        if topic in self._retained_seen:
            self._retained_seen.move_to_end(topic)
            return
        self._retained_seen[topic] = None
        if len(self._retained_seen) > 1000:
            self._retained_seen.popitem(last=False)
        log.warning(
            "retained message ignored: this topic takes live messages only (a retained one "
            "would act again at every reconnect); clear it with an empty retained publish",
            topic=topic,
        )

    # Socket plumbing: paho tells us which socket to watch. connect() runs in a worker thread, so
    # registration is handed to the loop; a socket closed before that runs is skipped.
    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # Small messages must not wait for Nagle + delayed ACK (~40 ms per command reply).
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._in_loop(lambda: self._watch(sock, self._read, write=False))

    def _read(self) -> None:
        self._client.loop_read()
        # TLS: records already decrypted wait inside the SSL object, where the selector cannot
        # see them; read them now or PUBACKs stall until the next byte arrives.
        for _ in range(1000):
            sock = self._client.socket()
            if sock is None or not getattr(sock, "pending", lambda: 0)():
                break
            self._client.loop_read()

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._unwatch(sock)  # paho closes the socket right after: unregister now, not later

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(lambda: self._watch(sock, client.loop_write, write=True))

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(lambda: self._unwatch(sock, read=False))

    def _in_loop(self, fn: Callable[[], None]) -> None:
        if self._loop is None or self._loop.is_closed():
            return  # paho's __del__ after the loop is gone: nothing left to watch
        if threading.get_ident() == self._loop_thread:
            fn()
        else:
            self._loop.call_soon_threadsafe(fn)

    def _watch(self, sock: Any, callback: Callable[[], Any], *, write: bool) -> None:
        assert self._loop is not None
        if sock.fileno() == -1:
            return
        if write:
            self._loop.add_writer(sock, callback)
        else:
            self._loop.add_reader(sock, callback)

    def _unwatch(self, sock: Any, *, read: bool = True) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, KeyError, OSError):
            if read:
                self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
