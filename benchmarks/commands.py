"""Station cycles under a flood of commands: cycle latency unloaded and under 1 000 commands/s.

    python benchmarks/commands.py [--cycles 1000] [--rounds 5] [--rate 1000] [--broker-nagle]

One run starts mosquitto on a free loopback port (``set_tcp_nodelay true`` unless
``--broker-nagle``), the reference PLC in its own process, and the agent in this process (config
as a station would have it: all commands allowed, logging at INFO as JSON into a temporary file,
telemetry off so the PLC sees only the cycle's and the commands' requests). It measures N station
cycles (tag event -> cycle report) with no commands and N more while a separate MQTT client
process (``--flood-nice``: on a plant it is another machine) publishes commands at ``--rate`` per
second (QoS 1; read 50 %, status 40 %, write 10 %) and counts the replies by error code. The two
kinds of cycles alternate in ``--rounds`` (the flood paused by SIGUSR1 in between), so other
load on the machine weighs on both alike. Printed: the load average, cycle p50/p99 both ways,
their ratio over all cycles and each round's ratio to the unloaded round before it (with their
median: the figure to quote, as it holds against other load that comes and goes), the part
of a cycle spent outside Modbus round trips (the agent's own share), the agent's CPU, and what
the flood got (sent, answered, ok, refused busy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COMMANDS = (
    "commands: {allowed: [status, read, write, pause, resume, reload, push_profile, "
    "rollback_profile]}\ntelemetry: {enabled: false}\n"
)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ----------------------------------------------------------------------------- the flood


def flood(port: int, rate: int) -> None:
    """Publish commands at ``rate`` per second until SIGTERM; print what came back (JSON)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    codes: Counter[str] = Counter()
    answered: set[str] = set()
    repeated = 0
    stop = False

    def on_message(client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        nonlocal repeated
        reply = json.loads(msg.payload)
        codes["ok" if reply.get("ok") else reply.get("error", {}).get("code", "?")] += 1
        if reply["correlation_id"] in answered:
            repeated += 1
        answered.add(reply["correlation_id"])

    paused = False

    def terminate(*_: Any) -> None:
        nonlocal stop
        stop = True

    def pause(signum: int, frame: Any) -> None:
        nonlocal paused
        paused = signum == signal.SIGUSR1

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGUSR1, pause)  # pause publishing (replies are still read)
    signal.signal(signal.SIGUSR2, pause)  # go on
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flood", protocol=mqtt.MQTTv311)
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(1000)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.subscribe("edge/gw-test/reply/#", qos=1)
    client.loop_start()
    bodies = [
        ("read", {"points": ["spindle_speed", "feed_rate", "tool"]}),
        ("status", {}),
        ("read", {"points": ["actual_tool"]}),
        ("status", {}),
        ("read", {"points": ["depth"]}),
        ("status", {}),
        ("read", {"points": ["dwell", "trigger"]}),
        ("status", {}),
        ("read", {"points": ["coolant_temp"]}),
        ("write", {"values": {"tool": 5}}),
    ]
    print("flooding", flush=True)
    sent, t0 = 0, time.monotonic()
    while not stop:
        due = int((time.monotonic() - t0) * rate)
        if paused or due - sent > rate // 10:  # paused, or behind: on at the rate, no burst
            t0 += (due - sent) / rate
            due = sent
        while sent < due:
            name, params = bodies[sent % len(bodies)]
            payload = json.dumps({"correlation_id": f"f-{sent}", "params": params})
            client.publish(f"edge/gw-test/cmd/{name}", payload, qos=1)
            sent += 1
        time.sleep(0.002)
    seconds = time.monotonic() - t0
    deadline = time.monotonic() + 20
    while len(answered) < sent and time.monotonic() < deadline:
        time.sleep(0.05)  # the last replies
    client.loop_stop()
    client.disconnect()
    result = {"sent": sent, "seconds": seconds, "codes": dict(codes)}
    result |= {"answered": len(answered), "repeated": repeated}
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the station


