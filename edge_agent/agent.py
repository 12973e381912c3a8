"""The daemon: wires config to reader, station cycle, machine driver and uplink, and runs them.

Ordered start: uplink first (so the first report has somewhere to go), then the machine, the reader
last. Ordered stop: the reader first (no new parts), the cycle in flight finishes or is aborted
with the machine left idle, the machine is closed, the uplink flushes and says offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog

from . import __version__
from .config import AgentConfig
from .errors import MachineError, Reason
from .instructions.signing import KeyRing
from .line import outputs
from .line.active import ActiveStation, StationWiring
from .line.adjustments import Adjustments
from .line.commands import Commands
from .line.control import ActiveAdjustments, LineControl
from .line.telemetry import Telemetry
from .machine.driver import MachineDriver
from .machine.profile import Profile
from .messages import uid_hex
from .service.heartbeat import Heartbeat
from .service.metrics import CycleMetrics
from .station.cycle import StationCycle, WriteAhead
from .station.report import CycleReport
from .supervisor import Supervisor
from .tag.reader import ScanEvent, ScanKind, TagReader
from .tag.registry import create_reader
from .uplink.mqtt import MqttUplink, dumps, response_properties
from .uplink.outbox import Outbox

log = structlog.get_logger("agent")


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        reader: TagReader | None = None,
        driver: MachineDriver | None = None,
        outbox: Outbox | None = None,
        on_report: Callable[[CycleReport], None] | None = None,
    ) -> None:
        self.gateway_id = config.gateway_id
        # Every long-lived task runs under it; its problems make the status say degraded.
        self.supervisor = Supervisor(on_change=self._health_changed)
        self.on_report = on_report  # the demo and tests see each report here; nothing is kept
        self.reader = reader or create_reader(config.reader)
        wiring = StationWiring(
            reader=self.reader,
            publish=self._publish,
            report=lambda report: self.outputs.cycle(report),
            write_ahead=WriteAhead(
                hold=lambda report, stopped: self.json_topics.hold(report, stopped),
                release=lambda report: self.outputs.cycle(report, release=True),
            ),
            spawn=self.supervisor.spawn,
        )
        active = ActiveStation.build(config, wiring, driver=driver)
        alarm = outputs.DropAlarm(config.gateway_id, lambda: self.uplink)
        self.uplink = MqttUplink(
            config.broker,
            config.gateway_id,
            config.client_id,
            outbox=outbox if outbox is not None else outputs.open_outbox(config, alarm),
            offline_status=self._offline("connection lost"),
        )
        self.uplink.on_outbox_change = lambda error: self.supervisor.condition("outbox", error)
        self.heartbeat = Heartbeat()  # the part-taking loop's sign of life, for the watchdog
        self.metrics = CycleMetrics()  # cycles by status and reason, durations by phase
        self._started = time.time()
        self._stopping = False
        # The station in use and what the line may do to it: swapped whole between cycles.
        self.control = LineControl(
            active,
            wiring,
            status=self.status,
            backlog=lambda: self.uplink.backlog,
            on_reload=self._reconfigured,
        )
        self.machine_lock = self.control.machine_lock
        self.commands = Commands(
            self.control,
            allowed=frozenset(config.commands.allowed),
            publish=self._publish,
            respond=self._respond,
            config=config.commands,
            own_replies=self.uplink.topic("reply/#"),
        )
        self.thingsboard = outputs.thingsboard(
            config, self.uplink, self.commands, self._adjustment_sink(config)
        )
        self.sparkplug = outputs.sparkplug(config, self.uplink, self.control, self.commands)
        only_own = self.sparkplug is not None and not config.sparkplug.json_topics
        self.json_topics = outputs.JsonTopics(self.uplink, only_own=only_own)
        json_topics = [self.json_topics]
        self.outputs = outputs.Outputs(
            [
                *([] if only_own else json_topics),
                outputs.CycleCounts(self.metrics.observe),  # once per report: never when held
                *([outputs.Mirror(self.sparkplug)] if self.sparkplug is not None else []),
                *([outputs.Mirror(self.thingsboard)] if self.thingsboard is not None else []),
                # Without its topics, last: a held report is dropped once Sparkplug stored it.
                *(json_topics if only_own else []),
            ]
        )

    def _health_changed(self) -> None:
        self.uplink.refresh_status()

    def _publish(self, suffix: str, payload: dict[str, Any], qos: int) -> None:
        self.outputs.publish(suffix, payload, qos)

    def _respond(self, topic: str, reply: dict[str, Any], correlation: bytes | None) -> None:
        # MQTT 5 response topic: the reply as is, with the request's correlation data.
        self.uplink.publish_absolute(
            topic, dumps(reply), qos=1, properties=response_properties(correlation)
        )

    # The active station's parts, as the service, the status and the tests see them.
    @property
    def config(self) -> AgentConfig:
        return self.control.active.config

    @property
    def profile(self) -> Profile:
        return self.control.active.profile

    @property
    def driver(self) -> MachineDriver:
        return self.control.active.driver

    @property
    def keyring(self) -> KeyRing:
        return self.control.active.keyring

    @property
    def cycle(self) -> StationCycle:
        return self.control.active.cycle

    @property
    def adjustments(self) -> Adjustments:
        return self.control.active.adjustments

    @property
    def telemetry(self) -> Telemetry:
        return self.control.active.telemetry

    @property
    def paused(self) -> bool:
        return self.control.paused

    def status(self) -> dict[str, Any]:
        p = self.config.profile
        return {
            "gateway_id": self.config.gateway_id,
            "station": self.config.station,
            "version": __version__,
            "profile": p.describe(),
            "machine": self.driver.device,
            "reader": self.reader.name,
            "started": self._started,
            "accepting_parts": self.accepting_parts,
            **self.supervisor.status(),
        }

    @property
    def accepting_parts(self) -> bool:
        """True only while a part that arrives would be taken and its report stored."""
        return (
            not self.uplink.outbox.full
            and self.uplink.recording
            and self.supervisor.problem("reader-events") is None
            and self.supervisor.fatal is None
        )

    def _offline(self, reason: str) -> dict[str, Any]:
        return {"state": "offline", "gateway_id": self.gateway_id, "reason": reason}

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then shut down in order."""
        self.uplink.subscribe_absolute(
            self.uplink.topic("cmd/+"), self.commands.on_message, retained=False
        )
        if self.thingsboard is not None:
            self.thingsboard.start()
        if self.sparkplug is not None:
            self.sparkplug.start()
        self._reconfigured(self.config)
        await self.uplink.start(self.status, self.supervisor.spawn)
        try:
            await self.driver.connect()
        except MachineError as err:  # not fatal: cycles fail with a report until it is back
            log.warning(
                "machine not reachable at start; will retry",
                device=self.driver.device,
                error=str(err),
            )
        self.telemetry.start()
        await self.reader.start()
        log.info(
            "agent started",
            gateway=self.config.gateway_id,
            station=self.config.station,
            profile=self.config.profile.name,
        )
        events = self.supervisor.spawn("reader-events", self._consume)
        waits = {
            asyncio.ensure_future(stop.wait()),
            asyncio.ensure_future(self.supervisor.failed.wait()),
        }
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiter in pending:
            waiter.cancel()
        if self.supervisor.fatal is not None:
            log.critical("agent cannot go on; exiting for a restart", reason=self.supervisor.fatal)
        await self.shutdown(events)

    async def _consume(self) -> None:
        # Cycles run here, one at a time, in the order tags arrive. Shutdown waits for this task
        # (the cycle in flight finishes) and cancels it only past the drain timeout, when the
        # cycle's own cancel path leaves the machine idle and still publishes the report.
        async for event in self.heartbeat.events(self.reader.events()):
            if self._stopping:
                return
            if event.kind is not ScanKind.ARRIVED:
                continue
            if self.paused:
                await self._refuse(
                    event, Reason.PAUSED, "the station is paused by the line; part not taken"
                )
                continue
            if not self.uplink.recording:
                await self._refuse(
                    event,
                    Reason.NOT_RECORDING,
                    f"cycle reports cannot be stored ({self.uplink.outbox_error}); part not taken",
                )
                continue
            await outputs.room_for_reports(self.uplink, uid_hex(event.uid))
            if self._stopping:
                return
            async with self.machine_lock:
                report = await self.cycle.run(event)
            self._reported(report)

    def _reported(self, report: CycleReport) -> None:
        if self.on_report is not None:
            try:
                self.on_report(report)
            except Exception:  # an observer's bug must not stop the station
                log.exception("report callback failed")

    async def _refuse(self, event: ScanEvent, reason: Reason, error: str) -> None:
        report = await self.control.active.refusal(event, reason, error)
        self.outputs.cycle(report)
        self._reported(report)

    async def shutdown(self, events: asyncio.Task[None]) -> None:
        log.info("stopping: no new parts")
        self._stopping = True
        await self.reader.stop()
        if self.cycle.busy:
            log.info("waiting for the cycle in flight", timeout_s=self.config.cycle.drain_timeout)
        done, _ = await asyncio.wait({events}, timeout=self.config.cycle.drain_timeout)
        while not done:
            # A cycle still running aborts the machine cleanly before it ends. The cancel is
            # repeated: Python 3.11's wait_for (inside pymodbus) can swallow one that lands as
            # an answer arrives, and the cycle would then run on to its handshake timeout.
            events.cancel()
            done, _ = await asyncio.wait({events}, timeout=0.2)
        with contextlib.suppress(asyncio.CancelledError):
            await events
        await self.commands.drain()
        if self.thingsboard is not None:
            await self.thingsboard.stop()
        await self.telemetry.stop()
        if self.sparkplug is not None:
            await self.sparkplug.stop()
            self.sparkplug.store.close()
        await self.driver.close()
        await self.uplink.stop(self._offline("shutdown"), timeout=10)
        log.info("agent stopped", backlog=self.uplink.backlog, oldest_age_s=self.uplink.oldest_age)
        self.uplink.outbox.close()

    # ------------------------------------------------------------------ steered by the line

    def _adjustment_sink(self, config: AgentConfig) -> ActiveAdjustments | None:
        return self.control.adjustment_sets if config.commands.adjustments else None

    def _reconfigured(self, config: AgentConfig) -> None:
        """At start and after a reload: the ``commands:`` section where it is used."""
        self.commands.configure(config.commands)
        if config.commands.adjustments:
            self.uplink.subscribe("adjustments", self.control.adjustment_sets.on_message)
        if self.thingsboard is not None:
            self.thingsboard.adjustments = self._adjustment_sink(config)

    def line_status(self) -> dict[str, Any]:
        return self.control.line_status()

    async def reload(self) -> dict[str, Any]:
        return await self.control.reload()
