"""The line's stations for ``edge-agent demo --line``: a simulated machine and an agent process each.

Every station is what a gateway would run: ``edge-agent run -c <its config>`` in its own process,
with its own firmware profile, its own machine (served from this process: the reference PLC, the
reference OPC UA machine, or a profile-driven Modbus machine) and a simulated reader watching a
directory, where the conveyor puts a part's tag as a file and takes it away again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..machine.profile import Profile, load_profile

READER_POLL = 0.05  # seconds between looks into a station's tag directory


@dataclass(frozen=True)
class StationSpec:
    station: str
    profile_file: str  # in firmware_profiles/
    machine: str  # plc | opcua | profile


#: The default line: two reference PLCs (drill, mill, press), the reference OPC UA machine
#: (process, calibrate) and an ACME X200 servo press (press_fit) on its own register map.
DEFAULT_LINE = (
    StationSpec("st-10", "reference-plc.yaml", "plc"),
    StationSpec("st-20", "reference-plc.yaml", "plc"),
    StationSpec("st-30", "reference-opcua.yaml", "opcua"),
    StationSpec("st-40", "acme-press-x200-fw3.yaml", "profile"),
)


@dataclass
class Station:
    spec: StationSpec
    gateway_id: str
    profile: Profile
    tags: Path  # the reader's directory
    machine: Any = None
    process: asyncio.subprocess.Process | None = None
    log: Path | None = None
    queue: list[str] = field(default_factory=list)  # parts waiting in front of it
    busy_with: str | None = None
    jobs: int = 0

    @property
    def name(self) -> str:
        return self.spec.station

    @property
    def load(self) -> int:
        return len(self.queue) + (self.busy_with is not None)


async def _start_machine(station: Station, workdir: Path) -> str:
    """Start the station's simulated machine; the config's machine fields that reach it."""
    kind = station.spec.machine
    if kind == "plc":
        from ..sim.reference_plc import ReferencePlc

        plc = ReferencePlc()
        host, port = await plc.start("127.0.0.1", 0)
        station.machine = plc
        return f"host: {host}, port: {port}"
    if kind == "opcua":
        from ..sim.opcua_machine import ReferenceOpcUaMachine

        sim = ReferenceOpcUaMachine(pki=workdir / f"{station.name}-pki")
        url = await sim.start("127.0.0.1", 0)
        station.machine = sim
        return f"url: {json.dumps(url)}"
    from ..sim.profile_machine import ProfileMachine

    machine = ProfileMachine(station.profile)
    host, port = await machine.start("127.0.0.1", 0)
    station.machine = machine
    return f"host: {host}, port: {port}"


async def start_line(
    specs: tuple[StationSpec, ...],
    profiles_dir: Path,
    workdir: Path,
    broker: tuple[str, int],
    public_key: Path,
    line_id: str,
) -> list[Station]:
    """Start every station's machine and agent process (the agents connect on their own)."""
    stations: list[Station] = []
    for spec in specs:
        path = profiles_dir / spec.profile_file
        station = Station(
            spec,
            f"{line_id}-{spec.station}",
            load_profile(path),
            workdir / spec.station / "tags",
        )
        stations.append(station)
        machine = await _start_machine(station, workdir)
        station.tags.mkdir(parents=True)
        config = workdir / spec.station / "agent.yaml"
        config.write_text(
            f"gateway_id: {station.gateway_id}\nstation: {spec.station}\n"
            f"reader: {{type: simulated, directory: {json.dumps(str(station.tags))}, "
            f"poll_interval: {READER_POLL}}}\n"
            f"machine: {{profile: {json.dumps(str(path))}, {machine}}}\n"
            f"broker: {{host: {broker[0]}, port: {broker[1]}, reconnect_min: 0.2, reconnect_max: 5}}\n"
            f"trusted_keys: {{demo: {json.dumps(str(public_key))}}}\n"
            f"state_dir: {json.dumps(str(workdir / spec.station / 'state'))}\n"
            "log: {level: warning, format: json}\n"
        )
        station.log = workdir / spec.station / "agent.log"
        with station.log.open("wb") as log:
            station.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "edge_agent",
                "run",
                "-c",
                str(config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
    return stations


def log_tail(station: Station, lines: int = 5) -> str:
    if station.log is None or not station.log.exists():
        return ""
    return "\n".join(station.log.read_text(errors="replace").splitlines()[-lines:])


async def stop_line(stations: list[Station], timeout: float = 20.0) -> list[str]:
    """SIGTERM every agent (they drain their outbox), then stop the machines; problems found."""
    problems: list[str] = []
    for s in stations:
        if s.process is not None and s.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                s.process.send_signal(signal.SIGTERM)
    for s in stations:
        if s.process is None:
            continue
        try:
            code = await asyncio.wait_for(s.process.wait(), timeout)
        except TimeoutError:
            s.process.kill()
            code = await s.process.wait()
            problems.append(f"agent of {s.name} did not stop within {timeout:.0f} s")
        if code != 0:
            problems.append(f"agent of {s.name} exited {code}: {log_tail(s)}")
    for s in stations:
        if s.machine is not None:
            await s.machine.stop()
    return problems
