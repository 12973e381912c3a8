"""The health and metrics endpoint: plain asyncio, two paths, every request bounded.

``GET /healthz``: 200 when the station is healthy, 503 otherwise, with the state in words and the
status JSON the line sees on MQTT. ``GET /metrics``: Prometheus text format. A request's head may
be 8 KiB and must arrive within 5 s; at most 8 connections are served at once; anything else is
answered with an error and the connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import TYPE_CHECKING, Protocol

import structlog

from .metrics import Writer, resident_bytes

if TYPE_CHECKING:
    from ..agent import Agent

log = structlog.get_logger("health")

MAX_HEAD = 8192
TIMEOUT = 5.0
MAX_CONNECTIONS = 8
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}  # fmt: skip


class Links(Protocol):
    """The links' states and reconnect counts (``service/run.py``'s ``Links``)."""

    @property
    def reconnects(self) -> dict[str, int]: ...

    def sample(self) -> dict[str, bool]: ...


class Service(Protocol):
    """What the endpoint answers from: the running daemon (``service/run.py``'s ``Service``)."""

    @property
    def agent(self) -> Agent: ...

    @property
    def links(self) -> Links: ...

    def health(self) -> tuple[bool, str]: ...


async def serve(service: Service, host: str, port: int) -> asyncio.Server:
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        if connections >= MAX_CONNECTIONS:
            writer.close()
            return
        connections += 1
        try:
            status, ctype, body, head_only = await _answer(service, reader)
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(head if head_only else head + body)
            await asyncio.wait_for(writer.drain(), TIMEOUT)
        except (OSError, TimeoutError):
            pass  # the client went away or stopped reading: nothing to tell it
        except Exception:  # a bug here must not take the daemon down
            log.exception("health endpoint request failed")
        finally:
            connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), TIMEOUT)

    server = await asyncio.start_server(handle, host, port, limit=MAX_HEAD)
    log.info("health endpoint listening", address=f"http://{host}:{port}/healthz")
    return server


async def _answer(service: Service, reader: asyncio.StreamReader) -> tuple[int, str, bytes, bool]:
    text = "text/plain; charset=utf-8"
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    except TimeoutError:
        return 408, text, b"request head not received within 5 s\n", False
    except asyncio.LimitOverrunError:
        return 431, text, b"request head over 8 KiB\n", False
    except asyncio.IncompleteReadError:
        return 400, text, b"incomplete request\n", False
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return 400, text, b"not an HTTP/1.x request\n", False
    method, target = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return 405, text, b"only GET and HEAD\n", False
    head_only = method == "HEAD"
    if target == "/healthz":
        healthy, words = service.health()
        body = json.dumps(
            {"healthy": healthy, "state": words, "status": service.agent.status()},
            default=str,
        ).encode()
        return (200 if healthy else 503), "application/json", body + b"\n", head_only
    if target == "/metrics":
        return 200, "text/plain; version=0.0.4; charset=utf-8", metrics(service), head_only
    return 404, text, b"not found: /healthz and /metrics are served here\n", head_only


def metrics(service: Service) -> bytes:
    agent = service.agent
    w = Writer()
    p = agent.profile
    info = {
        "gateway_id": agent.config.gateway_id,
        "station": agent.config.station,
        "profile": p.name,
        "profile_version": p.version,
    }
    w.family("edge_agent_info", "gauge", "The station and its firmware profile.", [(info, 1)])
    healthy, _ = service.health()
    status = agent.status()
    w.family("edge_agent_healthy", "gauge", "1 when /healthz answers 200.", [({}, healthy)])
    w.family(
        "edge_agent_accepting_parts",
        "gauge",
        "1 while an arriving part would be taken.",
        [({}, bool(status.get("accepting_parts", True)))],
    )
    w.family("edge_agent_paused", "gauge", "1 while the line has paused the station.",
             [({}, agent.paused)])  # fmt: skip
    w.family(
        "edge_agent_problem",
        "gauge",
        "1 for each component the status names as not working.",
        [({"component": str(x.get("component"))}, 1) for x in status.get("problems", [])],
    )
    counts = agent.metrics.cycles
    w.family(
        "edge_agent_cycles",
        "counter",
        "Cycle reports by status (ok, rejected, failed) and reason (empty for ok).",
        [({"status": s, "reason": r}, n) for (s, r), n in sorted(counts.items())],
    )
    w.histogram(
        "edge_agent_cycle_duration_seconds",
        "Duration of each phase of a cycle (total, tag_read, verify, machine_write, ...).",
        "phase",
        agent.metrics.durations,
    )
    w.family("edge_agent_outbox_backlog_messages", "gauge",
             "Messages waiting for the broker's acknowledgement.",
             [({}, agent.uplink.backlog)])  # fmt: skip
    w.family("edge_agent_outbox_quarantined_messages", "gauge",
             "Stored messages set aside because they cannot be sent as they are (kept, never sent).",
             [({}, agent.uplink.outbox.quarantined)])  # fmt: skip
    w.family("edge_agent_outbox_oldest_age_seconds", "gauge",
             "Age of the oldest message waiting (0 when none).",
             [({}, agent.uplink.oldest_age)])  # fmt: skip
    states = service.links.sample()
    w.family("edge_agent_link_up", "gauge", "1 while the link is up (broker, machine, reader).",
             [({"link": k}, v) for k, v in states.items()])  # fmt: skip
    w.family(
        "edge_agent_link_reconnects",
        "counter",
        "Times the link came back after being down (broker: every CONNACK after the first).",
        [({"link": k}, v) for k, v in service.links.reconnects.items()],
    )
    groups = agent.telemetry.status()
    w.family("edge_agent_telemetry_good", "gauge",
             "1 while a telemetry group's data is good, 0 while stale.",
             [({"group": g}, s["quality"] == "good") for g, s in groups.items()])  # fmt: skip
    w.family("edge_agent_telemetry_reads", "counter", "Reads or updates of a telemetry group.",
             [({"group": g}, s["reads"]) for g, s in groups.items()])  # fmt: skip
    w.family("edge_agent_telemetry_failures", "counter", "Failed reads of a telemetry group.",
             [({"group": g}, s["failures"]) for g, s in groups.items()])  # fmt: skip
    rss = resident_bytes()
    if rss is not None:
        w.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.",
                 [({}, rss)])  # fmt: skip
    w.family("process_start_time_seconds", "gauge", "Start time of the process (Unix time).",
             [({}, float(status.get("started", time.time())))])  # fmt: skip
    return w.text()
