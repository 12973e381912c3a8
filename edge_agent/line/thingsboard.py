"""ThingsBoard IoT Gateway compatibility: the station as a device behind the ThingsBoard gateway API.

A site that runs the ThingsBoard IoT Gateway today points its ThingsBoard at this agent instead:
on the same MQTT connection as the agent's own topics,

- ``v1/gateway/connect`` ``{"device": name, "type": ...}`` after every connect (ThingsBoard drops a
  gateway's devices when the gateway's session ends), ``v1/gateway/disconnect`` at shutdown;
- every telemetry group message also goes to ``v1/gateway/telemetry`` as
  ``{name: [{"ts": ms, "values": {...}}]}``, and (``cycles: true``) every cycle report as
  ``cycle.*`` keys;
- RPC requests on ``v1/gateway/rpc`` (``{"device", "data": {"id", "method", "params"}}``) run the
  agent's commands (the method is the command name, ``commands.allowed`` applies) and are answered
  on ``v1/gateway/rpc`` with ``{"device", "id", "data": <the command's reply>}``;
- shared attribute updates on ``v1/gateway/attributes`` (``{"device", "data": {...}}``): the
  ``adjustments_attribute`` key carries an adjustment set, exactly as on the retained topic.

Everything goes through the uplink's outbox: nothing is lost while the broker is away.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any, Protocol

import structlog

from ..config_schema import ThingsBoardConfig
from ..station.report import CycleReport
from ..uplink.mqtt import ConnectHook, MessageHandler, dumps
from ..uplink.outbox import Keep, OutMessage
from .commands import Commands

log = structlog.get_logger("thingsboard")

CONNECT = "v1/gateway/connect"
DISCONNECT = "v1/gateway/disconnect"
TELEMETRY = "v1/gateway/telemetry"
ATTRIBUTES = "v1/gateway/attributes"
RPC = "v1/gateway/rpc"


class Link(Protocol):
    """What this module needs of the uplink (``MqttUplink``)."""

    def publish_absolute(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, keep: Keep = ...
    ) -> OutMessage | None: ...

    def subscribe_absolute(self, topic: str, handler: MessageHandler, *, qos: int = 1) -> str: ...

    def on_connect(self, hook: ConnectHook) -> None: ...


class AdjustmentSink(Protocol):
    def on_message(self, topic: str, payload: bytes, properties: Any) -> None: ...


class ThingsBoard:
    """``start()`` before the uplink connects; ``mirror()`` each message, ``cycle()`` each cycle
    report; ``stop()`` at shutdown."""

    def __init__(
        self,
        config: ThingsBoardConfig,
        *,
        device: str,
        link: Link,
        commands: Commands,
        adjustments: AdjustmentSink | None,
    ) -> None:
        self.config = config
        self.device = device
        self.link = link
        self.commands = commands
        #: None while ``commands.adjustments`` is off: the attribute is then only logged.
        self.adjustments = adjustments
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.link.subscribe_absolute(RPC, self.on_rpc)
        self.link.subscribe_absolute(ATTRIBUTES, self.on_attributes)
        self.link.on_connect(self.announce)

    def announce(self) -> None:
        self._send(CONNECT, {"device": self.device, "type": self.config.device_type})

    async def stop(self, timeout: float = 5.0) -> None:
        """Answer the RPCs in flight (bounded), then tell ThingsBoard the device is gone."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        self._send(DISCONNECT, {"device": self.device})

    # ------------------------------------------------------------------ to ThingsBoard

    def mirror(self, suffix: str, payload: dict[str, Any]) -> None:
        """Send an agent message (topic suffix, payload) on as device telemetry, if it maps."""
        if suffix.startswith("telemetry/"):
            values = dict(payload.get("values", {}))
            if payload.get("full") or payload.get("quality") != "good":
                values[f"{payload['group']}.quality"] = payload.get("quality")
            ts = int(datetime.fromisoformat(payload["time"]).timestamp() * 1000)
            self._telemetry(ts, values, Keep.TELEMETRY)

    def cycle(self, report: CycleReport) -> None:
        """A cycle report as ``cycle.*`` device telemetry (``cycles: true``), never dropped."""
        if self.config.cycles:
            self._telemetry(report.epoch_ms, cycle_values(report), Keep.RECORD)

    def _telemetry(self, ts: int, values: dict[str, Any], keep: Keep) -> None:
        self._send(TELEMETRY, {self.device: [{"ts": ts, "values": values}]}, keep)

    def _send(self, topic: str, body: dict[str, Any], keep: Keep = Keep.EVENT) -> None:
        self.link.publish_absolute(topic, dumps(body), qos=1, keep=keep)

    # ------------------------------------------------------------------ from ThingsBoard

    def on_rpc(self, topic: str, payload: bytes, properties: Any) -> None:
        """``{"device", "data": {"id", "method", "params"}}``: run the command in a task."""
        request = _object(payload)
        data = request.get("data") if request is not None else None
        if request is None or not isinstance(data, dict):
            log.warning(
                "ThingsBoard RPC ignored: not {device, data: {...}}", payload=_head(payload)
            )
            return
        if "id" in request:
            return  # a response (ours, echoed back: requests and responses share the topic)
        if request.get("device") != self.device:
            log.warning("ThingsBoard RPC for another device ignored", device=request.get("device"))
            return
        rpc_id = data.get("id")
        if not isinstance(rpc_id, int | str) or isinstance(rpc_id, bool):
            log.warning("ThingsBoard RPC without an id ignored: no reply is possible", rpc=data)
            return
        method = data.get("method")
        task = asyncio.create_task(
            self._answer(rpc_id, method if isinstance(method, str) else "", data.get("params")),
            name=f"tb-rpc-{rpc_id}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, rpc_id: int | str, method: str, params: Any) -> None:
        command = {"correlation_id": rpc_id, "params": {} if params is None else params}
        reply = await self.commands.execute(method, json.dumps(command).encode())
        self._send(RPC, {"device": self.device, "id": rpc_id, "data": reply})

    def on_attributes(self, topic: str, payload: bytes, properties: Any) -> None:
        """Shared attribute updates: ``{"device", "data": {key: value}}``."""
        update = _object(payload)
        data = update.get("data") if update is not None else None
        if update is None or not isinstance(data, dict):
            log.warning("ThingsBoard attributes ignored: not {device, data: {...}}")
            return
        if update.get("device") != self.device:
            return  # another device of the same ThingsBoard gateway session
        key = self.config.adjustments_attribute
        if key is not None and key in data:
            if self.adjustments is None:
                log.warning(
                    "ThingsBoard adjustment set ignored: commands.adjustments is off", key=key
                )
            else:
                value = data[key]
                # A JSON attribute arrives as an object, a string attribute as its text;
                # null or "" clears the set, like an empty retained message.
                raw = b"" if value is None else value.encode() if isinstance(value, str) else None
                self.adjustments.on_message(topic, raw if raw is not None else dumps(value), None)
        others = sorted(k for k in data if k != key)
        if others:
            log.info("ThingsBoard shared attributes received (not used)", keys=others)


def cycle_values(report: CycleReport) -> dict[str, Any]:
    """A cycle report as flat ThingsBoard telemetry keys (the full report stays on ``cycles``)."""
    part = report.part
    values: dict[str, Any] = {
        "cycle.id": report.id,
        "cycle.status": report.status.value,
        "cycle.reason": report.reason.value if report.reason is not None else None,
        "cycle.error": report.error,
        "cycle.tag_uid": report.tag_uid,
        "cycle.part_id": part.get("id"),
        "cycle.order": part.get("order"),
        "cycle.material_lot": part.get("material_lot"),
        "cycle.operation": report.step["operation"] if report.step is not None else None,
        "cycle.duration_ms": report.durations_ms.get("total"),
        "cycle.profile_version": report.profile.get("version"),
        "cycle.adjustments_version": (report.adjustments or {}).get("version"),
    }
    for name, value in report.results.items():
        values[f"cycle.result.{name}"] = value
    return {k: v for k, v in values.items() if v is not None}


def _object(payload: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _head(payload: bytes) -> str:
    return payload[:200].decode("utf-8", "replace")
