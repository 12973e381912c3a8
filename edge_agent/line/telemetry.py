"""Machine telemetry: the profile's ``telemetry:`` groups, read on their interval, reported by exception.

Each group is one task: read every point of the group in one driver call (the Modbus driver merges
near-contiguous registers, bridging the group's ``max_gap``), then publish **one** message for the
group holding the points that moved by more than their deadband since they were last reported.
Every ``full_every`` seconds, and on the first read and after a recovery, the message carries every
point, so a consumer that joins late or missed a message is whole again.

A read that fails marks the group's points stale: one message with ``quality: stale`` and one
``telemetry_stale`` event, then silence until the device answers again (``telemetry_recovered`` and
a full report). Timestamps are taken when the read returned, not when the message left.

A driver that can push changes (``PushingDriver``: OPC UA) is not read at all: it is asked to watch
the group's points, sampled every ``interval``, and the group reports what it pushed, with the
server's source timestamps, by the same rules; the session being down makes the group stale.
"""

from __future__ import annotations

import asyncio
import functools
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..errors import MachineError
from ..machine.driver import MachineDriver, PushingDriver
from ..machine.profile import Profile
from ..machine.profile_schema import TelemetryGroup
from ..messages import event, iso, jsonable
from ..supervisor import Spawn, plain_spawn

log = structlog.get_logger("telemetry")

#: (topic suffix, payload, qos) -> queued
Publish = Callable[[str, dict[str, Any], int], object]
Read = Callable[[Sequence[str]], Awaitable[dict[str, Any]]]


def moved(last: Any, value: Any, deadband: float) -> bool:
    """Whether ``value`` is worth reporting after ``last`` was: beyond the deadband, or changed."""
    if deadband > 0 and _number(last) and _number(value):
        return not abs(value - last) <= deadband  # NaN compares false: reported
    return bool(last != value)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass
class GroupState:
    name: str
    spec: TelemetryGroup
    read: Read
    sent: dict[str, Any] = field(default_factory=dict)  # last reported value per point
    last_full: float = -math.inf  # monotonic time of the last full report
    stale_since: float | None = None  # unix time the first failed read
    last_read: float | None = None  # unix time of the last good read
    reads: int = 0
    failures: int = 0
    error: str | None = None


