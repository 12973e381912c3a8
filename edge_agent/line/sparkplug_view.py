"""What a Sparkplug host receives, one decoded line per message (``edge-agent demo --sparkplug``).

A plain MQTT subscriber on ``spBv1.0/#`` that decodes with Tahu's compiled schema and resolves
aliases from the births it saw, as a host does.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from google.protobuf.message import DecodeError
from paho.mqtt.enums import CallbackAPIVersion

from .sparkplug_metrics import Payload, get_value

SHOWN = 6  # metrics printed per line; the rest are counted


class SparkplugView:
    def __init__(self, host: str, port: int) -> None:
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._names: dict[tuple[str, int], tuple[str, int]] = {}  # (entity, alias) -> name, type
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"edge-agent-demo-spb-host-{time.time_ns()}"
        )
        self._subscribed = threading.Event()
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe("spBv1.0/#", qos=1)
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.loop_start()

    def wait_ready(self, timeout: float = 5.0) -> bool:
        return self._subscribed.wait(timeout)

    def take(self) -> list[str]:
        """The lines received since the last call."""
        with self._lock:
            lines, self._lines = self._lines, []
        return lines

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 4 or parts[1] == "STATE":
            line = f"  spB {msg.topic} {msg.payload[:80].decode('utf-8', 'replace')}"
        else:
            line = self._describe(parts, bytes(msg.payload))
        with self._lock:
            self._lines.append(line)

    def _describe(self, parts: list[str], raw: bytes) -> str:
        kind, entity = parts[2], "/".join([parts[1], *parts[3:]])
        try:
            payload = Payload.FromString(raw)
        except DecodeError:
            return f"  spB {kind:<6} {entity}: not a Sparkplug B payload"
        shown = []
        for m in payload.metrics:
            key = (entity, m.alias)
            if m.name:
                self._names[key] = (m.name, m.datatype)
            name, datatype = self._names.get(key, (m.name or f"alias {m.alias}", m.datatype))
            if m.is_null:  # counted in the header, not shown
                continue
            value = get_value(m, datatype)
            text = f"{value:.6g}" if isinstance(value, float) else str(value)
            shown.append(f"{name}={text}" + (" (historical)" if m.is_historical else ""))
        seq = f" seq {payload.seq}" if payload.HasField("seq") else ""
        more = f" +{len(shown) - SHOWN} more" if len(shown) > SHOWN else ""
        head = f"  spB {kind:<6} {entity}{seq} [{len(payload.metrics)} metrics]"
        return f"{head} {', '.join(shown[:SHOWN])}{more}"
