"""The conveyor of the line demo: takes each part to a station that can do its next step.

A step naming a station goes there; a step with no station goes to the least busy station whose
profile supports the operation (parts waiting plus the one being worked on; fewest jobs done
breaks a tie). Each station works one part at a time, all stations at once. A part is "presented"
by putting its tag file in the station's reader directory (written aside, then renamed, so the
reader never sees half a tag); once the station's cycle report has come through the broker the
tag is taken away, its progress read back and verified, and the part moves on.

The conveyor publishes what it does on ``line/<line>/conveyor`` (issued, presented, finished,
failed, done) so a line view can show parts in progress; genealogies never come from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from ..errors import PartRejected
from ..instructions.codec import decode_tag
from ..instructions.recipe import Recipe
from ..instructions.signing import KeyRing
from ..messages import uid_hex
from .stations import READER_POLL, Station
from .watch import CONVEYOR_TOPIC

log = structlog.get_logger("line.conveyor")


@dataclass
class Part:
    recipe: Recipe
    uid: bytes
    message: bytes  # the tag's bytes as they are now
    visits: list[str] = field(default_factory=list)  # stations, in order
    failed: str | None = None
    finished: bool = False

    @property
    def id(self) -> str:
        return self.recipe.part_id


class Conveyor:
    def __init__(
        self,
        stations: list[Station],
        keyring: KeyRing,
        broker: tuple[str, int],
        line_id: str,
        *,
        step_timeout: float = 60.0,
    ) -> None:
        self.stations = {s.name: s for s in stations}
        self.by_gateway = {s.gateway_id: s for s in stations}
        self.keyring = keyring
        self.step_timeout = step_timeout
        self.parts: dict[str, Part] = {}
        self._loop = asyncio.get_running_loop()
        self._waiting: dict[str, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self._wake = {name: asyncio.Event() for name in self.stations}
        self._all_done = asyncio.Event()
        self._progress = asyncio.Event()  # a part finished or failed: room on the line
        self._expected = 0
        self._topic = CONVEYOR_TOPIC.format(line=line_id)
        self._mqtt = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"edge-agent-conveyor-{time.time_ns()}"
        )
        self._mqtt.reconnect_delay_set(1, 2)
        self._mqtt.connect_async(*broker)
        self._mqtt.loop_start()

    # -- reports, from the line view's MQTT thread --------------------------------------------

    def report_arrived(self, report: dict[str, Any]) -> None:
        self._loop.call_soon_threadsafe(self._resolve, report)

    def _resolve(self, report: dict[str, Any]) -> None:
        station = self.by_gateway.get(report.get("gateway_id", ""))
        if station is None or station.name not in self._waiting:
            return
        uid, future = self._waiting[station.name]
        if report.get("tag_uid") == uid and not future.done():
            future.set_result(report)

    def publish(self, event: str, **fields: Any) -> mqtt.MQTTMessageInfo:
        payload = json.dumps({"event": event, "time": time.time(), **fields})
        return self._mqtt.publish(self._topic, payload, qos=1)

    # -- routing ------------------------------------------------------------------------------

    def route(self, part: Part) -> None:
        """Queue the part at a station for its next step, or finish it."""
        contents = decode_tag(part.message, part.uid, self.keyring)
        index = contents.progress.next_undone(len(contents.traveler.steps))
        if index is None:
            part.finished = True
            self.publish("finished", part=part.id, stations=part.visits)
            self._check_done()
            return
        step = contents.traveler.steps[index]
        if step.station is not None:
            candidates = [self.stations[step.station]] if step.station in self.stations else []
        else:
            candidates = [
                s for s in self.stations.values() if step.operation in s.profile.operations
            ]
        if not candidates:
            self.fail(part, f"no station on this line can do step {index + 1} ({step.operation})")
            return
        target = min(candidates, key=lambda s: (s.load, s.jobs, s.name))
        target.queue.append(part.id)
        self._wake[target.name].set()

    def fail(self, part: Part, reason: str) -> None:
        part.failed = reason
        log.warning("part failed", part=part.id, reason=reason)
        self.publish("failed", part=part.id, reason=reason)
        self._check_done()

    def _check_done(self) -> None:
        self._progress.set()
        if sum(p.finished or p.failed is not None for p in self.parts.values()) >= self._expected:
            self._all_done.set()

    # -- stations -----------------------------------------------------------------------------

    async def _station_loop(self, station: Station) -> None:
        last_uid: bytes | None = None
        while True:
            if not station.queue:
                self._wake[station.name].clear()
                await self._wake[station.name].wait()
                continue
            part = self.parts[station.queue.pop(0)]
            if part.uid == last_uid:  # the same tag again: let the reader see it leave first
                await asyncio.sleep(3 * READER_POLL)
            last_uid = part.uid
            station.busy_with = part.id
            try:
                await self._work(station, part)
            finally:
                station.busy_with = None
            if part.failed is None:
                self.route(part)

    async def _work(self, station: Station, part: Part) -> None:
        uid = uid_hex(part.uid)
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._waiting[station.name] = (uid, future)
        path = station.tags / f"{uid}.ndef"
        aside = station.tags / f"{uid}.incoming"
        aside.write_bytes(part.message)
        aside.rename(path)
        self.publish("presented", part=part.id, station=station.name)
        try:
            report = await asyncio.wait_for(future, self.step_timeout)
        except TimeoutError:
            report = None
        finally:
            del self._waiting[station.name]
        message = path.read_bytes()  # the station wrote its progress into the file
        path.unlink()
        part.visits.append(station.name)
        if report is None:
            self.fail(part, f"no report from {station.name} within {self.step_timeout:.0f} s")
            return
        if report["status"] != "ok":
            self.fail(part, f"{station.name}: {report['reason']}: {report['error']}")
            return
        station.jobs += 1
        try:
            decode_tag(message, part.uid, self.keyring)
        except PartRejected as err:
            self.fail(part, f"tag after {station.name} does not verify: {err.reason}")
            return
        part.message = message

    async def run(self, parts: list[tuple[Recipe, bytes, bytes]], rate: float) -> None:
        """Issue every part (``rate`` per second, 0: keep every station fed) and run to the end."""
        self._expected = len(parts)
        workers = [
            asyncio.create_task(self._station_loop(s), name=f"conveyor-{s.name}")
            for s in self.stations.values()
        ]
        try:
            started = time.perf_counter()
            for i, (recipe, uid, message) in enumerate(parts):
                if rate > 0:
                    await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
                else:  # keep about two parts per station on the line
                    while self._in_flight() >= 2 * len(self.stations):
                        self._progress.clear()
                        await self._progress.wait()
                part = Part(recipe, uid, message)
                self.parts[part.id] = part
                self.publish(
                    "issued",
                    part=part.id,
                    order=recipe.order,
                    variant=recipe.variant,
                    steps=len(recipe.steps),
                )
                self.route(part)
            await self._all_done.wait()
        finally:
            for w in workers:
                w.cancel()
            for w in workers:
                with contextlib.suppress(asyncio.CancelledError):
                    await w
        finished = sum(p.finished for p in self.parts.values())
        info = self.publish("done", parts=len(parts), finished=finished)
        with contextlib.suppress(RuntimeError, ValueError):  # not connected: nobody watches
            await asyncio.to_thread(info.wait_for_publish, 5)

    def _in_flight(self) -> int:
        return sum(not p.finished and p.failed is None for p in self.parts.values())

    def close(self) -> None:
        self._mqtt.disconnect()
        self._mqtt.loop_stop()
