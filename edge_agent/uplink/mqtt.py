"""The MQTT link to the line: status, cycle reports and (later) commands.

paho-mqtt is driven from the asyncio event loop (socket readiness callbacks), not from paho's own
thread, so callbacks run on the loop and touch our state without locks. Only the blocking TCP
connect runs in a worker thread.

One supervisor owns the connection: capped exponential backoff with full jitter (a plant's
gateways must not all reconnect in the same second after a broker restart), one WARNING when the
link goes down, DEBUG while it stays down, one INFO when it recovers.

Delivery: every QoS 1 message goes through the outbox and leaves it only on PUBACK. After a
reconnect, whatever was not acknowledged is sent again, oldest first; consumers drop duplicates by
the message id carried in each payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from ..config import BrokerConfig
from .outbox import MemoryOutbox, Outbox, OutMessage

log = structlog.get_logger("uplink")

StatusFn = Callable[[], dict[str, Any]]
#: Called on the event loop with (topic, payload, MQTT 5 properties or None) for each message.
MessageHandler = Callable[[str, bytes, Any], None]


def dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, default=str).encode()


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
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,  # nothing is queued for us by the broker; the outbox owns redelivery
        )
        if broker.username:
            self._client.username_pw_set(broker.username, broker.password)
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
        self._lost = asyncio.Event()
        self._wake = asyncio.Event()
        self._acked = asyncio.Event()
        self._inflight: dict[int, int] = {}  # paho mid -> outbox id
        self._last_sent = 0  # outbox id of the newest message handed to paho on this connection
        self._status_fn: StatusFn = lambda: {}
        self._subscriptions: dict[
            str, tuple[int, MessageHandler]
        ] = {}  # full topic filter -> handler
        self._stopping = False

    # ----------------------------------------------------------------- public API

    def topic(self, suffix: str) -> str:
        return f"{self._prefix}/{suffix}"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def backlog(self) -> int:
        return len(self.outbox)

    async def start(self, status: StatusFn) -> None:
        """Begin connecting in the background; returns at once (a broker that is down is not fatal)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._status_fn = status
        self._tasks = [
            asyncio.create_task(self._supervise(), name="mqtt-supervisor"),
            asyncio.create_task(self._send(), name="mqtt-sender"),
            asyncio.create_task(self._misc(), name="mqtt-misc"),
        ]

    def publish(
        self, suffix: str, payload: dict[str, Any], *, qos: int = 1, retain: bool = False
    ) -> OutMessage:
        """Queue a message. It is delivered when the broker is reachable, in order."""
        message = self.outbox.put(self.topic(suffix), dumps(payload), qos, retain)
        self._wake.set()
        return message

    def subscribe(self, suffix: str, handler: MessageHandler, *, qos: int = 1) -> str:
        """Deliver messages on ``<prefix>/<gateway_id>/<suffix>`` (wildcards allowed) to ``handler``.

        Subscriptions are renewed on every reconnect. Returns the full topic filter.
        """
        topic = self.topic(suffix)
        self._subscriptions[topic] = (qos, handler)
        if self.connected:
            self._client.subscribe(topic, qos=qos)
        return topic

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

    async def stop(self, offline_status: dict[str, Any], timeout: float = 5.0) -> None:
        """Publish the offline status, deliver what is queued (bounded), disconnect."""
        self.publish("status", offline_status, qos=1, retain=True)
        delivered = await self.flush(timeout) if self.connected else False
        if not delivered:
            log.warning("uplink stopped with undelivered messages", backlog=len(self.outbox))
        self._stopping = True
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
        failures = 0
        while not self._stopping:
            reason = await self._connect_once()
            if reason is None:
                if failures:
                    log.info("broker link recovered", broker=self._address, attempts=failures + 1)
                else:
                    log.info("broker connected", broker=self._address)
                failures = 0
                self._lost.clear()
                await self._lost.wait()
                if self._stopping:
                    return
                log.warning(
                    "broker link lost; reconnecting", broker=self._address, backlog=len(self.outbox)
                )
                continue
            failures += 1
            delay = self._backoff(failures)
            level = log.warning if failures == 1 else log.debug
            level(
                "broker unreachable",
                broker=self._address,
                reason=reason,
                retry_in_s=round(delay, 2),
                attempt=failures,
            )
            await asyncio.sleep(delay)

    @property
    def _address(self) -> str:
        return f"{self._broker.host}:{self._broker.port}"

    def _backoff(self, failures: int) -> float:
        # Full jitter: uniformly random in [min, capped exponential]; spreads a fleet's reconnects.
        cap = min(
            self._broker.reconnect_max, self._broker.reconnect_min * 2 ** min(failures - 1, 16)
        )
        return random.uniform(self._broker.reconnect_min, max(cap, self._broker.reconnect_min))

    async def _connect_once(self) -> str | None:
        """Connect and wait for CONNACK. Returns None on success, else the reason in words."""
        assert self._loop is not None
        self._connack = self._loop.create_future()
        try:
            await asyncio.to_thread(
                self._client.connect, self._broker.host, self._broker.port, self._broker.keepalive
            )
        except (OSError, socket.gaierror) as err:
            return err.strerror or str(err)
        try:
            code = await asyncio.wait_for(self._connack, timeout=10)
        except TimeoutError:
            self._client.disconnect()
            return "no CONNACK within 10 s"
        if code.is_failure:
            self._client.disconnect()
            return f"broker refused the connection: {code}"
        return None

    # ----------------------------------------------------------------- sending

    async def _send(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.connected:
                continue
            room = self._broker.inflight - len(self._inflight)
            if room <= 0:
                continue
            for message in self.outbox.oldest(room, after=self._last_sent):
                info = self._client.publish(
                    message.topic, message.payload, qos=message.qos, retain=message.retain
                )
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    break  # the connection dropped under us; the supervisor reconnects
                self._last_sent = message.id
                if message.qos == 0:
                    self.outbox.ack(message.id)
                else:
                    self._inflight[info.mid] = message.id

    async def _misc(self) -> None:
        # paho's keepalive pings and timeouts
        while True:
            await asyncio.sleep(1)
            if self._client.socket() is not None:
                self._client.loop_misc()

    # ----------------------------------------------------------------- paho callbacks (on the loop)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, code: ReasonCode, props: Any
    ) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(code)
        if code.is_failure:
            return
        # Whatever paho still holds from the last connection is resent from the outbox instead,
        # oldest first, so the outbox stays the one source of truth.
        client.drop_out_messages()
        self._inflight.clear()
        self._last_sent = 0
        self._connected.set()
        for topic, (qos, _) in self._subscriptions.items():
            client.subscribe(topic, qos=qos)
        status = {"state": "online", **self._status_fn(), "backlog": len(self.outbox)}
        client.publish(self.topic("status"), dumps(status), qos=1, retain=True)
        self._wake.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, code: ReasonCode, props: Any
    ) -> None:
        self._connected.clear()
        self._lost.set()

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, code: ReasonCode, props: Any
    ) -> None:
        message_id = self._inflight.pop(mid, None)
        if message_id is not None:
            self.outbox.ack(message_id)
            self._acked.set()
            self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        for topic, (_, handler) in self._subscriptions.items():
            if mqtt.topic_matches_sub(topic, msg.topic):
                try:
                    handler(msg.topic, bytes(msg.payload), getattr(msg, "properties", None))
                except Exception:  # a handler bug must not take the link down
                    log.exception("message handler failed", topic=msg.topic)

    # Socket plumbing: paho tells us which socket to watch. connect() runs in a worker thread, so
    # registration is handed to the loop; a socket closed before that runs is skipped.
    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(lambda: self._watch(sock, client.loop_read, write=False))

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._unwatch(sock)  # paho closes the socket right after: unregister now, not later

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(lambda: self._watch(sock, client.loop_write, write=True))

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(lambda: self._unwatch(sock, read=False))

    def _in_loop(self, fn: Callable[[], None]) -> None:
        assert self._loop is not None
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
