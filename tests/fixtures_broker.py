"""A real mosquitto on a free loopback port, per test, and an MQTT subscriber that records."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import pytest_asyncio
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.sim.broker import EmbeddedBroker, find_mosquitto

__all__ = ["MqttRecorder", "broker", "recorder"]


@pytest_asyncio.fixture
async def broker() -> AsyncIterator[EmbeddedBroker]:
    if not find_mosquitto():
        pytest.fail(
            "mosquitto is not installed: `apt-get install mosquitto` (CI does this in .ci/run)"
        )
    b = EmbeddedBroker()
    await b.start()
    yield b
    await b.stop()
    b.close()


class MqttRecorder:
    """Subscribes to a topic filter and keeps every message, in arrival order (paho's own thread)."""

    def __init__(
        self, host: str, port: int, topic: str = "#", *, session: str | None = None
    ) -> None:
        """``session``: a client id for a persistent session (with a persistent broker, nothing
        published while this recorder is disconnected is lost to it); None: a clean session."""
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=session or "",
            clean_session=session is None,
            protocol=mqtt.MQTTv311,
        )
        self._client.reconnect_delay_set(1, 1)
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self._client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    async def ready(self) -> None:
        await asyncio.to_thread(self._subscribed.wait, 5)

    def json(self, topic_suffix: str) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith(topic_suffix)]

    async def wait_for(
        self, topic_suffix: str, count: int, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(found := self.json(topic_suffix)) < count:
            if loop.time() > deadline:
                raise AssertionError(
                    f"{len(found)} of {count} messages on *{topic_suffix} after {timeout} s"
                )
            await asyncio.sleep(0.01)
        return found

    def close(self) -> None:
        self._client.disconnect()  # wakes paho's thread at once; loop_stop() alone waits up to 1 s
        self._client.loop_stop()


@pytest_asyncio.fixture
async def recorder(broker: EmbeddedBroker) -> AsyncIterator[MqttRecorder]:
    r = MqttRecorder(broker.host, broker.port)
    await r.ready()
    yield r
    r.close()
