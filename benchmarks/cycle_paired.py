"""Station cycle against the protocol floor, one cycle of each in turn: a figure the load moves less.

    python benchmarks/cycle_paired.py [--cycles 500]

``benchmarks/cycle.py`` runs all agent cycles, then all floor sequences: on a machine shared with
other work the load changes between the two halves and the ratio with it (1.0 to 2.4 in runs a
minute apart at load 5 on 2 cores). Here the agent and the bare pymodbus client each run in their
own subprocess against the reference PLC in this one, and take turns: one agent cycle (tag event
-> cycle report), then one floor sequence (the same Modbus requests, recorded at the PLC), the
order swapped every pair. It prints the median of the per-pair ratios and each side's median
latency and CPU time per cycle (process time of that side's process, event -> report).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WARM_UP = 20


async def _commands() -> asyncio.StreamReader:
    """This child's stdin: one line ``go`` per cycle, anything else ends it."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def agent_side(plc_port: int, broker_port: int) -> None:
    from edge_agent.instructions.model import Step
    from edge_agent.log import setup_logging
    from tests.station_harness import DRILL, PRESS, running_station

    setup_logging("error", "console")
    steps = [
        Step("drill", DRILL, "st-10"),
        Step("drill", DRILL, "st-20"),
        Step("press", PRESS, "st-30"),
    ]
    commands = await _commands()
    with tempfile.TemporaryDirectory() as tmp:
        # Telemetry polling would add requests to the sequence recorded at the PLC: off here.
        async with running_station(
            Path(tmp), plc_port, broker_port, extra="telemetry: {enabled: false}\n"
        ) as station:
            print("ready", flush=True)
            i = 0
            while (await commands.readline()).strip() == b"go":
                tag = station.tag(steps, uid=b"\x04" + i.to_bytes(6, "big"), done=1)
                i += 1
                c0, t0 = time.process_time(), time.perf_counter()
                station.reader.present(tag)
                report = await station.reports.get()
                t1, c1 = time.perf_counter(), time.process_time()
                await station.agent.uplink.flush(5)
                station.reader.remove(tag.uid)
                if report.status != "ok":
                    raise SystemExit(f"cycle {i} not ok: {report.error}")
                print(json.dumps([(t1 - t0) * 1000, (c1 - c0) * 1000]), flush=True)


async def floor_side(plc_port: int, sequence: list[list[Any]]) -> None:
    from pymodbus.client import AsyncModbusTcpClient

    from benchmarks.cycle import floor_calls

    client = AsyncModbusTcpClient("127.0.0.1", port=plc_port, timeout=1)
    await client.connect()
    calls = floor_calls(client)
    commands = await _commands()
    print("ready", flush=True)
    while (await commands.readline()).strip() == b"go":
        c0, t0 = time.process_time(), time.perf_counter()
        for fc, address, count, values in sequence:
            await calls[fc](address, count, values)
        t1, c1 = time.perf_counter(), time.process_time()
        print(json.dumps([(t1 - t0) * 1000, (c1 - c0) * 1000]), flush=True)
    client.close()


class Side:
    """One child process, driven one cycle at a time."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, *args: str) -> Side:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--side",
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        side = cls(proc)
        if (await side._line()) != "ready":
            raise SystemExit(f"{args[0]} side did not start")
        return side

    async def _line(self) -> str:
        assert self.proc.stdout is not None
        return (await self.proc.stdout.readline()).decode().strip()

    async def cycle(self) -> tuple[float, float]:
        """(latency ms, CPU ms) of one cycle."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()
        line = await self._line()
        if not line:
            raise SystemExit(f"a side stopped (exit {await self.proc.wait()})")
        latency, cpu = json.loads(line)
        return float(latency), float(cpu)

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stop\n")
        await self.proc.stdin.drain()
        await self.proc.wait()


async def main(cycles: int) -> None:
    from edge_agent.sim.broker import EmbeddedBroker
    from edge_agent.sim.reference_plc import ReferencePlc

    trace: list[list[Any]] = []
    plc = ReferencePlc(on_request=lambda fc, a, c, v: trace.append([fc, a, c, v]))
    await plc.start("127.0.0.1", 0)
    broker = EmbeddedBroker()
    await broker.start()
    try:
        agent = await Side.start("agent", str(plc.port), str(broker.port))
        for _ in range(WARM_UP):
            await agent.cycle()
        trace.clear()
        await agent.cycle()
        sequence = list(trace)  # one cycle's requests, as the PLC saw them
        floor = await Side.start("floor", str(plc.port), json.dumps(sequence))
        for _ in range(WARM_UP):
            await floor.cycle()
        pairs = []
        for i in range(cycles):
            first, second = (agent, floor) if i % 2 == 0 else (floor, agent)
            x, y = await first.cycle(), await second.cycle()
            pairs.append((x, y) if first is agent else (y, x))
        await agent.stop()
        await floor.stop()
    finally:
        await plc.stop()
        await broker.stop()
        broker.close()

    def median(values: list[float]) -> float:
        return statistics.median(values)

    a = [p[0][0] for p in pairs]
    f = [p[1][0] for p in pairs]
    print(
        f"pairs                   {len(pairs)} (after {WARM_UP} warm-up each), {len(sequence)} Modbus requests per cycle"
    )
    print(
        f"agent: event -> report  median {median(a):.3f} ms   CPU {median([p[0][1] for p in pairs]):.3f} ms"
    )
    print(
        f"floor: bare pymodbus    median {median(f):.3f} ms   CPU {median([p[1][1] for p in pairs]):.3f} ms"
    )
    print(f"ratio (median of pairs) {median([x / y for x, y in zip(a, f, strict=True)]):.2f}")
    print(f"load average            {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument(
        "--side", nargs=3, metavar=("NAME", "PLC_PORT", "ARG"), help=argparse.SUPPRESS
    )
    ns = parser.parse_args()
    if ns.side:
        name, port, arg = ns.side
        if name == "agent":
            asyncio.run(agent_side(int(port), int(arg)))
        else:
            asyncio.run(floor_side(int(port), json.loads(arg)))
    else:
        asyncio.run(main(ns.cycles))
