"""Subscriptions of the OPC UA driver: handshake waits and pushed telemetry, no polling.

The points a handshake waits on are monitored on one subscription at the driver's publishing
interval; telemetry groups get one subscription each at their own interval (``PushingDriver``).
Every data change notification updates the latest value and wakes whoever waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from asyncua import Client, Node, ua

from ...errors import MachineError
from ...link import Link
from .address_space import _read
from .models import OpcUaPoint, OpcUaSettings

log = structlog.get_logger("opcua")

_T = TypeVar("_T")


class _Changes:
    """asyncua's subscription handler: keeps the latest value of each watched point."""

    def __init__(self, driver: Subscriptions) -> None:
        self.driver = driver

    def datachange_notification(self, node: Node, val: Any, data: Any) -> None:
        dv = data.monitored_item.Value
        # The machine's own time of the value; a server that sets none: its own, else ours.
        stamp = dv.SourceTimestamp or dv.ServerTimestamp
        self.driver._changed(node.nodeid, val, stamp.timestamp() if stamp else time.time())

    def status_change_notification(self, status: Any) -> None:
        log.warning("subscription status changed", device=self.driver.device, status=str(status))


class Subscriptions:
    """Part of ``OpcUaDriver``: the latest value of every watched point, pushed by the server."""

    settings: OpcUaSettings
    device: str
    _client: Client | None
    _link: Link
    _points: dict[str, OpcUaPoint]
    _nodes: dict[str, ua.NodeId]
    _names: dict[ua.NodeId, str]
    _watched: list[str]
    _values: dict[str, Any]
    _stamps: dict[str, float]
    _pushed: dict[float, list[str]]
    _seq: dict[str, int]
    _tick: asyncio.Event
    _connect_lock: asyncio.Lock

    if TYPE_CHECKING:

        @property
        def connected(self) -> bool: ...

        def _point(self, name: str) -> OpcUaPoint: ...

        def _decode(self, name: str, raw: Any) -> Any: ...

        async def _call(self, client: Client, what: str, request: Awaitable[_T]) -> _T: ...

    async def _subscribe(self, client: Client) -> None:
        self._values.clear()
        self._stamps.clear()
        for interval, names in self._pushed.items():
            await self._monitor(client, names, interval)
        if not self._watched:
            return
        interval_ms = self.settings.publishing_interval * 1000
        subscription = await client.create_subscription(interval_ms, _Changes(self))
        nodes = [client.get_node(self._nodes[n]) for n in self._watched]
        handles = await subscription.subscribe_data_change(nodes, sampling_interval=0.0)
        for name, handle in zip(self._watched, handles, strict=True):
            if isinstance(handle, ua.StatusCode):
                raise MachineError(
                    f"cannot monitor point '{name}' ({self._points[name].address}): {handle.name}",
                    device=self.device,
                )
        # The first notification carries the current value; read it too so that a wait right
        # after connect does not depend on the first publish.
        for name, value in zip(
            self._watched,
            await _read(client, [(self._nodes[n], ua.AttributeIds.Value) for n in self._watched]),
            strict=True,
        ):
            if value.StatusCode.is_good():
                self._values[name] = self._decode(name, value.Value.Value)

    async def _monitor(self, client: Client, names: Sequence[str], interval: float) -> None:
        """One subscription publishing every ``interval`` s, sampling ``names`` as often; the first
        notification of each carries its current value, so no Read is needed."""
        ms = interval * 1000
        subscription = await client.create_subscription(ms, _Changes(self))
        nodes = [client.get_node(self._nodes[n]) for n in names]
        handles = await subscription.subscribe_data_change(nodes, sampling_interval=ms)
        for name, handle in zip(names, handles, strict=True):
            if isinstance(handle, ua.StatusCode):
                raise MachineError(
                    f"cannot monitor point '{name}' ({self._points[name].address}): {handle.name}",
                    device=self.device,
                )

    def _changed(self, node_id: ua.NodeId, value: Any, stamp: float | None = None) -> None:
        name = self._names.get(node_id)
        if name is None:
            return
        with contextlib.suppress(ValueError):
            self._values[name] = self._decode(name, value)
            self._seq[name] = self._seq.get(name, 0) + 1
            self._stamps[name] = stamp if stamp is not None else time.time()
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()

    # -- pushed telemetry (driver.PushingDriver) -----------------------------------------------

    async def watch(self, points: Sequence[str], interval: float) -> None:
        names = list(dict.fromkeys(points))
        for name in names:
            self._point(name)  # ValueError naming a point the profile does not have
        async with self._connect_lock:  # a connect under way either includes these or precedes
            watched = self._pushed.setdefault(interval, [])  # re-created at every reconnect
            names = [n for n in names if n not in watched]  # a restarted telemetry: once only
            watched.extend(names)
            if names and self.connected:
                assert self._client is not None
                client = self._client
                monitor = self._monitor(client, names, interval)
                await self._call(client, "CreateMonitoredItems", monitor)

    def latest(self, points: Sequence[str]) -> tuple[dict[str, Any], float] | None:
        if not self.connected:
            error = self._link.last_error or "connection lost"
            raise MachineError(f"no session ({error})", device=self.device)
        if any(n not in self._values for n in points):
            return None
        stamps = [self._stamps[n] for n in points if n in self._stamps]
        return {n: self._values[n] for n in points}, max(stamps, default=time.time())

    async def changed(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._tick.wait(), timeout)
