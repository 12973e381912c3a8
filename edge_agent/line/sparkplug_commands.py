"""Sparkplug B commands from the host to the edge node (docs/sparkplug.md).

NCMD ``Node Control/Rebirth``, ``Reload`` and ``Next Server``; DCMD writes to the machine's points
through the agent's ``write`` command (its checks, its refusals) and ``Station/Paused`` through
``pause``/``resume``. Every outcome goes back to the node as ``Command/Last Result``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Protocol

import structlog
from google.protobuf.message import DecodeError

from .commands import Commands
from .sparkplug_metrics import Catalogue, Payload, get_value, now_ms

log = structlog.get_logger("sparkplug")


class Node(Protocol):
    """What the commands need of the edge node (``SparkplugNode``)."""

    node: Catalogue
    device: Catalogue

    def rebirth(self) -> None: ...

    def next_server(self) -> None: ...

    def command_result(self, text: str, written: dict[str, Any] | None = None) -> None: ...


class HostCommands:
    """Carries out the host's NCMD and DCMD messages, each command in a task of its own."""

    def __init__(self, node: Node, commands: Commands) -> None:
        self.node, self.commands = node, commands
        self._tasks: set[asyncio.Task[Any]] = set()  # commands in flight

    async def stop(self, timeout: float) -> None:
        """Let the commands in flight finish (bounded), then cancel what is left."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _decode(self, topic: str, payload: bytes) -> Any:
        try:
            return Payload.FromString(payload)
        except DecodeError:
            log.warning("Sparkplug command ignored: not a Sparkplug B payload", topic=topic)
            return None

    def on_ncmd(self, topic: str, payload: bytes, properties: Any) -> None:
        message = self._decode(topic, payload)
        for metric in message.metrics if message is not None else []:
            m = self.node.node.find(metric)
            name = m.name if m is not None else metric.name or f"alias {metric.alias}"
            if m is None or not m.name.startswith("Node Control/"):
                log.warning("Sparkplug NCMD ignored: not a node control", metric=name)
            elif get_value(metric, m.datatype) is not True:
                continue
            elif m.name == "Node Control/Rebirth":
                log.info("Sparkplug rebirth requested")
                self.node.rebirth()
            elif m.name == "Node Control/Next Server":
                log.info("Sparkplug next server requested: NDEATH, then the next broker")
                self.node.next_server()
                return  # the rest of this NCMD belonged to the session just left
            else:
                self._spawn(self._command("reload", {}, rebirth=True), "sparkplug-reload")

    def on_dcmd(self, topic: str, payload: bytes, properties: Any) -> None:
        message = self._decode(topic, payload)
        if message is None:
            return
        writes: dict[str, Any] = {}
        for metric in message.metrics:
            m = self.node.device.find(metric)
            name = m.name if m is not None else metric.name or f"alias {metric.alias}"
            if m is None or not m.writable:
                why = "unknown metric" if m is None else "read-only"
                self._refuse(f"{name}: {why}; nothing was written")
                return
            value = get_value(metric, m.datatype)
            if m.name == "Station/Paused":
                command = "pause" if value else "resume"
                self._spawn(self._command(command, {}), f"sparkplug-{command}")
            elif m.point is not None:
                writes[m.point] = value
        if writes:
            self._spawn(self._command("write", {"values": writes}), "sparkplug-write")

    async def _command(self, name: str, params: dict[str, Any], rebirth: bool = False) -> None:
        body = {"correlation_id": f"sparkplug-{now_ms()}", "params": params}
        reply = await self.commands.execute(name, json.dumps(body).encode())
        if reply.get("ok"):
            written = params.get("values", {})
            done = ", ".join(f"{k}={v}" for k, v in written.items())
            self.node.command_result(f"{name} done" + (f": {done}" if done else ""), written)
            if rebirth:
                self.node.rebirth()
        else:
            self._refuse(f"{name} refused: {reply.get('error', {}).get('message')}")

    def _refuse(self, text: str) -> None:
        log.warning("Sparkplug command refused", result=text)
        self.node.command_result(text)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(_logged(coro, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _logged(coro: Any, name: str) -> None:
    try:
        await coro
    except Exception:  # a bug in one command must not go unseen nor take the node down
        log.exception("Sparkplug command failed", task=name)
