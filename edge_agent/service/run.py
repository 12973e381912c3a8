"""The daemon as a service: tells systemd how it is, reloads on SIGHUP, serves /healthz, /metrics.

``Service.run`` wraps ``Agent.run``. Under systemd (``Type=notify``): READY=1 once the station
takes parts, STATUS= whenever its state in words changes, WATCHDOG=1 every half WatchdogSec while
the event loop turns AND the part-taking loop is alive (a task that died or a part held far
longer than a cycle can last stops the pings, and systemd restarts the daemon), STOPPING=1 on
SIGTERM. Without $NOTIFY_SOCKET none of this runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from ..errors import EdgeAgentError
from .heartbeat import longest_cycle
from .http import serve
from .systemd import notify, watchdog_interval

if TYPE_CHECKING:
    from ..agent import Agent

log = structlog.get_logger("service")

STATUS_EVERY = 5.0  # seconds between looks at the state when systemd wants no watchdog


class Links:
    """Up or down, and how often each came back: broker, machine, reader."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.up: dict[str, bool] = {}
        self.reconnects = {"broker": 0, "machine": 0, "reader": 0}
        self._broker_connects = 0
        agent.uplink.on_connect(self._broker_connected)  # exact: every CONNACK

    def _broker_connected(self) -> None:
        self._broker_connects += 1
        self.reconnects["broker"] = self._broker_connects - 1

    def states(self) -> dict[str, bool]:
        reader: Any = self.agent.reader
        while hasattr(reader, "inner"):  # a filter in front of the reader (on_return)
            reader = reader.inner
        connected = getattr(reader, "connected", None)  # nfc, autoid: an Event; simulated: none
        return {
            "broker": self.agent.uplink.connected,
            "machine": self.agent.driver.connected,
            "reader": connected.is_set() if connected is not None else True,
        }

    def sample(self) -> dict[str, bool]:
        """Machine and reader reconnects are counted as seen here: down at one look, up at the
        next (every second while the endpoint is on, and at each scrape)."""
        states = self.states()
        for link in ("machine", "reader"):
            if states[link] and self.up.get(link) is False:
                self.reconnects[link] += 1
        self.up = states
        return states


