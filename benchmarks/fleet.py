"""A fleet of gateways on one broker or a broker cluster, through broker faults.

    python benchmarks/fleet.py [--agents 50] [--broker mosquitto|rabbitmq|both] [--rate 0.5]

K ``edge-agent run`` processes, each with its own reference PLC (served from this process) and a
simulated reader directory this script feeds with signed parts (a new tag once the last one has
its progress written back, at most ``--rate`` parts per second per agent). Against (a) mosquitto
with persistence and (b) a three-node RabbitMQ cluster with the MQTT plugin (each agent's failover
list starts at a different node). While parts flow the script injects the broker's faults
(mosquitto: a restart; RabbitMQ: stop one node, restart it, restart the whole cluster), then
stops feeding and waits until a persistent-session consumer has every report.

Printed per broker: agents, cycles/s across the fleet, reports lost (cycles whose tag got its
write-back but whose report never arrived; must be 0), duplicate ids, and per fault: agents that
reconnected, their outage as they logged it (link lost -> link recovered) p50/p99/max, the time
from the broker being back to the last agent reconnected, and the peak connection rate (most
reconnects in any one second); RSS per agent (median, max).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.fleet_brokers import Mosquitto, RabbitCluster  # noqa: E402
from edge_agent.instructions.codec import encode_tag  # noqa: E402
from edge_agent.instructions.model import Step  # noqa: E402
from edge_agent.instructions.recipe import Recipe  # noqa: E402
from edge_agent.instructions.signing import generate_keypair, load_private_key  # noqa: E402
from edge_agent.sim.reference_plc import ReferencePlc  # noqa: E402

PROFILE = REPO / "firmware_profiles" / "reference-plc.yaml"


class Consumer:
    """The line's consumer: a persistent session on ``edge/+/cycles`` and ``edge/+/status``."""

    def __init__(self, host: str, port: int) -> None:
        self.lock = threading.Lock()
        self.ok: set[tuple[str, str]] = set()  # (gateway, tag UID) of every ok report
        self.ids: set[str] = set()
        self.duplicates = 0
        self.online: set[str] = set()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="fleet-consumer", clean_session=False
        )
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [("edge/+/cycles", 1), ("edge/+/status", 1)]
        )
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(1, 2)
        self._client.connect_async(host, port)
        self._client.loop_start()

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            m = json.loads(msg.payload)
        except ValueError:
            return
        with self.lock:
            if msg.topic.endswith("/status"):
                if m.get("state") == "online":
                    self.online.add(m.get("gateway_id", ""))
                return
            if m.get("id") in self.ids:
                self.duplicates += 1
                return
            self.ids.add(m.get("id", ""))
            if m.get("status") == "ok":
                self.ok.add((m["gateway_id"], m["tag_uid"]))

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class Agent:
    def __init__(self, i: int, work: Path) -> None:
        self.i = i
        self.gateway = f"fleet-{i:03d}"
        self.dir = work / self.gateway
        self.tags = self.dir / "tags"
        self.tags.mkdir(parents=True)
        self.log = self.dir / "agent.log"
        self.plc = ReferencePlc()
        self.process: asyncio.subprocess.Process | None = None
        self.produced: list[str] = []  # tag UIDs whose write-back came
        self.when: dict[str, float] = {}  # tag UID -> unix time of its write-back
        self.stuck = 0

    async def start(self, endpoints: list[tuple[str, int]], public_key: Path) -> None:
        host, port = await self.plc.start("127.0.0.1", 0)
        k = self.i % len(endpoints)
        order = endpoints[k:] + endpoints[:k]  # agents spread over the nodes
        uris = ", ".join(f"mqtt://{h}:{p}" for h, p in order)
        config = self.dir / "agent.yaml"
        config.write_text(
            f"gateway_id: {self.gateway}\nstation: st-1\n"
            f"reader: {{type: simulated, directory: {json.dumps(str(self.tags))}, poll_interval: 0.1}}\n"
            f"machine: {{profile: {json.dumps(str(PROFILE))}, host: {host}, port: {port}}}\n"
            f"broker: {{uris: [{uris}], reconnect_min: 0.5, reconnect_max: 10}}\n"
            f"trusted_keys: {{fleet: {json.dumps(str(public_key))}}}\n"
            f"state_dir: {json.dumps(str(self.dir / 'state'))}\n"
            "log: {level: info, format: json}\n"
        )
        with self.log.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "edge_agent", "run", "-c", str(config)),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    async def feed(self, key: Any, rate: float, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            started = time.monotonic()
            uid = b"\x04" + hashlib.sha256(f"{self.gateway}-{n}".encode()).digest()[:6]
            n += 1
            drill = {
                "spindle_speed": 1000 + n % 100,
                "feed_rate": 250.5,
                "depth": 2.5,
                "tool": 1 + n % 24,
                "dwell": 10,
            }
            recipe = Recipe.from_steps(
                part_id=f"F-{self.i:03d}-{n:05d}",
                product="bracket",
                variant="fleet",
                order="ORD-FLEET",
                steps=[Step("drill", drill, None)],
            )
            message = encode_tag(recipe, uid, key, "fleet", 868)
            path = self.tags / f"{uid.hex().upper()}.ndef"
            aside = path.with_suffix(".incoming")
            aside.write_bytes(message)
            aside.rename(path)
            for _ in range(600):  # up to 30 s for the station's write-back
                if path.read_bytes() != message:
                    break
                await asyncio.sleep(0.05)
            if path.read_bytes() != message:
                self.produced.append(uid.hex().upper())
                self.when[uid.hex().upper()] = time.time()
            else:
                self.stuck += 1
            path.unlink()
            await asyncio.sleep(max(0.0, 1 / rate - (time.monotonic() - started)))

    def rss_mib(self) -> float:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def backlog_at_stop(self) -> int:
        """Messages the agent still held unacknowledged when it stopped (from its last log)."""
        backlog = 0
        for line in self.log.read_text(errors="replace").splitlines():
            if '"agent stopped"' in line:
                with contextlib.suppress(ValueError, KeyError):
                    backlog = int(json.loads(line)["backlog"])
        return backlog

    def link_events(self) -> list[tuple[float, str, Any]]:
        """(unix time, 'lost' | 'recovered', outage_s or the reason lost) from the agent's log."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if '"broker link' not in line:
                continue
            with contextlib.suppress(ValueError, KeyError):
                e = json.loads(line)
                t = datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
                kind = "lost" if e["event"] == "broker link lost" else "recovered"
                if e["event"] in ("broker link lost", "broker link recovered"):
                    out.append((t, kind, e.get("outage_s") if kind == "recovered" else e["reason"]))
        return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def run_fleet(
    broker: Any, agents_n: int, rate: float, settle: float, down: float, mirror: bool
) -> None:
    with tempfile.TemporaryDirectory(prefix="edge-agent-fleet-") as tmp:
        work = Path(tmp)
        if isinstance(broker, type):
            broker = broker(work / "broker", mirror=mirror) if broker is RabbitCluster else broker()
        t0 = time.monotonic()
        await broker.start()
        print(f"{broker.kind}: up in {time.monotonic() - t0:.1f} s", flush=True)
        private, public = generate_keypair("fleet", work)
        key = load_private_key(private)
        consumer = Consumer(*broker.consumer_endpoint)
        agents = [Agent(i, work) for i in range(agents_n)]
        try:
            for a in agents:
                await a.start(broker.endpoints, public)
            for _ in range(600):  # up to 300 s for every agent to say online
                if len(consumer.online) >= agents_n:
                    break
                await asyncio.sleep(0.5)
            print(f"{len(consumer.online)}/{agents_n} agents online", flush=True)
            stop = asyncio.Event()
            feeders = [asyncio.create_task(a.feed(key, rate, stop)) for a in agents]
            started = time.monotonic()
            windows: list[tuple[str, float, float | None]] = []
            await asyncio.sleep(settle)
            for name, action in broker.faults(down):
                at = time.time()
                back = await action()
                print(f"fault: {name} ({time.time() - at:.1f} s)", flush=True)
                windows.append((name, at, back))
                await asyncio.sleep(settle)
            stop.set()
            await asyncio.gather(*feeders)
            elapsed = time.monotonic() - started
            produced = {(a.gateway, uid) for a in agents for uid in a.produced}
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                with consumer.lock:
                    if produced <= consumer.ok:
                        break
                await asyncio.sleep(0.5)
            rss = [a.rss_mib() for a in agents]
        finally:
            for a in agents:
                if a.process is not None and a.process.returncode is None:
                    a.process.send_signal(signal.SIGTERM)
            for a in agents:
                if a.process is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(a.process.wait(), 30)
                await a.plc.stop()
            consumer.close()
            await broker.stop()
        with consumer.lock:
            lost = produced - consumer.ok
            duplicates = consumer.duplicates
        report(broker.kind, agents, elapsed, produced, lost, duplicates, windows, rss)


def report(
    kind: str,
    agents: list[Agent],
    elapsed: float,
    produced: set[tuple[str, str]],
    lost: set[tuple[str, str]],
    duplicates: int,
    windows: list[tuple[str, float, float | None]],
    rss: list[float],
) -> None:
    events = {a.gateway: a.link_events() for a in agents}
    print(f"\n== {kind}: {len(agents)} agents, {len(produced)} cycles in {elapsed:.0f} s")
    print(f"cycles/s across the fleet: {len(produced) / elapsed:.1f}")
    held = sum(a.backlog_at_stop() for a in agents)
    print(f"messages still in the agents' outboxes when they stopped: {held}")
    if lost:
        when = {(a.gateway, uid): t for a in agents for uid, t in a.when.items()}
        marks = [("before the first fault", 0.0)] + [(f"after '{n}'", at) for n, at, _ in windows]
        counts = {label: 0 for label, _ in marks}
        for key in lost:
            label = [lab for lab, at in marks if when[key] >= at][-1]
            counts[label] += 1
        print(
            "    lost, by when the cycle ran: "
            + "; ".join(f"{n} {lab}" for lab, n in counts.items())
        )
    print(
        f"reports lost: {len(lost)}   duplicate ids: {duplicates}   "
        f"parts stuck (no write-back in 30 s): {sum(a.stuck for a in agents)}"
    )
    ends = [w[1] for w in windows[1:]] + [float("inf")]
    for (name, at, back), end in zip(windows, ends, strict=True):
        per_agent: dict[str, list[tuple[float, float]]] = {}
        reasons: dict[str, int] = {}
        for gw, evs in events.items():
            for t, kind, value in evs:
                if at <= t < end and kind == "recovered" and value is not None:
                    per_agent.setdefault(gw, []).append((t, float(value)))
                elif at <= t < end and kind == "lost":
                    reasons[value] = reasons.get(value, 0) + 1
        if not per_agent:
            print(f"fault '{name}': no agent lost its broker")
            continue
        times = sorted(t for recs in per_agent.values() for t, _ in recs)
        down = [sum(o for _, o in recs) for recs in per_agent.values()]  # per agent, in total
        peak = max(sum(1 for u in times if t <= u < t + 1.0) for t in times)
        line = (
            f"fault '{name}': {len(per_agent)} agents reconnected ({len(times)} reconnects); "
            f"time without a broker per agent p50 {pct(down, 0.5):.2f} s, "
            f"p99 {pct(down, 0.99):.2f} s, max {max(down):.2f} s"
        )
        if back is not None:
            late = [max(t for t, _ in recs) - back for recs in per_agent.values()]
            late = [x for x in late if x >= 0]
            if late:
                line += (
                    f"; back after the broker p50 {pct(late, 0.5):.2f} s, "
                    f"p99 {pct(late, 0.99):.2f} s, max {max(late):.2f} s"
                )
        print(f"{line}; peak {peak} connects/s, spread over {times[-1] - times[0]:.1f} s")
        top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
        print("    links lost: " + "; ".join(f"{n} x {r}" for r, n in top))
    print(f"RSS per agent: median {statistics.median(rss):.0f} MiB, max {max(rss):.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--broker", choices=["mosquitto", "rabbitmq", "both"], default="both")
    parser.add_argument("--rate", type=float, default=0.5, help="parts per second per agent")
    parser.add_argument("--settle", type=float, default=15, help="seconds of parts between faults")
    parser.add_argument("--down", type=float, default=3, help="seconds a restarted broker is down")
    parser.add_argument(
        "--no-mirror",
        action="store_true",
        help="RabbitMQ: leave the MQTT session queues unmirrored (each on the node it was made on)",
    )
    args = parser.parse_args()
    from edge_agent.log import setup_logging

    setup_logging("error", "console")  # the machines served here: their traffic is not news
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    kinds: list[Any] = []
    if args.broker in ("mosquitto", "both"):
        kinds.append(Mosquitto)
    if args.broker in ("rabbitmq", "both"):
        kinds.append(RabbitCluster)
    for kind in kinds:
        run = run_fleet(kind, args.agents, args.rate, args.settle, args.down, not args.no_mirror)
        asyncio.run(run)


if __name__ == "__main__":
    main()
