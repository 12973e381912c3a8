"""Telemetry and command cost of the running daemon, on the loopback reference PLC and mosquitto.

    python benchmarks/telemetry.py [--seconds 20] [--commands 500] [--disk-outbox] [--broker-nagle]
    python benchmarks/telemetry.py --opcua [--seconds 20]
    python benchmarks/telemetry.py --sparkplug [--seconds 20] [--commands 500]

The agent runs as its own process (``python -m edge_agent run``) watching 15 points at 100 ms (one
group: holding 0..8 and input 0..10 of the reference PLC), while this process serves the PLC, moves
two of the watched values every 100 ms (one inside its deadband half the time) and counts what
arrives on the broker. Printed:
  * the agent's CPU (% of one core, from /proc/<pid>/stat over the window) and RSS (VmRSS, VmHWM);
  * Modbus requests per second and per poll, as the PLC counted them;
  * telemetry messages per second, as a subscriber received them;
  * command round trip: `write` published on edge/<gw>/cmd/write -> register written at the PLC
    -> reply received by the sender, median and p99, one command at a time.

``--opcua``: the same watch on the reference OPC UA machine (its own process), where the group is a
subscription: 9 points sampled every 100 ms, this process writing two of them every 100 ms through
its own session. Printed: the agent's CPU and RSS, telemetry messages and values per second.

``--sparkplug``: the same Modbus watch with the agent as a Sparkplug B edge node and the JSON
topics off (``json_topics: false``): telemetry arrives as DDATA, counted and sized the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WATCH = """  watch:
    interval: 0.1
    full_every: 60
    points:
      spindle_speed: 0
      feed_rate: 0
      depth: 0
      coolant_temp: 0
      force: 0
      tool: 0
      dwell: 0
      actual_spindle_speed: 5
      actual_feed_rate: 1.0
      actual_depth: 0.05
      actual_coolant_temp: 0.2
      actual_force: 50
      actual_tool: 0
      actual_dwell: 0
      cycle_count: 0
"""

WATCH_OPCUA = """  watch:
    interval: 0.1
    full_every: 60
    points: [setpoint, count, coolant, label, result, cycles, counter, trigger, done]