class Service:
    def __init__(self, agent: Agent, stop: asyncio.Event) -> None:
        self.agent = agent
        self.stop = stop
        self.links = Links(agent)
        #: Seconds one part may be in hand before the loop counts as stuck (from the profile).
        self.longest_cycle: Callable[[], float] = lambda: longest_cycle(agent.profile)
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again = False

    # ------------------------------------------------------------------ state in words

    def health(self) -> tuple[bool, str]:
        """(healthy, the state in words): what STATUS= says and /healthz answers."""
        if self.stop.is_set():
            return False, "stopping: no new parts, finishing the cycle in flight, flushing"
        agent = self.agent
        if not agent.heartbeat.started:
            return False, "starting"
        status = agent.status()
        accepting = bool(status.get("accepting_parts", True))
        problems = [f"{p['component']}: {p['error']}" for p in status.get("problems", [])]
        # Waiting for room in a full outbox is a known state, not a hang.
        stalled = agent.heartbeat.stalled(self.longest_cycle() if accepting else math.inf)
        if stalled is not None:
            problems.insert(0, stalled)
        if not accepting:
            problems.insert(0, "not accepting parts")
        if problems or status.get("health", "ok") != "ok":
            return False, "degraded: " + ("; ".join(problems) or "see status")
        words = "paused by the line: parts refused" if agent.paused else "accepting parts"
        links = self.links.states()
        if not links["broker"]:
            words += f"; broker not connected, {agent.uplink.backlog} messages waiting"
        if not links["machine"]:
            words += "; machine not connected"
        if not links["reader"]:
            words += "; reader not connected"
        return True, words

    def alive(self) -> bool:
        """The watchdog's question: is the part-taking path alive (the loop asking is alive)."""
        agent = self.agent
        if self.stop.is_set():
            return True  # the loop ends on purpose; the drain is bounded by its own timeouts
        accepting = bool(agent.status().get("accepting_parts", True))
        return agent.heartbeat.stalled(self.longest_cycle() if accepting else math.inf) is None

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        server = None
        listen = self.agent.config.health.listen
        if listen is not None:
            try:
                server = await serve(self, *listen)
            except OSError as err:  # the station's work matters more than its metrics
                log.error(
                    "health endpoint not started; running without it",
                    address=f"{listen[0]}:{listen[1]}",
                    error=err.strerror or str(err),
                )
        runner = asyncio.create_task(self.agent.run(self.stop), name="agent")
        helpers = [asyncio.create_task(self._systemd(runner), name="systemd")]
        if server is not None:
            helpers.append(asyncio.create_task(self._sample(), name="link-sampler"))
        try:
            await runner
        finally:
            for task in helpers:
                task.cancel()
            for task in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if server is not None:
                server.close()
                await server.wait_closed()

    async def _sample(self) -> None:
        while True:
            self.links.sample()
            await asyncio.sleep(1.0)

    async def _systemd(self, runner: asyncio.Task[None]) -> None:
        if not os.environ.get("NOTIFY_SOCKET"):
            return
        interval = watchdog_interval()
        tick = min(interval, STATUS_EVERY) if interval else STATUS_EVERY
        started = asyncio.ensure_future(self.agent.heartbeat.running.wait())
        while not started.done():  # starting: the loop turns, so the watchdog is fed
            if interval:
                notify("WATCHDOG=1")
            await asyncio.wait({started, runner}, timeout=tick, return_when=asyncio.FIRST_COMPLETED)
            if runner.done():  # the agent ended before it took parts
                started.cancel()
                return
        told = self.health()[1]
        notify("READY=1", f"STATUS={told}", f"MAINPID={os.getpid()}")
        log.info("systemd told: ready", status=told, watchdog_s=interval and interval * 2)
        stopping = False
        while True:
            words = self.health()[1]
            fields = [f"STATUS={words}"] if words != told else []
            if self.stop.is_set() and not stopping:
                stopping = True
                fields.insert(0, "STOPPING=1")
            told = words
            if interval and self.alive():
                fields.append("WATCHDOG=1")
            if fields:
                notify(*fields)
            if stopping:
                await asyncio.sleep(tick)
            else:
                with contextlib.suppress(TimeoutError):  # wakes at once for STOPPING=1
                    await asyncio.wait_for(self.stop.wait(), tick)

    # ------------------------------------------------------------------ SIGHUP

    def request_reload(self) -> None:
        """The SIGHUP handler: reload between cycles; one more after a reload in progress."""
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True
            return
        self._reloading = asyncio.create_task(self._reload(), name="reload")

    async def _reload(self) -> None:
        await self.agent.heartbeat.running.wait()  # a SIGHUP during start: once started
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notify("RELOADING=1", "STATUS=reloading configuration", f"MONOTONIC_USEC={usec}")
        while True:
            self._reload_again = False
            await self._reload_once()
            if not self._reload_again:
                break
        notify("READY=1", f"STATUS={self.health()[1]}")

    async def _reload_once(self) -> None:
        agent = self.agent
        source = agent.config.source
        try:
            result = await agent.reload()
        except Exception as err:  # invalid files, a driver that cannot be made: nothing changed
            if not isinstance(err, EdgeAgentError):
                log.exception("configuration reload failed", file=source)
            problems = [str(p) for p in getattr(err, "problems", [])] or [str(err)]
            log.error(
                "configuration reload refused; the running configuration stays",
                trigger="SIGHUP",
                file=source,
                problems=problems,
            )
            self._event("config_reload_refused", file=source, problems=problems)
            return
        log.info("configuration reloaded on SIGHUP", file=source, **result)
        self._event("config_reloaded", file=source, **result)

    def _event(self, event: str, **fields: Any) -> None:
        self.agent._publish(
            "events",
            {
                "schema": "edge-agent/event/1",
                "event": event,
                "gateway_id": self.agent.config.gateway_id,
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "trigger": "SIGHUP",
                **fields,
            },
            1,
        )
