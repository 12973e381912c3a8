"""Store-and-forward throughput: the disk outbox to a loopback mosquitto, QoS 1.

    python benchmarks/outbox.py [--messages 20000] [--backlog 100000] [--inflight 20] [--cpu 0]
                                [--max-bytes N]

One run prints, for cycle-report-sized payloads (~1 KB JSON):
  * sustained: messages produced as fast as the event loop takes them, each committed to the
    SQLite WAL outbox (fsync) before it is handed to MQTT and deleted on PUBACK; msg/s from the
    first put to the last PUBACK, the put latency (median, p99) and RSS sampled during the run;
  * backlog: N messages put while the broker is down (put rate), then the broker started and the
    whole backlog replayed; replay msg/s, time to the first PUBACK, RSS before/after.

The agent side runs in this process pinned to one core (``--cpu``; -1 to leave it unpinned);
mosquitto runs in its own process. ``--max-bytes`` bounds the outboxes by size as well (set it
above what the run queues, to measure the bookkeeping, not drops).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_agent.config_schema import BrokerConfig  # noqa: E402
from edge_agent.log import setup_logging  # noqa: E402
from edge_agent.sim.broker import EmbeddedBroker  # noqa: E402
from edge_agent.uplink.mqtt import MqttUplink  # noqa: E402
from edge_agent.uplink.outbox_sqlite import SqliteOutbox  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(i: int) -> dict[str, Any]:
    """A payload shaped and sized like a cycle report."""
    return {
        "schema": "edge-agent/cycle/1",
        "gateway_id": "bench-gw",
        "station": "st-20",
        "tag_uid": f"04{i:012X}",
        "status": "ok",
        "reason": None,
        "error": None,
        "part": {"id": f"P-{i:06d}", "product": "bracket", "variant": "B-long", "order": "ORD-1"},
        "step": {"index": 1, "count": 3, "operation": "drill"},
        "parameters": [
            {"name": n, "value": 1200.5, "unit": "rpm", "point": n, "raw": [17560, 0]}
            for n in ("spindle_speed", "feed_rate", "depth", "tool", "dwell")
        ],
        "results": {"actual_depth": 12.5, "cycle_count": i},
        "durations_ms": {"tag_read": 0.01, "verify": 0.3, "machine_write": 0.6, "total": 2.1},
        "key_id": "mes-2026",
        "tag_write": "ok",
        "machine_state": "cycle complete",
        "profile": {"name": "reference-plc", "version": "1.0", "hash": "sha256:" + "9f2c" * 16},
        "time": "2026-11-26T08:15:02.123+00:00",
    }


class RssSampler:
    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.samples.append(rss_mib())
            await asyncio.sleep(0.25)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.samples.append(rss_mib())

    def __str__(self) -> str:
        s = self.samples
        third = max(1, len(s) // 3)
        return (
            f"RSS start {s[0]:.1f} MiB, peak {max(s):.1f} MiB, end {s[-1]:.1f} MiB "
            f"(mean of first third {statistics.fmean(s[:third]):.1f}, "
            f"last third {statistics.fmean(s[-third:]):.1f})"
        )


def uplink_for(broker: EmbeddedBroker, outbox: SqliteOutbox, inflight: int) -> MqttUplink:
    config = BrokerConfig(
        host=broker.host,
        port=broker.port,
        inflight=inflight,
        reconnect_min=0.05,
        reconnect_max=0.2,
    )
    return MqttUplink(config, "bench-gw", "edge-agent-bench-gw", outbox=outbox)


async def sustained(
    broker: EmbeddedBroker, state: Path, messages: int, inflight: int, max_bytes: int | None
) -> None:
    outbox = SqliteOutbox(
        state / "sustained.sqlite3", max_messages=10 * messages, max_bytes=max_bytes
    )
    uplink = uplink_for(broker, outbox, inflight)
    await uplink.start(lambda: {})
    assert await uplink.wait_connected(5)
    puts: list[float] = []
    most_waiting = 0
    with RssSampler() as rss:
        started = time.perf_counter()
        for i in range(messages):
            t = time.perf_counter()
            uplink.publish("cycles", report(i))
            puts.append(time.perf_counter() - t)
            if i % 10 == 9:
                most_waiting = max(most_waiting, uplink.backlog)
                await asyncio.sleep(0)  # a producer on the same loop: let the sender run
        produced = time.perf_counter() - started
        assert await uplink.flush(600)
        elapsed = time.perf_counter() - started
    await uplink.stop({"state": "offline"})
    outbox.close()
    print(
        f"sustained: {messages} messages QoS 1 (inflight {inflight}) in {elapsed:.2f} s = "
        f"{messages / elapsed:,.0f} msg/s acknowledged (produced at {messages / produced:,.0f} msg/s);"
        f" put median {statistics.median(puts) * 1e3:.3f} ms, p99 {pct(puts, 0.99) * 1e3:.3f} ms;"
        f" most waiting {most_waiting}; {rss}"
    )


async def backlog(
    broker: EmbeddedBroker, state: Path, count: int, inflight: int, max_bytes: int | None
) -> None:
    await broker.stop()
    outbox = SqliteOutbox(state / "backlog.sqlite3", max_messages=2 * count, max_bytes=max_bytes)
    uplink = uplink_for(broker, outbox, inflight)
    await uplink.start(lambda: {})
    rss_before = rss_mib()
    started = time.perf_counter()
    for i in range(count):
        uplink.publish("cycles", report(i))
        if i % 1000 == 999:
            await asyncio.sleep(0)
    put_s = time.perf_counter() - started
    size = (state / "backlog.sqlite3").stat().st_size + (
        state / "backlog.sqlite3-wal"
    ).stat().st_size
    with RssSampler() as rss:
        await broker.start()
        started = time.perf_counter()
        assert await uplink.wait_connected(10)
        connected = time.perf_counter() - started
        assert await uplink.flush(3600)
        elapsed = time.perf_counter() - started
    await uplink.stop({"state": "offline"})
    outbox.close()
    print(
        f"backlog: {count} messages put with the broker down in {put_s:.2f} s "
        f"({count / put_s:,.0f} puts/s, {size / 2**20:.0f} MiB on disk, RSS {rss_before:.1f} MiB); "
        f"replayed after the broker came back in {elapsed:.2f} s = {count / elapsed:,.0f} msg/s "
        f"(connected after {connected:.2f} s); {rss}"
    )


async def main(args: argparse.Namespace) -> None:
    setup_logging("error", "console")
    broker = EmbeddedBroker()
    await broker.start()
    with tempfile.TemporaryDirectory(prefix="edge-agent-bench-") as tmp:
        try:
            await sustained(broker, Path(tmp), args.messages, args.inflight, args.max_bytes)
            await backlog(broker, Path(tmp), args.backlog, args.inflight, args.max_bytes)
        finally:
            await broker.stop()
            broker.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--inflight", type=int, default=20)
    parser.add_argument("--cpu", type=int, default=0, help="pin this process to a core (-1: no)")
    parser.add_argument("--max-bytes", type=int, default=None, help="outbox size limit, bytes")
    args = parser.parse_args()
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    print(
        f"edge-agent outbox benchmark: python {sys.version.split()[0]}, "
        f"agent pinned to {'core ' + str(args.cpu) if args.cpu >= 0 else 'no core'}, "
        f"{os.cpu_count()} cores, mosquitto on loopback"
    )
    asyncio.run(main(args))
