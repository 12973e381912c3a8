"""The MQTT link to the line: status, cycle reports and commands, on one paho client.

``MqttUplink`` is the one face the agent and the line outputs use. This module holds the session's
settings (TLS, MQTT 5, the last will), subscriptions (retained commands filtered), the retained
status and what each CONNACK sets going. Beside it, mixed into the one class so that all state
lives on the event loop without locks:

- ``paho_loop``: paho driven from the asyncio event loop, not from paho's own thread;
- ``connection``: the connection supervised by ``link.Link``, failing over along the broker list;
- ``sender``: the outbox → broker path (replay, order, write-ahead hold/release, the memory queue
  while the outbox cannot write, the backlog);
- ``payload``: JSON encoding, the per-gateway ``seq`` and ``classify()``.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from ..config_schema import BrokerConfig
from ..link import Link
from ..supervisor import Spawn, plain_spawn
from .connection import Connection, WillFn
from .outbox import Keep, Outbox, OutMessage, Payload
from .paho_loop import PahoLoop, guarded
from .payload import classify, dumps, with_seq
from .sender import PROPERTIES_MAX, Sender

__all__ = [
    "ConnectHook",
    "MessageHandler",
    "MqttUplink",
    "StatusFn",
    "WillFn",
    "classify",
    "dumps",
    "response_properties",
]

log = structlog.get_logger("uplink")

StatusFn = Callable[[], dict[str, Any]]

#: paho's matcher builds a trie on every call; a gateway sees few (filter, topic) pairs, and
#: under a flood of commands each message would build it once per subscription.
_matches = functools.lru_cache(maxsize=4096)(mqtt.topic_matches_sub)
#: Called on the event loop after each CONNACK (e.g. to announce devices again).
ConnectHook = Callable[[], None]
#: Called on the event loop with (topic, payload, MQTT 5 properties or None) for each message.
MessageHandler = Callable[[str, bytes, Any], None]


def response_properties(correlation: bytes | None) -> Properties:
    """MQTT 5 PUBLISH properties of a reply on a request's response topic."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if correlation is not None:
        props.CorrelationData = correlation
    return props


class MqttUplink(Sender, Connection, PahoLoop):
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
        self._init_sender(outbox)
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
        self._bridge()

        self._tasks: list[asyncio.Task[None]] = []
        self._connected = asyncio.Event()
        self._connack: asyncio.Future[ReasonCode] | None = None
        self._connecting = False
        self._lost = asyncio.Event()
        self._last_error: str | None = None  # paho's last socket error on this attempt
        self._status_fn: StatusFn = lambda: {}
        self._subscriptions: dict[
            str, tuple[int, MessageHandler]
        ] = {}  # full topic filter -> handler
        self._connect_hooks: list[ConnectHook] = []
        self._will: WillFn | None = None  # replaces the status will (Sparkplug's NDEATH)
        self._no_retained: set[str] = set()  # filters whose retained messages are dropped
        self._retained_seen: OrderedDict[str, None] = OrderedDict()  # topics already logged
        self._stopping = False
        self._status_at = 0.0  # monotonic time the retained status was last published
        self._status_next = 10  # the backlog that makes the next status and log line (x10 each)
        self._status_backlog = 0  # the backlog the last status told

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
        return self._put(self.topic(suffix), with_seq(body), qos, retain, keep, release)

    def publish_encoded(
        self, suffix: str, payload: Payload, *, keep: Keep, qos: int = 1, release: str | None = None
    ) -> OutMessage | None:
        """Queue a message its producer encoded with its own ``id``, like ``publish()``; a
        callable ``payload`` is given the ``seq``."""
        return self._put(self.topic(suffix), payload, qos, False, keep, release)

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

    async def stop(self, offline_status: dict[str, Any], timeout: float = 5.0) -> None:
        """Publish the offline status, deliver what is queued (bounded), disconnect."""
        self.publish("status", offline_status, qos=1, retain=True)
        delivered = await self.flush(timeout) if self.connected else False
        if not delivered:
            log.warning("uplink stopped with undelivered messages", backlog=len(self.outbox))
        self._stopping = True
        self._link.stop()
        if self.connected:
            if not delivered:
                # Still queued behind a backlog or a sender that failed: without this the retained
                # status would go on saying online, as the clean DISCONNECT sends no last will.
                self._client.publish(
                    self.topic("status"), dumps(offline_status), qos=1, retain=True
                )
            self._client.disconnect()  # a clean DISCONNECT: the broker does not send the last will
            await asyncio.sleep(0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        sock = self._client.socket()
        if sock is not None:
            self._unwatch(sock)

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

    # ----------------------------------------------------------------- paho callbacks (on the loop)

    @guarded
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
        if self.outbox.quarantined:  # stored rows that cannot be sent: a person should look
            status["outbox_quarantined"] = self.outbox.quarantined
        self._client.publish(self.topic("status"), dumps(status), qos=1, retain=True)
        self._status_at, self._status_backlog = time.monotonic(), status["backlog"]
        # Thresholds count again from what is waiting now: a backlog that grows anew is reported.
        self._status_next = max(10, 10 ** len(str(status["backlog"])))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        for topic, (_, handler) in self._subscriptions.items():
            if _matches(topic, msg.topic):
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
