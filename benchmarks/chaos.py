"""Chaos: the real daemon against the reference PLC and mosquitto while things break.

    python benchmarks/chaos.py [--kills 5] [--seconds 20]

Scenarios, one after the other, on one state directory (the daemon is started again after each
kill, the parts still on the reader):

* SIGKILL at each phase of a cycle, ``--kills`` times each: the parameters written, the trigger
  high, the trigger reset after done (from the PLC's request hook), right after the tag write-back
  (the tag file changed);
* broker restarts every 1-2 s for ``--seconds`` while parts flow (mosquitto with persistence,
  stopped and started: what it acknowledged is kept);
* PLC restarts every 1-2 s for ``--seconds`` while parts flow;
* a full disk under ``state_dir`` (a 16 MiB tmpfs filled up, the broker away so the outbox must
  grow; needs root to mount), then freed and the broker back. Parts refused meanwhile stay on the
  reader 5 s, then are taken away.

Prints parts fed, machine cycles the PLC counted, reports delivered (distinct ids), lost (machine
cycles without a report that admits the machine ran: must be 0), duplicate deliveries (same id
again: consumers drop them), false ok (an ok report whose machine cycle count was already reported
or that the PLC never counted: must be 0). Exit 1 if lost or false ok is not 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from benchmarks.soak import Parts, start_daemon, write_station  # noqa: E402
from edge_agent.sim.broker import EmbeddedBroker  # noqa: E402
from edge_agent.sim.reference_plc import TRIGGER, ReferencePlc  # noqa: E402

PHASES = ("parameters", "trigger", "done", "tag")


class Subscriber:
    """Every cycle report, through broker restarts (a persistent session on a persistent broker)."""

    def __init__(self, port: int) -> None:
        self.reports: dict[str, dict[str, Any]] = {}
        self.duplicates = 0
        self._lock = threading.Lock()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="chaos-counter", clean_session=False
        )
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe("edge/+/cycles", qos=1)
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]  # paho: ints, sleeps floats
        self._client.connect_async("127.0.0.1", port)
        self._client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        report = json.loads(msg.payload)
        with self._lock:
            if report["id"] in self.reports:
                self.duplicates += 1
            else:
                self.reports[report["id"]] = report

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.reports.values())

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class Chaos:
    def __init__(self, work: Path, plc: ReferencePlc, broker: EmbeddedBroker) -> None:
        self.work, self.plc, self.broker = work, plc, broker
        self.log = work / "daemon.log"
        self.config = work / "station.yaml"
        self.parts = Parts(work, work / "tags")
        self.daemon = start_daemon(self.config, self.log)
        self.kills = 0

    def restart_if_dead(self) -> None:
        if self.daemon.poll() is not None:
            self.daemon = start_daemon(self.config, self.log)

    async def flow(self, seconds: float, window: int = 4) -> None:
        """Feed parts and take them away once written back, for ``seconds``."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            while len(self.parts.waiting) < window:
                self.parts.feed()
            self.parts.collect(patience=5)  # a refused part is taken away, as an operator would
            await asyncio.sleep(0.005)

    async def drain(self, timeout: float = 60) -> None:
        """Until every part on the reader is written back (or the time is up)."""
        end = time.monotonic() + timeout
        while self.parts.waiting and time.monotonic() < end:
            self.restart_if_dead()
            self.parts.collect(patience=5)
            await asyncio.sleep(0.01)

    async def kill_at(self, phase: str) -> None:
        armed = [True]
        pid = self.daemon.pid

        def hook(fc: int, address: int, count: int, values: list[Any] | None) -> None:
            if not armed[0] or values is None:
                return
            trigger = fc in (5, 15) and address == TRIGGER
            if (
                (phase == "parameters" and fc == 16)
                or (phase == "trigger" and trigger and values[0])
                or (phase == "done" and trigger and not values[0])
            ):
                armed[0] = False
                os.kill(pid, signal.SIGKILL)

        await self.drain()
        await asyncio.sleep(1.0)  # the daemon is up (imports, connects) before the part comes
        self.plc.on_request = hook if phase != "tag" else None
        path = self.parts.feed()
        message = self.parts.waiting[path][0]
        end = time.monotonic() + 20
        while self.daemon.poll() is None and time.monotonic() < end:
            if phase == "tag" and path.read_bytes() != message:
                self.daemon.send_signal(signal.SIGKILL)
                break
            await asyncio.sleep(0.0005 if phase == "tag" else 0.005)
        await asyncio.to_thread(self.daemon.wait, 20)
        self.plc.on_request = None
        self.kills += 1
        self.daemon = start_daemon(self.config, self.log)

    async def broker_restarts(self, seconds: float) -> None:
        async def restarts() -> None:
            while True:
                await asyncio.sleep(random.uniform(1, 2))
                await self.broker.stop()
                await asyncio.sleep(0.2)
                await self.broker.start()

        task = asyncio.create_task(restarts())
        await self.flow(seconds)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if not self.broker_running():
            await self.broker.start()

    def broker_running(self) -> bool:
        return getattr(self.broker, "_process", None) is not None

    async def plc_restarts(self, seconds: float) -> None:
        async def restarts() -> None:
            while True:
                await asyncio.sleep(random.uniform(1, 2))
                await self.plc.restart()

        task = asyncio.create_task(restarts())
        await self.flow(seconds)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if not self.plc.running:
            await self.plc.start(self.plc.host, self.plc.port)

    async def full_disk(self, disk: Path, seconds: float) -> float:
        """Fill the disk with the broker away (the outbox must grow), keep parts coming until the
        daemon says the outbox cannot write (the WAL it has may last a while), ``seconds`` more,
        then free the space and bring the broker back. Returns the seconds until it bit."""
        await self.broker.stop()
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, bytes(65536))
        os.close(fd)
        t0 = time.monotonic()
        while "outbox cannot write" not in self.log.read_text() and time.monotonic() - t0 < 120:
            await self.flow(1)
        bit = time.monotonic() - t0
        await self.flow(seconds)
        filler.unlink()
        await self.broker.start()
        await self.flow(seconds)
        return bit


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


