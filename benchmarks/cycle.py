"""Station cycle latency: the agent against the protocol floor, on the loopback reference PLC.

    python benchmarks/cycle.py [--cycles 1000]

One run prints:
  * agent: tag event -> cycle report handed to the uplink, and -> PUBACK from the broker
    (median, p99), for N full cycles (read tag, verify Ed25519, limits, Modbus writes, handshake,
    results, progress write-back, report);
  * floor: a bare pymodbus client sending the identical sequence of Modbus requests (recorded at
    the PLC while the agent ran) N times;
  * their ratio, the agent's overhead per cycle, and the agent process's peak RSS;
  * the agent's CPU time per cycle (all its threads): on a shared machine it moves far less with
    the load than the latencies do.

The reference PLC runs in this process; the agent and the bare client each run in their own
subprocess against it, so RSS is the agent's alone and both see the same PLC.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ----------------------------------------------------------------------------- agent phase


async def agent_phase(plc_port: int, broker_port: int, cycles: int) -> dict[str, Any]:
    from edge_agent.instructions.model import Step
    from edge_agent.log import setup_logging
    from tests.station_harness import DRILL, PRESS, running_station

    setup_logging("error", "console")
    to_report: list[float] = []
    to_ack: list[float] = []
    cpu = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        # Telemetry polling would add requests to the sequence recorded at the PLC: off here.
        async with running_station(
            Path(tmp), plc_port, broker_port, extra="telemetry: {enabled: false}\n"
        ) as station:
            steps = [
                Step("drill", DRILL, "st-10"),
                Step("drill", DRILL, "st-20"),
                Step("press", PRESS, "st-30"),
            ]
            tags = [
                station.tag(steps, uid=b"\x04" + i.to_bytes(6, "big"), done=1)
                for i in range(cycles + 20)
            ]
            for i, tag in enumerate(tags):
                if i == 20:
                    cpu = time.process_time()
                t0 = time.perf_counter()
                station.reader.present(tag)
                report = await station.reports.get()
                t1 = time.perf_counter()
                await station.agent.uplink.flush(5)
                t2 = time.perf_counter()
                station.reader.remove(tag.uid)
                if report.status != "ok":
                    raise SystemExit(f"cycle {i} not ok: {report.error}")
                if i >= 20:  # warm-up: first connections, caches
                    to_report.append((t1 - t0) * 1000)
                    to_ack.append((t2 - t0) * 1000)
            cpu = time.process_time() - cpu
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "to_report": to_report,
        "to_ack": to_ack,
        "cpu_ms": cpu * 1000 / cycles,
        "rss_mib": rss_kib / 1024,
        "modules": sorted(m for m in sys.modules if m.startswith("asyncua"))[:1],
    }


# ----------------------------------------------------------------------------- floor phase


def floor_calls(client: Any) -> dict[int, Any]:
    """Modbus function code -> the bare pymodbus call that replays a recorded request."""
    return {
        1: lambda a, c, v: client.read_coils(a, count=c),
        2: lambda a, c, v: client.read_discrete_inputs(a, count=c),
        3: lambda a, c, v: client.read_holding_registers(a, count=c),
        4: lambda a, c, v: client.read_input_registers(a, count=c),
        5: lambda a, c, v: client.write_coil(a, v[0]),
        6: lambda a, c, v: client.write_register(a, v[0]),
        15: lambda a, c, v: client.write_coils(a, v),
        16: lambda a, c, v: client.write_registers(a, v),
    }


async def floor_phase(plc_port: int, sequence: list[list[Any]], cycles: int) -> dict[str, Any]:
    from pymodbus.client import AsyncModbusTcpClient

    client = AsyncModbusTcpClient("127.0.0.1", port=plc_port, timeout=1)
    await client.connect()
    calls = floor_calls(client)
    times: list[float] = []
    for i in range(cycles + 20):
        t0 = time.perf_counter()
        for fc, address, count, values in sequence:
            await calls[fc](address, count, values)
        if i >= 20:
            times.append((time.perf_counter() - t0) * 1000)
    client.close()
    return {"times": times}


# ----------------------------------------------------------------------------- driver


async def main(cycles: int) -> None:
    from edge_agent.sim.broker import EmbeddedBroker
    from edge_agent.sim.reference_plc import ReferencePlc

    trace: list[list[Any]] = []

    def record(fc: int, address: int, count: int, values: list[Any] | None) -> None:
        trace.append([fc, address, count, values])

    plc = ReferencePlc(on_request=record)
    await plc.start("127.0.0.1", 0)
    broker = EmbeddedBroker()
    await broker.start()
    try:
        agent = await _child("agent", str(plc.port), str(broker.port), str(cycles))
        # The last cycle's requests, as the PLC saw them: from the last program write back to the
        # last parameter write that precedes it.
        per_cycle = len(trace) // (cycles + 20)
        sequence = trace[-per_cycle:]
        floor = await _child("floor", str(plc.port), json.dumps(sequence), str(cycles))
    finally:
        await plc.stop()
        await broker.stop()
        broker.close()

    a, a_ack, f = agent["to_report"], agent["to_ack"], floor["times"]
    med_a, med_f = statistics.median(a), statistics.median(f)
    print(
        f"cycles                  {len(a)} (after 20 warm-up), {per_cycle} Modbus requests per cycle"
    )
    print(f"agent: event -> report  median {med_a:.3f} ms   p99 {pct(a, 0.99):.3f} ms")
    print(
        f"agent: event -> PUBACK  median {statistics.median(a_ack):.3f} ms   p99 {pct(a_ack, 0.99):.3f} ms"
    )
    print(f"floor: bare pymodbus    median {med_f:.3f} ms   p99 {pct(f, 0.99):.3f} ms")
    print(f"ratio (median)          {med_a / med_f:.2f}")
    overhead = [x - med_f for x in a]
    print(
        f"agent overhead          median {statistics.median(overhead):.3f} ms   p99 {pct(overhead, 0.99):.3f} ms"
    )
    print(f"agent CPU per cycle      {agent['cpu_ms']:.3f} ms (process time, all threads)")
    print(
        f"agent peak RSS          {agent['rss_mib']:.1f} MiB  (asyncua imported: {'yes' if agent['modules'] else 'no'})"
    )


async def _child(*args: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--phase",
        *args,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    out, _ = await proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{args[0]} phase failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(out)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument(
        "--phase", nargs=4, metavar=("NAME", "PLC_PORT", "ARG", "CYCLES"), help=argparse.SUPPRESS
    )
    ns = parser.parse_args()
    if ns.phase:
        name, port, arg, n = ns.phase
        if name == "agent":
            result = asyncio.run(agent_phase(int(port), int(arg), int(n)))
        else:
            result = asyncio.run(floor_phase(int(port), json.loads(arg), int(n)))
        print(json.dumps(result))
    else:
        asyncio.run(main(ns.cycles))
