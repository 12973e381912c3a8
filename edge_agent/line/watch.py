"""``edge-agent line watch``: the whole line on one screen, from what is on the broker.

It listens to every station's retained status and cycle reports (``edge/+/status``,
``edge/+/cycles``) and, when a conveyor is running, to its events (``line/+/conveyor``: a part
issued, presented at a station, finished). Stations and genealogies come from the stations'
messages only; the conveyor's only tell which parts exist and where a part is being worked on.

On a terminal the screen refreshes in place; into a pipe it prints one plain line per event,
so scripts and tests can parse it. At the end: a summary and, for each ``--part``, its genealogy.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from . import genealogy

CONVEYOR_TOPIC = "line/{line}/conveyor"


@dataclass
class StationState:
    gateway_id: str
    station: str = "?"
    machine: str = "?"
    profile: str = "?"
    online: bool = False
    busy_with: str | None = None  # the part presented to it, until its report arrives
    jobs_done: int = 0
    jobs_failed: int = 0
    last_cycle_ms: float | None = None


@dataclass
class PartState:
    part_id: str
    order: str = "?"
    variant: str = "?"
    step_count: int | None = None
    done: set[int] = field(default_factory=set)
    at: str | None = None
    failed: str | None = None
    finished: bool = False


class LineView:
    """The line's state, fed message by message (from paho's thread: hence the lock)."""

    def __init__(self, prefix: str = "edge") -> None:
        self.prefix = prefix
        self.lock = threading.Lock()
        self.stations: dict[str, StationState] = {}
        self.parts: dict[str, PartState] = {}
        self.reports: dict[str, dict[str, Any]] = {}  # by report id
        self.duplicates = 0
        self.conveyor_done: dict[str, Any] | None = None
        self.lines: list[str] = []  # plain event lines not yet printed
        self.on_report: Callable[[dict[str, Any]], None] | None = None

    def handle(self, topic: str, payload: bytes | bytearray) -> None:
        try:
            message = json.loads(payload) if payload else None
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        parts = topic.split("/")
        report: dict[str, Any] | None = None
        with self.lock:
            if len(parts) == 3 and parts[0] == self.prefix and parts[2] == "status":
                self._status(parts[1], message)
            elif len(parts) == 3 and parts[0] == self.prefix and parts[2] == "cycles":
                report = self._cycle(message)
            elif len(parts) == 3 and parts[0] == "line" and parts[2] == "conveyor":
                self._conveyor(message)
        if report is not None and self.on_report is not None:
            self.on_report(report)

    def _station(self, gateway: str) -> StationState:
        return self.stations.setdefault(gateway, StationState(gateway))

    def _status(self, gateway: str, m: dict[str, Any]) -> None:
        s = self._station(gateway)
        s.online = m.get("state") == "online"
        s.station = m.get("station", s.station)
        s.machine = m.get("machine", s.machine)
        prof = m.get("profile") or {}
        if prof:
            s.profile = f"{prof.get('name')} {prof.get('version')}"

    def _part(self, part_id: str) -> PartState:
        return self.parts.setdefault(part_id, PartState(part_id))

    def _cycle(self, r: dict[str, Any]) -> dict[str, Any] | None:
        rid = r.get("id")
        if not isinstance(rid, str) or "status" not in r:
            return None
        if rid in self.reports:
            self.duplicates += 1  # a redelivery: the report id says we have it
            return None
        self.reports[rid] = r
        s = self._station(r.get("gateway_id", "?"))
        s.station = r.get("station", s.station)
        ms = (r.get("durations_ms") or {}).get("total")
        part_id = (r.get("part") or {}).get("id")
        step = r.get("step") or {}
        if r["status"] == "ok":
            s.jobs_done += 1
            s.last_cycle_ms = ms
        else:
            s.jobs_failed += 1
        if s.busy_with == part_id:
            s.busy_with = None
        where = f"step {step.get('index', -1) + 1}/{step.get('count', '?')} {step.get('operation', '-')}"
        text = f"cycle {s.station} {part_id or r.get('tag_uid')} {where} {r['status']}"
        if r["status"] != "ok":
            text += f" {r.get('reason')}"
        self.lines.append(f"{text} {ms} ms")
        if part_id:
            p = self._part(part_id)
            p.order = (r.get("part") or {}).get("order", p.order)
            p.variant = (r.get("part") or {}).get("variant", p.variant)
            p.step_count = step.get("count", p.step_count)
            if r["status"] == "ok" and "index" in step:
                p.done.add(step["index"])
            elif r["status"] != "ok":
                p.failed = f"step {step.get('index', -1) + 1}: {r.get('reason')}"
            if p.at == s.station:
                p.at = None
            if p.step_count is not None and len(p.done) == p.step_count and not p.finished:
                p.finished = True
                self.lines.append(f"finished {part_id} {p.step_count}/{p.step_count} steps")
        return r

    def _conveyor(self, m: dict[str, Any]) -> None:
        event, part_id = m.get("event"), m.get("part")
        if event == "issued" and isinstance(part_id, str):
            p = self._part(part_id)
            p.order, p.variant = m.get("order", p.order), m.get("variant", p.variant)
            p.step_count = m.get("steps", p.step_count)
        elif event == "presented" and isinstance(part_id, str):
            self._part(part_id).at = m.get("station")
            for s in self.stations.values():
                if s.station == m.get("station"):
                    s.busy_with = part_id
        elif event == "failed" and isinstance(part_id, str):
            self._part(part_id).failed = m.get("reason", "failed")
        elif event == "done":
            self.conveyor_done = m
            self.lines.append(f"conveyor done {m.get('finished')}/{m.get('parts')} parts finished")

    # -- reading the state --------------------------------------------------------------------

    def machines(self) -> dict[str, str]:
        with self.lock:
            return {g: s.machine for g, s in self.stations.items()}

    def genealogy(self, part_id: str) -> dict[str, Any]:
        with self.lock:
            reports = list(self.reports.values())
        return genealogy.build(part_id, reports, self.machines())

    def take_lines(self) -> list[str]:
        with self.lock:
            lines, self.lines = self.lines, []
        return lines

    def screen(self, title: str) -> list[str]:
        with self.lock:
            parts = list(self.parts.values())
            stations = sorted(self.stations.values(), key=lambda s: s.station)
            finished = [p for p in parts if p.finished]
            failed = [p for p in parts if p.failed and not p.finished]
            going = [p for p in parts if not p.finished and not p.failed]
            out = [
                f"{title}  {time.strftime('%H:%M:%S')}",
                f"parts: {len(parts)} known, {len(going)} in progress, {len(finished)} finished, "
                f"{len(failed)} failed; {len(self.reports)} reports, {self.duplicates} duplicates",
                "",
                f"{'STATION':<8} {'GATEWAY':<14} {'PROFILE':<24} {'STATE':<8} {'PART':<9} "
                f"{'JOBS':>5} {'FAILED':>6} {'LAST CYCLE':>11}  MACHINE",
            ]
            for s in stations:
                state = "offline" if not s.online else "busy" if s.busy_with else "idle"
                last = f"{s.last_cycle_ms:.1f} ms" if s.last_cycle_ms is not None else "-"
                out.append(
                    f"{s.station:<8} {s.gateway_id:<14} {s.profile:<24} {state:<8} "
                    f"{s.busy_with or '-':<9} {s.jobs_done:>5} {s.jobs_failed:>6} {last:>11}  {s.machine}"
                )
            out += ["", "ORDERS IN PROGRESS"]
            orders: dict[str, list[PartState]] = {}
            for p in going:
                orders.setdefault(p.order, []).append(p)
            for order, ps in sorted(orders.items())[:12]:
                out.append(
                    f"  {order}: "
                    + ", ".join(
                        f"{p.part_id} {len(p.done)}/{p.step_count or '?'}"
                        + (f" at {p.at}" if p.at else "")
                        for p in ps
                    )
                )
            if len(orders) > 12:
                out.append(f"  ... and {len(orders) - 12} more orders")
            out.append(
                "FINISHED: " + " ".join(p.part_id for p in finished[-8:]) if finished else ""
            )
            out += [f"FAILED: {p.part_id} {p.failed}" for p in failed[:5]]
        return out

    def summary(self) -> list[str]:
        with self.lock:
            parts = list(self.parts.values())
            stations = sorted(self.stations.values(), key=lambda s: s.station)
            lines = [
                f"summary: {sum(p.finished for p in parts)}/{len(parts)} parts finished every step, "
                f"{sum(bool(p.failed) and not p.finished for p in parts)} failed, "
                f"{len(self.reports)} cycle reports ({self.duplicates} duplicates dropped)"
            ]
            for s in stations:
                lines.append(
                    f"  {s.station} ({s.gateway_id}, {s.profile}): {s.jobs_done} jobs, "
                    f"{s.jobs_failed} not ok"
                )
        return lines


class ViewClient:
    """Feeds a LineView from a broker: paho's network thread calls ``LineView.handle``."""

    def __init__(self, view: LineView, host: str, port: int, line: str = "+") -> None:
        self.view = view
        self.connected = threading.Event()
        topics = [
            (f"{view.prefix}/+/status", 1),
            (f"{view.prefix}/+/cycles", 1),
            (CONVEYOR_TOPIC.format(line=line), 1),
        ]
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"edge-agent-line-watch-{time.time_ns()}"
        )

        def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
            c.subscribe(topics)
            self.connected.set()

        self._client.on_connect = on_connect
        self._client.on_message = lambda c, u, msg: view.handle(msg.topic, msg.payload)
        self._client.reconnect_delay_set(1, 2)
        self._client.connect_async(host, port)
        self._client.loop_start()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class Screen:
    """Draws a LineView: in place on a terminal, else its event lines as plain text."""

    def __init__(self, view: LineView, title: str, out: TextIO = sys.stdout) -> None:
        self.view, self.title, self.out = view, title, out
        self.tty = out.isatty()

    def refresh(self) -> None:
        if self.tty:
            self.view.take_lines()
            self.out.write("\x1b[H\x1b[2J" + "\n".join(self.view.screen(self.title)) + "\n")
        else:
            for line in self.view.take_lines():
                self.out.write(line + "\n")
        self.out.flush()

    def finish(self, parts: list[str]) -> None:
        self.refresh()
        for line in self.view.summary():
            self.out.write(line + "\n")
        for part in parts:
            for line in genealogy.format_text(self.view.genealogy(part)):
                self.out.write(line + "\n")
        self.out.flush()


def watch(
    host: str,
    port: int,
    parts: list[str],
    *,
    until_done: bool = False,
    duration: float = 0.0,
    json_path: str | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Run the view until Ctrl-C, ``duration`` seconds, or (``until_done``) the conveyor's end."""
    view = LineView()
    client = ViewClient(view, host, port)
    screen = Screen(view, f"line view, broker {host}:{port}", out)
    started = time.monotonic()
    try:
        while not (until_done and view.conveyor_done is not None):
            if duration and time.monotonic() - started > duration:
                break
            screen.refresh()
            time.sleep(0.5)
        time.sleep(0.2)  # reports published just before the conveyor's last word
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    screen.finish(parts)
    if json_path:
        dump_genealogies(view, json_path)
    done = view.conveyor_done
    if until_done and done is not None:
        return 0 if done.get("finished") == done.get("parts") else 1
    return 0


def dump_genealogies(view: LineView, path: str) -> None:
    with view.lock:
        ids = sorted(view.parts)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({p: view.genealogy(p) for p in ids}, f, indent=1)
