"""A whole station in this process: one wiring for the demo, the tests and the benchmarks.

``station_config`` writes the station's YAML (the same file ``edge-agent run`` reads), and
``running_station`` runs the real Agent on it until the block ends, handing each cycle report to
a queue the caller drains (the Agent keeps none itself).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..agent import Agent
from ..config import AgentConfig
from ..station.report import CycleReport
from ..tag.reader import TagReader


def station_config(
    path: Path,
    *,
    profile: Path,
    machine: str,
    broker: str,
    trusted_keys: dict[str, Path],
    gateway_id: str = "gw-test",
    station: str = "st-20",
    reader: str = "{type: simulated}",
    state_dir: Path | None = None,
    extra: str = "",
) -> Path:
    """Write a station config to ``path``. ``machine`` and ``broker`` are the inner YAML of their
    sections (``host: 127.0.0.1, port: 502``); the profile path is filled in here."""
    keys = ", ".join(f"{k}: {json.dumps(str(v))}" for k, v in trusted_keys.items())
    text = (
        f"gateway_id: {gateway_id}\nstation: {station}\nreader: {reader}\n"
        f"machine: {{profile: {json.dumps(str(profile))}, {machine}}}\n"
        f"broker: {{{broker}}}\n"
        f"trusted_keys: {{{keys}}}\n"
    )
    if state_dir is not None:
        text += f"state_dir: {json.dumps(str(state_dir))}\n"
    path.write_text(text + extra)
    return path


@dataclass
class RunningStation:
    agent: Agent
    #: Each cycle report as the agent produced it; the caller takes them out.
    reports: asyncio.Queue[CycleReport] = field(default_factory=asyncio.Queue)

    async def next_report(self, timeout: float = 10) -> CycleReport:
        return await asyncio.wait_for(self.reports.get(), timeout)


@asynccontextmanager
async def running_station(
    config: AgentConfig,
    *,
    reader: TagReader | None = None,
    connect_timeout: float = 5,
    stop_timeout: float = 20,
) -> AsyncIterator[RunningStation]:
    """Run an Agent on ``config`` (``reader``: instead of the configured one) until the block ends;
    it is stopped in order (SIGTERM's path) on the way out."""
    reports: asyncio.Queue[CycleReport] = asyncio.Queue()
    agent = Agent(config, reader=reader, on_report=reports.put_nowait)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop), name="station")
    await agent.uplink.wait_connected(connect_timeout)
    try:
        yield RunningStation(agent, reports)
    finally:
        stop.set()
        await asyncio.wait_for(task, stop_timeout)