"""

GW = "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def memory_mib(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def write_files(
    tmp: Path, plc_port: int, broker_port: int, disk: bool, sparkplug: bool = False
) -> Path:
    from edge_agent.instructions.signing import generate_keypair

    profile = (REPO / "firmware_profiles" / "reference-plc.yaml").read_text()
    profile = profile[: profile.index("\ntelemetry:")] + "\ntelemetry:\n" + WATCH
    (tmp / "profile.yaml").write_text(profile)
    _private, public = generate_keypair("mes", tmp)
    (tmp / "tags").mkdir()
    config = tmp / "station.yaml"
    config.write_text(
        f"gateway_id: {GW}\nstation: st-20\n"
        f"reader: {{type: simulated, directory: {json.dumps(str(tmp / 'tags'))}}}\n"
        f"machine: {{profile: profile.yaml, host: 127.0.0.1, port: {plc_port}}}\n"
        f"broker: {{host: 127.0.0.1, port: {broker_port}}}\n"
        f"trusted_keys: {{mes: {json.dumps(str(public))}}}\n"
        "commands: {allowed: [status, read, write]}\n"
        "log: {level: warning, format: json}\n"
        + (f"state_dir: {json.dumps(str(tmp / 'state'))}\n" if disk else "")
        + ("sparkplug: {enabled: true, group_id: bench, json_topics: false}\n" if sparkplug else "")
    )
    return config


class Line:
    """The line's MQTT client (paho's own thread): counts telemetry, sends commands."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.telemetry = 0
        self.values = 0
        self.bytes = 0  # telemetry payload bytes
        self.first = threading.Event()  # the first telemetry message arrived
        self.handling: list[float] = []  # the agent's own time per command, from the replies
        self._replies: dict[str, threading.Event] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [(f"edge/{GW}/#", 1), (f"spBv1.0/{GW}/DDATA/#", 1)]
        )
        self.client.on_message = self._on_message
        # paho leaves Nagle on: a command sent right after our PUBACK would wait for its ACK.
        self.client.on_socket_open = self._no_delay
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    @staticmethod
    def _no_delay(client: Any, userdata: Any, sock: Any) -> None:
        if isinstance(sock, socket.socket):  # paho's SocketLike: a plain TCP socket here
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        topic: str = msg.topic
        if "/telemetry/" in topic:
            self.telemetry += 1
            self.bytes += len(msg.payload)
            self.first.set()
            self.values += len(json.loads(msg.payload)["values"])
        elif topic.startswith("spBv1.0/"):  # DDATA: Tahu's schema, decoded as a host does
            from esio_spb_builder.core.sparkplug_b_pb2 import Payload

            machine = [m for m in Payload.FromString(msg.payload).metrics if m.HasField("alias")]
            self.telemetry += 1
            self.bytes += len(msg.payload)
            self.first.set()
            self.values += len(machine)
        elif topic.endswith("/reply/write"):
            reply = json.loads(msg.payload)
            event = self._replies.get(reply["correlation_id"])
            self.handling.append(reply["duration_ms"])
            if event is not None:
                event.set()

    def command(self, cid: str, value: int) -> float:
        event = self._replies[cid] = threading.Event()
        body = json.dumps({"correlation_id": cid, "params": {"values": {"dwell": value}}})
        t0 = time.perf_counter()
        self.client.publish(f"edge/{GW}/cmd/write", body, qos=1)
        if not event.wait(5):
            raise RuntimeError(f"no reply to command {cid}")
        return (time.perf_counter() - t0) * 1000

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def main(
    seconds: float, commands: int, nodelay: bool, disk: bool, sparkplug: bool = False
) -> None:
    from edge_agent.sim.broker import EmbeddedBroker
    from edge_agent.sim.reference_plc import ReferencePlc

    plc = ReferencePlc()
    await plc.start("127.0.0.1", 0)
    broker = EmbeddedBroker()
    # Without it mosquitto holds small packets for the peer's delayed ACK (Nagle): ~40 ms a hop.
    broker.extra_config = "set_tcp_nodelay true\n" if nodelay else ""
    await broker.start()
    line = Line(broker.port)
    rng = random.Random(7)

    async def process() -> None:  # the machine's values move as a running machine's would
        speed = 1500
        while True:
            speed += rng.choice((-3, 3, -7, 7))
            plc.poke("input", 0, [max(0, speed)])
            plc.poke("input", 4, [rng.randint(180, 220)])  # coolant 18.0..22.0 degC, deadband 0.2
            await asyncio.sleep(0.1)

    mover = asyncio.create_task(process())
    with tempfile.TemporaryDirectory() as tmp:
        config = write_files(Path(tmp), plc.port, broker.port, disk, sparkplug)
        started = time.perf_counter()
        agent = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "edge_agent",
            "run",
            "-c",
            str(config),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
        )
        try:
            if not await asyncio.to_thread(line.first.wait, 10):
                raise RuntimeError("no telemetry within 10 s")
            first = time.perf_counter() - started
            await asyncio.sleep(2)  # warm-up

            cpu0, req0, msg0, val0, bytes0 = (
                cpu_seconds(agent.pid),
                sum(plc.requests.values()),
                line.telemetry,
                line.values,
                line.bytes,
            )
            t0 = time.perf_counter()
            await asyncio.sleep(seconds)
            elapsed = time.perf_counter() - t0
            cpu = cpu_seconds(agent.pid) - cpu0
            requests = sum(plc.requests.values()) - req0
            msgs, values = line.telemetry - msg0, line.values - val0
            size = (line.bytes - bytes0) / max(1, msgs)
            mem = memory_mib(agent.pid)

            trips = []
            for i in range(commands):
                value = 100 + i % 1000
                trips.append(await asyncio.to_thread(line.command, f"b-{i}", value))
                if plc.snapshot()["holding"][8] != value:
                    raise RuntimeError("the write did not reach the PLC before the reply")
        finally:
            agent.terminate()
            await asyncio.wait_for(agent.wait(), 20)
            mover.cancel()
            line.close()
            await plc.stop()
            await broker.stop()
            broker.close()

    polls = seconds / 0.1
    print(f"watch                   15 points, one group, 100 ms interval, {seconds:.0f} s window")
    outbox = "SQLite in state_dir (fsync per message)" if disk else "in memory"
    print(
        f"outbox                  {outbox}; broker set_tcp_nodelay {'true' if nodelay else 'false'}"
    )
    print(f"telemetry as            {'Sparkplug B DDATA' if sparkplug else 'JSON'}")
    print(f"first telemetry         {first:.2f} s after the agent process started")
    print(f"agent CPU               {100 * cpu / elapsed:.2f} % of one core")
    print(f"agent RSS               {mem['VmRSS']:.1f} MiB (peak {mem['VmHWM']:.1f} MiB)")
    print(f"Modbus requests         {requests / elapsed:.1f} /s, {requests / polls:.2f} per poll")
    print(
        f"telemetry messages      {msgs / elapsed:.1f} /s carrying {values / elapsed:.1f} values/s "
        f"(of {15 / 0.1:.0f} values/s read), {size:.0f} payload bytes per message"
    )
    print(
        f"command round trip      median {statistics.median(trips):.3f} ms   "
        f"p99 {pct(trips, 0.99):.3f} ms   ({len(trips)} writes, MQTT -> PLC write -> reply)"
    )
    h = line.handling
    print(
        f"  of which in the agent median {statistics.median(h):.3f} ms   p99 {pct(h, 0.99):.3f} ms"
        "   (command parsed -> reply queued)"
    )