async def run(kills: int, seconds: float) -> int:
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # the PLC's restarts are expected
    plc = ReferencePlc()
    await plc.start("127.0.0.1", 0)
    broker = EmbeddedBroker(persistent=True)
    await broker.start()
    subscriber = Subscriber(broker.port)
    with tempfile.TemporaryDirectory(prefix="edge-agent-chaos-") as tmp:
        work = Path(tmp)
        (work / "tags").mkdir()
        disk = work / "state"
        tmpfs = mount_tmpfs(disk, "16m")
        write_station(work, plc.port, broker.port, poll=0.005)
        chaos = Chaos(work, plc, broker)
        done: list[str] = []
        try:
            for phase in PHASES:
                for _ in range(kills):
                    await chaos.kill_at(phase)
                done.append(f"SIGKILL at {phase} x{kills}")
            await chaos.drain()
            await chaos.broker_restarts(seconds)
            done.append(f"broker restarts every 1-2 s for {seconds:g} s")
            await chaos.drain()
            await chaos.plc_restarts(seconds)
            done.append(f"PLC restarts every 1-2 s for {seconds:g} s")
            await chaos.drain()
            if tmpfs:
                bit = await chaos.full_disk(disk, seconds / 2)
                done.append(
                    f"disk full (the outbox failed {bit:.0f} s later), {seconds / 2:g} s more, freed"
                )
            else:
                done.append("disk full: skipped (cannot mount a tmpfs without root)")
            await chaos.drain()
            await asyncio.sleep(3)  # the last reports reach the subscriber
        finally:
            if chaos.daemon.poll() is None:
                chaos.daemon.send_signal(signal.SIGTERM)
                await asyncio.to_thread(chaos.daemon.wait, 30)
            subscriber.close()
            await broker.stop()
            broker.close()
            await plc.stop()
            if tmpfs:
                subprocess.run(["umount", "-l", str(disk)], check=False)  # noqa: ASYNC221
        return report(chaos, subscriber, done)


def report(chaos: Chaos, subscriber: Subscriber, done: list[str]) -> int:
    reports = subscriber.snapshot()
    touched = [r for r in reports if r["machine_state"] != "untouched"]
    oks = [r for r in reports if r["status"] == "ok"]
    counts = [r["results"].get("cycle_count") for r in oks]
    false_ok = (
        len(counts)
        - len(set(counts))
        + sum(1 for c in counts if not isinstance(c, int) or c > chaos.plc.cycles)
    )
    lost = max(0, chaos.plc.cycles - len(touched))
    reasons: dict[str, int] = {}
    for r in reports:
        key = r["status"] if r["status"] == "ok" else f"{r['status']}:{r['reason']}"
        reasons[key] = reasons.get(key, 0) + 1
    for line in done:
        print(f"  {line}")
    print(f"parts fed            {chaos.parts.fed}")
    print(f"daemon SIGKILLs      {chaos.kills}")
    print(f"machine cycles (PLC) {chaos.plc.cycles}")
    print(f"reports delivered    {len(reports)}  {dict(sorted(reasons.items()))}")
    print(f"lost                 {lost}")
    print(f"duplicate ids        {subscriber.duplicates}")
    print(f"false ok             {false_ok}")
    return 0 if lost == 0 and false_ok == 0 else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs at each phase")
    parser.add_argument("--seconds", type=float, default=20, help="each restart scenario")
    args = parser.parse_args()
    sys.exit(asyncio.run(run(args.kills, args.seconds)))


if __name__ == "__main__":
    main()
