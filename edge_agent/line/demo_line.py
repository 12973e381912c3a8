"""``edge-agent demo --line``: a whole line in one command, on embedded defaults.

Four stations, each an ``edge-agent run`` process with its own machine and firmware profile
(two reference PLCs over Modbus, the reference OPC UA machine, an ACME X200 press over Modbus on
its own register map), one broker, a conveyor issuing signed parts of many variants, and the line
view on the screen. Exit 0 when every part finished every step and every step's report came
through the broker into the line view's genealogy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..demo import find_profile, parse_hostport
from ..instructions.signing import KeyRing, generate_keypair, load_private_key
from ..messages import uid_hex
from ..sim.broker import EmbeddedBroker
from .conveyor import Conveyor
from .stations import DEFAULT_LINE, Station, log_tail, start_line, stop_line
from .variants import make_parts
from .watch import LineView, Screen, ViewClient, dump_genealogies

LINE_ID = "line1"


@dataclass(frozen=True)
class LineDemoOptions:
    parts: int = 20
    rate: float = 0.0  # parts per second; 0: as fast as the line takes them
    broker: str | None = None  # HOST:PORT of an external broker
    record: Path | None = None  # keep travelers, the public key and the genealogies here
    show: tuple[str, ...] = ()  # parts whose genealogy is printed at the end
    seed: int = 15


def line_uid(i: int) -> bytes:
    return b"\x04" + hashlib.sha256(f"line-part-{i}".encode()).digest()[:6]


async def _wait_online(view: LineView, stations: list[Station], timeout: float) -> str | None:
    """None once every station's retained status says online, else what went wrong."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in stations:
            if s.process is not None and s.process.returncode is not None:
                return f"agent of {s.name} exited {s.process.returncode}: {log_tail(s)}"
        with view.lock:
            online = {g for g, st in view.stations.items() if st.online}
        if all(s.gateway_id in online for s in stations):
            return None
        await asyncio.sleep(0.1)
    return f"stations not online after {timeout:.0f} s"


def _check(view: LineView, parts: list[Any]) -> list[str]:
    """Every part finished every step, and the broker brought a report for each step."""
    problems = []
    for recipe, _, _ in parts:
        g = view.genealogy(recipe.part_id)
        if not g["complete"] or len(g["steps"]) != len(recipe.steps):
            got = sum(s["status"] == "ok" for s in g["steps"])
            problems.append(f"part {recipe.part_id}: {got}/{len(recipe.steps)} steps reported done")
    return problems


async def run_line_demo(options: LineDemoOptions, out: TextIO = sys.stdout) -> int:
    work = tempfile.TemporaryDirectory(prefix="edge-agent-line-")
    workdir = Path(work.name)
    broker: EmbeddedBroker | None = None
    stations: list[Station] = []
    client: ViewClient | None = None
    conveyor: Conveyor | None = None
    problems: list[str] = []
    try:
        if options.broker:
            host, port = parse_hostport(options.broker, "broker")
        else:
            broker = EmbeddedBroker()
            await broker.start()
            host, port = broker.host, broker.port
        private_path, public_path = generate_keypair("demo", workdir)
        key = load_private_key(private_path)
        keyring = KeyRing({"demo": key.public_key()})

        view = LineView()
        client = ViewClient(view, host, port)
        profiles = find_profile("reference-plc.yaml").parent
        stations = await start_line(
            DEFAULT_LINE, profiles, workdir, (host, port), public_path, LINE_ID
        )
        print(
            f"edge-agent demo --line: {options.parts} parts, {len(stations)} stations, broker "
            f"{host}:{port} ({broker.kind + ', embedded' if broker else 'external'})",
            file=out,
        )
        for s in stations:
            ops = ", ".join(s.profile.operations)
            print(
                f"  {s.name}: agent process, profile {s.profile.name} {s.profile.version} "
                f"({s.profile.driver}: {ops})",
                file=out,
            )
        if (problem := await _wait_online(view, stations, 60)) is not None:
            print(f"edge-agent demo --line: {problem}", file=out)
            return 1

        capable: dict[str, list[str]] = {}
        for s in stations:
            for op in s.profile.operations:
                capable.setdefault(op, []).append(s.name)
        parts = make_parts(options.parts, capable, key, "demo", line_uid, options.seed)
        if options.record:
            travelers = options.record / "travelers"
            travelers.mkdir(parents=True, exist_ok=True)
            shutil.copy(public_path, options.record / "demo.pub")
            for recipe, uid, message in parts:
                (travelers / f"{recipe.part_id}_{uid_hex(uid)}.ndef").write_bytes(message)

        conveyor = Conveyor(stations, keyring, (host, port), LINE_ID)
        view.on_report = conveyor.report_arrived
        screen = Screen(view, f"line {LINE_ID}, broker {host}:{port}", out)

        async def refresh() -> None:
            while True:
                screen.refresh()
                await asyncio.sleep(0.5)

        drawing = asyncio.create_task(refresh())
        started = time.perf_counter()
        try:
            await conveyor.run(parts, options.rate)
        finally:
            drawing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drawing
        elapsed = time.perf_counter() - started
        problems += await stop_line(stations)
        stations = []
        await asyncio.sleep(0.3)  # the agents' last status messages
        screen.finish(list(options.show))
        problems += [f"part {p.id}: {p.failed}" for p in conveyor.parts.values() if p.failed]
        problems += _check(view, parts)
        if options.record:
            dump_genealogies(view, str(options.record / "genealogy.json"))
            (options.record / "routes.json").write_text(
                json.dumps({p.id: p.visits for p in conveyor.parts.values()}, indent=1)
            )
        steps = sum(len(r.steps) for r, _, _ in parts)
        print(
            f"{len(parts)} parts, {steps} steps in {elapsed:.1f} s "
            f"({steps / elapsed:.1f} cycles/s across the line)",
            file=out,
        )
        for problem in problems:
            print(f"PROBLEM: {problem}", file=out)
        print("line demo: ok" if not problems else "line demo: FAILED", file=out)
        return 0 if not problems else 1
    finally:
        if conveyor is not None:
            conveyor.close()
        if stations:
            await stop_line(stations)
        if client is not None:
            client.close()
        if broker is not None:
            await broker.stop()
            broker.close()
        work.cleanup()