MACHINE = ("machine_write", "machine_cycle", "machine_read")


async def cycles(station: Any, tags: list[Any], own: list[float]) -> list[float]:
    """Run a cycle per tag; return their times (ms); add to ``own`` the part of each spent
    outside the Modbus round trips (the agent's own work and its waits for the event loop)."""
    times = []
    for tag in tags:
        t0 = time.perf_counter()
        station.reader.present(tag)
        report = await station.reports.get()
        times.append((time.perf_counter() - t0) * 1000)
        own.append(times[-1] - sum(report.durations_ms.get(k, 0.0) for k in MACHINE))
        station.reader.remove(tag.uid)
        if report.status != "ok":
            raise SystemExit(f"cycle not ok: {report.reason}: {report.error}")
    return times


def _ratios(unloaded: list[float], flooded: list[float]) -> tuple[float, float]:
    return (
        statistics.median(flooded) / statistics.median(unloaded),
        pct(flooded, 0.99) / pct(unloaded, 0.99),
    )


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def main(n: int, rate: int, nagle: bool, nice: int, rounds: int) -> None:
    load0 = _load()
    from edge_agent.instructions.model import Step
    from edge_agent.log import setup_logging
    from edge_agent.sim.broker import EmbeddedBroker, free_port, wait_listening
    from tests.station_harness import DRILL, PRESS, running_station

    broker = EmbeddedBroker()
    # No cap on what the broker queues for a slow subscriber: the flood's own client reads
    # 1 000 replies/s on a loaded machine, and every reply is counted.
    broker.extra_config = "max_queued_messages 0\n" + ("" if nagle else "set_tcp_nodelay true\n")
    await broker.start()
    plc_port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    plc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "edge_agent.sim.reference_plc", "--port", str(plc_port)),
        stdout=asyncio.subprocess.DEVNULL,
        env=env,
    )
    flooder: asyncio.subprocess.Process | None = None
    logdir = tempfile.mkdtemp(prefix="edge-agent-bench-")
    try:
        await wait_listening("127.0.0.1", plc_port)
        log_file = Path(logdir) / "agent.log"
        with log_file.open("w") as logs, tempfile.TemporaryDirectory() as tmp:
            sys.stderr = logs  # the agent logs every command at INFO, as a station would
            setup_logging("info", "json")
            async with running_station(Path(tmp), plc_port, broker.port, extra=COMMANDS) as st:
                steps = [
                    Step("drill", DRILL, "st-10"),
                    Step("drill", DRILL, "st-20"),
                    Step("press", PRESS, "st-30"),
                ]
                tags = [
                    st.tag(steps, uid=b"\x04" + i.to_bytes(6, "big"), done=1)
                    for i in range(2 * n + 20)
                ]
                await cycles(st, tags[:20], [])  # warm-up: connections, caches
                flooder = await asyncio.create_subprocess_exec(
                    *("nice", "-n", str(nice), sys.executable, __file__),
                    *("--flood", str(broker.port), str(rate)),
                    stdout=asyncio.subprocess.PIPE,
                    env=env,
                )
                assert flooder.stdout is not None
                await flooder.stdout.readline()  # "flooding"
                # Rounds of unloaded and flooded cycles, alternated (the flood paused by
                # SIGUSR1), so a change in the machine's other load hits both alike.
                unloaded: list[float] = []
                loaded: list[float] = []
                ratios: list[tuple[float, float]] = []  # per round: (p50, p99) flooded/unloaded
                cpu, wall = [0.0, 0.0], [0.0, 0.0]
                own: tuple[list[float], list[float]] = ([], [])
                per = n // rounds
                previous: list[float] = []
                for r in range(rounds):
                    for flooded in (False, True):
                        flooder.send_signal(signal.SIGUSR2 if flooded else signal.SIGUSR1)
                        await asyncio.sleep(0.5)  # the flood at its rate / drained
                        cpu0, t0 = time.process_time(), time.perf_counter()
                        first = 20 + (2 * r + flooded) * per
                        times = await cycles(st, tags[first : first + per], own[flooded])
                        cpu[flooded] += time.process_time() - cpu0
                        wall[flooded] += time.perf_counter() - t0
                        (loaded if flooded else unloaded).extend(times)
                        if flooded:
                            ratios.append(_ratios(previous, times))
                        previous = times
                window = wall[1]
                cpu_unloaded, cpu_loaded = cpu[0] / wall[0], cpu[1] / wall[1]
                flooder.send_signal(signal.SIGTERM)
                out, _ = await asyncio.wait_for(flooder.communicate(), 60)
                got = json.loads(out.decode().strip().splitlines()[-1])
                flooder = None
    finally:
        sys.stderr = sys.__stderr__
        if flooder is not None:
            flooder.kill()
            await flooder.wait()
        plc.terminate()
        await plc.wait()
        await broker.stop()
        broker.close()
        if os.environ.get("KEEP_LOG"):
            print(f"agent log               {logdir}/agent.log")
        else:
            shutil.rmtree(logdir, ignore_errors=True)

    print(f"broker                  mosquitto, set_tcp_nodelay {'false' if nagle else 'true'}")
    print(f"load average            {load0} before, {_load()} after")
    print(f"cycles                  {n} unloaded, {n} under the flood (after 20 warm-up)")
    u50, u99 = statistics.median(unloaded), pct(unloaded, 0.99)
    l50, l99 = statistics.median(loaded), pct(loaded, 0.99)
    print(
        f"unloaded cycle          p50 {u50:.2f} ms   p99 {u99:.2f} ms   max {max(unloaded):.2f} ms"
    )
    print(
        f"under {rate} commands/s   p50 {l50:.2f} ms   p99 {l99:.2f} ms   max {max(loaded):.2f} ms"
    )
    print(f"ratio p50 / p99         {l50 / u50:.2f} / {l99 / u99:.2f} (all cycles)")
    print(
        f"ratio per round         p50 median {statistics.median(r[0] for r in ratios):.2f}, "
        f"p99 median {statistics.median(r[1] for r in ratios):.2f} "
        f"({', '.join(f'{r[1]:.2f}' for r in ratios)})"
    )
    for label, values in (("unloaded", own[0]), ("flooded ", own[1])):
        print(
            f"  outside Modbus, {label} p50 {statistics.median(values):.2f} ms   "
            f"p99 {pct(values, 0.99):.2f} ms"
        )
    print(
        f"parts/s under the flood {len(loaded) / window:.1f} (unloaded {len(unloaded) / wall[0]:.1f})"
    )
    print(
        f"agent CPU, % of a core  {100 * cpu_unloaded:.0f} % unloaded, {100 * cpu_loaded:.0f} % under the flood"
    )
    codes = got["codes"]
    print(
        f"commands                {got['sent']} sent while flooding "
        f"({got['sent'] / (window + 0.5 * rounds):.0f}/s), {got['answered']} answered "
        f"({got['repeated']} twice): "
        + ", ".join(f"{k} {v}" for k, v in sorted(codes.items(), key=lambda kv: -kv[1]))
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=1000, help="commands per second")
    parser.add_argument("--rounds", type=int, default=5, help="alternations unloaded/flooded")
    parser.add_argument("--broker-nagle", action="store_true", help="mosquitto's default")
    parser.add_argument(
        "--flood-nice", type=int, default=0, help="niceness of the flooding client (0..19)"
    )
    parser.add_argument("--flood", nargs=2, type=int, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.flood:
        flood(*ns.flood)
    else:
        asyncio.run(main(ns.cycles, ns.rate, ns.broker_nagle, ns.flood_nice, ns.rounds))