class Telemetry:
    """Watches a profile's telemetry groups on one driver. ``start()``; ``stop()``."""

    def __init__(
        self,
        *,
        gateway_id: str,
        profile: Profile,
        driver: MachineDriver,
        publish: Publish,
        enabled: bool = True,
        spawn: Spawn = plain_spawn,
    ) -> None:
        self.gateway_id = gateway_id
        self.driver = driver
        self.publish = publish
        self.groups = {
            name: GroupState(name, spec, _reader(driver, spec.max_gap))
            for name, spec in profile.telemetry.items()
            if enabled
        }
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._spawn = spawn  # the agent's supervisor restarts a group that fails unexpectedly

    def start(self) -> None:
        self._stopping = False
        self._tasks = [
            self._spawn(f"telemetry-{g.name}", functools.partial(self._run, g))
            for g in self.groups.values()
        ]

    async def stop(self) -> None:
        # The flag as well as cancel(): a cancellation that lands as a read completes can be lost
        # inside the Modbus client (asyncio.wait_for on 3.11); the loop then ends at its next turn.
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        self._tasks = []

    def status(self) -> dict[str, Any]:
        """Per group: quality and when it was last read (for the status command)."""
        return {
            g.name: {
                "quality": "stale" if g.stale_since is not None else "good",
                "last_read": iso(g.last_read) if g.last_read is not None else None,
                "reads": g.reads,
                "failures": g.failures,
                **({"error": g.error} if g.error else {}),
            }
            for g in self.groups.values()
        }

    async def _run(self, g: GroupState) -> None:
        if isinstance(self.driver, PushingDriver):
            await self._follow(g, self.driver)
            return
        loop = asyncio.get_running_loop()
        interval = g.spec.interval
        due = loop.time()
        while not self._stopping:
            try:
                await self.poll(g)
            except Exception:  # a bug must not end this group's watch for good
                log.exception("telemetry poll failed", group=g.name)
            due += interval
            now = loop.time()
            if due < now:  # the read overran its slot: skip the missed ticks, never burst
                due = now
            await asyncio.sleep(due - now)

    async def _follow(self, g: GroupState, driver: PushingDriver) -> None:
        """Report what the driver pushes; wake at least every interval to notice a lost session
        and the next full report."""
        names = list(g.spec.points)
        try:
            await driver.watch(names, g.spec.interval)
        except (MachineError, ValueError) as err:  # kept: set up again at the next connect
            self._failed(g, names, err)
        while not self._stopping:
            try:
                latest = driver.latest(names)
                if latest is not None:
                    self._report(g, *latest)
            except (MachineError, ValueError) as err:
                self._failed(g, names, err)
            except Exception:  # a bug must not end this group's watch for good
                log.exception("telemetry update failed", group=g.name)
            await driver.changed(g.spec.interval)

    async def poll(self, g: GroupState) -> None:
        """One read of group ``g`` and, when something is worth reporting, one message."""
        names = list(g.spec.points)
        try:
            values = await g.read(names)
        except (MachineError, ValueError) as err:
            self._failed(g, names, err)
            return
        self._report(g, values, time.time())

    def _failed(self, g: GroupState, names: list[str], err: Exception) -> None:
        g.failures += 1
        g.error = str(err)
        if g.stale_since is None:
            g.stale_since = time.time()
            self._stale(g, names, str(err))

    def _report(self, g: GroupState, values: dict[str, Any], now: float) -> None:
        """Publish what moved in ``values`` (read or pushed at ``now``), or all of it when due."""
        names = list(g.spec.points)
        g.reads += 1
        g.last_read = now
        recovered = g.stale_since is not None
        if recovered:
            self._event(
                "telemetry_recovered",
                g,
                names,
                stale_s=round(time.time() - (g.stale_since or now), 3),
            )
            log.info("telemetry recovered", group=g.name, device=self.driver.device)
            g.stale_since, g.error = None, None
        mono = time.monotonic()
        full = recovered or mono - g.last_full >= g.spec.full_every
        if full:
            report = values
            g.last_full = mono
        else:
            report = {
                n: v
                for n, v in values.items()
                if n not in g.sent or moved(g.sent[n], v, g.spec.points[n].deadband)
            }
            if not report:
                return
        g.sent.update(report)
        self._send(g, now, report, full=full, quality="good")

    def _send(
        self, g: GroupState, ts: float, values: dict[str, Any], *, full: bool, quality: str
    ) -> None:
        message = {
            "schema": "edge-agent/telemetry/1",
            "gateway_id": self.gateway_id,
            "group": g.name,
            "time": iso(ts),
            "full": full,
            "quality": quality,
            "values": {n: jsonable(v) for n, v in values.items()},
        }
        if quality != "good":
            message["points"] = list(g.spec.points)
            message["error"] = g.error
        self.publish(f"telemetry/{g.name}", message, g.spec.qos)

    def _stale(self, g: GroupState, names: list[str], error: str) -> None:
        log.warning(
            "telemetry stale: device not answering",
            group=g.name,
            device=self.driver.device,
            error=error,
        )
        self._send(g, g.stale_since or time.time(), {}, full=False, quality="stale")
        self._event("telemetry_stale", g, names, error=error)

    def _event(self, name: str, g: GroupState, names: list[str], **extra: Any) -> None:
        payload = event(
            self.gateway_id, name, group=g.name, device=self.driver.device, points=names, **extra
        )
        self.publish("events", payload, 1)


def _reader(driver: MachineDriver, max_gap: int) -> Read:
    # Only Modbus has addresses to bridge. If its module was never imported, the driver cannot be
    # a Modbus driver, and an OPC UA station does not pay for importing pymodbus.
    modbus = sys.modules.get("edge_agent.machine.modbus")
    if modbus is not None and isinstance(driver, modbus.ModbusDriver):
        return functools.partial(driver.read, max_gap=max_gap)
    return driver.read