async def main_opcua(seconds: float) -> None:
    from asyncua import Client, ua

    from edge_agent.instructions.signing import generate_keypair
    from edge_agent.sim.broker import EmbeddedBroker
    from edge_agent.sim.opcua_machine import NAMESPACE

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"opc.tcp://127.0.0.1:{port}/edge-agent"
    broker = EmbeddedBroker()
    broker.extra_config = "set_tcp_nodelay true\n"
    await broker.start()
    line = Line(broker.port)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pki = str(tmp / "server-pki")
        machine = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "edge_agent.sim.opcua_machine", "--port", str(port)),
            *("--pki", pki),
            cwd=REPO,
            stdout=subprocess.PIPE,
        )
        assert machine.stdout is not None
        if not (await machine.stdout.readline()).startswith(b"ready"):
            raise RuntimeError("the OPC UA simulator did not start")
        profile = (REPO / "firmware_profiles" / "reference-opcua.yaml").read_text()
        profile = profile[: profile.index("\ntelemetry:")] + "\ntelemetry:\n" + WATCH_OPCUA
        (tmp / "profile.yaml").write_text(profile)
        _private, public = generate_keypair("mes", tmp)
        (tmp / "tags").mkdir()
        config = tmp / "station.yaml"
        config.write_text(
            f"gateway_id: {GW}\nstation: st-20\n"
            f"reader: {{type: simulated, directory: {json.dumps(str(tmp / 'tags'))}}}\n"
            f"machine: {{profile: profile.yaml, url: {json.dumps(url)}}}\n"
            f"broker: {{host: 127.0.0.1, port: {broker.port}}}\n"
            f"trusted_keys: {{mes: {json.dumps(str(public))}}}\n"
            "log: {level: warning, format: json}\n"
        )
        agent = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge_agent", "run", "-c", str(config), cwd=REPO
        )
        try:
            async with Client(url) as mover:  # the machine's values move every 100 ms
                idx = await mover.get_namespace_index(NAMESPACE)
                double = mover.get_node(ua.NodeId("Double", idx))
                int32 = mover.get_node(ua.NodeId("Int32", idx))

                async def move() -> None:
                    rng = random.Random(7)
                    while True:
                        await double.write_value(
                            ua.Variant(rng.uniform(0, 500), ua.VariantType.Double)
                        )
                        await int32.write_value(
                            ua.Variant(rng.randint(1, 1000), ua.VariantType.Int32)
                        )
                        await asyncio.sleep(0.1)

                moving = asyncio.create_task(move())
                if not await asyncio.to_thread(line.first.wait, 15):
                    raise RuntimeError("no telemetry within 15 s")
                await asyncio.sleep(2)  # warm-up
                cpu0, msg0, val0 = cpu_seconds(agent.pid), line.telemetry, line.values
                t0 = time.perf_counter()
                await asyncio.sleep(seconds)
                elapsed = time.perf_counter() - t0
                cpu = cpu_seconds(agent.pid) - cpu0
                msgs, values = line.telemetry - msg0, line.values - val0
                mem = memory_mib(agent.pid)
                moving.cancel()
        finally:
            agent.terminate()
            await asyncio.wait_for(agent.wait(), 20)
            machine.terminate()
            await asyncio.wait_for(machine.wait(), 10)
            line.close()
            await broker.stop()
            broker.close()

    print(
        f"watch                   9 OPC UA points, one subscription, 100 ms, {seconds:.0f} s window"
    )
    print(f"agent CPU               {100 * cpu / elapsed:.2f} % of one core")
    print(f"agent RSS               {mem['VmRSS']:.1f} MiB (peak {mem['VmHWM']:.1f} MiB)")
    print(
        f"telemetry messages      {msgs / elapsed:.1f} /s carrying {values / elapsed:.1f} values/s "
        "(2 points written every 100 ms, a counter every second; no Read requests)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window")
    parser.add_argument("--commands", type=int, default=500, help="write commands to time")
    parser.add_argument(
        "--broker-nagle",
        action="store_true",
        help="leave mosquitto's set_tcp_nodelay off (its default) to see what that costs",
    )
    parser.add_argument(
        "--disk-outbox", action="store_true", help="give the agent a state_dir (SQLite outbox)"
    )
    parser.add_argument(
        "--opcua", action="store_true", help="watch the reference OPC UA machine by subscription"
    )
    parser.add_argument(
        "--sparkplug",
        action="store_true",
        help="the agent as a Sparkplug B edge node, JSON topics off: telemetry as DDATA",
    )
    args = parser.parse_args()
    if args.opcua:
        asyncio.run(main_opcua(args.seconds))
        sys.exit()
    asyncio.run(
        main(args.seconds, args.commands, not args.broker_nagle, args.disk_outbox, args.sparkplug)
    )
