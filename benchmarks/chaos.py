"""Chaos: the real daemon against the reference PLC and mosquitto while things break.

    python benchmarks/chaos.py [--kills 5] [--seconds 20] [--restarts 3] [--flood-seconds 10]
                               [--rate 1000]

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
  reader 5 s, then are taken away;
* retained commands: ``cmd/write`` (coolant_temp 33.3, a value no cycle writes), ``cmd/pause``
  and ``cmd/reload`` left retained on the broker before the gateway's session (as a tool of the
  line might leave them), then the daemon restarted ``--restarts`` times (SIGTERM and SIGKILL in
  turn) and the broker ``--restarts`` times while parts flow: every subscription receives them
  again. Executions at the PLC (writes of that value) and replies to them must be 0, and no part
  may be refused as paused;
* a command flood: a separate process publishes ``--rate`` commands/s (read, status, write of the
  tool) for ``--flood-seconds`` while parts flow, after as long a stretch without it. Parts taken
  both ways and the slowest cycle, and every command answered exactly once (an error ``busy``
  is an answer): none unanswered, none answered twice.

Prints parts fed, machine cycles the PLC counted, reports delivered (distinct ids), lost (machine
cycles without a report that admits the machine ran: must be 0), duplicate deliveries (same id
again: consumers drop them), false ok (an ok report whose machine cycle count was already reported
or that the PLC never counted: must be 0), and the figures of the two command scenarios. Exit 1 if
lost, false ok, a retained command's execution or reply, or a flood command unanswered or answered
twice is not 0.
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
GATEWAY = "gw-soak"
ALLOWED = "commands: {allowed: [status, read, write, pause, resume, reload]}\n"
COOLANT, RETAINED_RAW = 4, 333  # holding register of coolant_temp; 33.3 degC, scale 0.1
#: Left retained on the broker: each would change the station if it ran.
RETAINED: dict[str, dict[str, Any]] = {
    "write": {"values": {"coolant_temp": 33.3}},
    "pause": {},
    "reload": {},
}


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


class Line:
    """The line's side of the command topics: publishes commands, counts replies by id."""

    def __init__(self, port: int) -> None:
        self.replies: dict[str, int] = {}  # correlation_id -> replies seen
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="chaos-line")
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            f"edge/{GATEWAY}/reply/#", qos=1
        )
        self._client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]  # paho: ints, sleeps floats
        self._client.connect_async("127.0.0.1", port)
        self._client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with contextlib.suppress(ValueError, AttributeError):
            key = str(json.loads(msg.payload).get("correlation_id"))
            with self._lock:
                self.replies[key] = self.replies.get(key, 0) + 1

    def replied(self, correlation_id: str) -> int:
        with self._lock:
            return self.replies.get(correlation_id, 0)

    async def publish(self, name: str, payload: bytes, *, retain: bool) -> None:
        await asyncio.to_thread(self._subscribed.wait, 10)
        info = self._client.publish(f"edge/{GATEWAY}/cmd/{name}", payload, qos=1, retain=retain)
        await asyncio.to_thread(info.wait_for_publish, 10)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def forget_session(port: int, client_id: str) -> None:
    """End the broker's persistent session of ``client_id`` (a clean connect), so that what is
    published next reaches that client only as a retained message when it subscribes."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    connected.wait(10)
    client.disconnect()
    client.loop_stop()


class Chaos:
    def __init__(self, work: Path, plc: ReferencePlc, broker: EmbeddedBroker) -> None:
        self.work, self.plc, self.broker = work, plc, broker
        self.log = work / "daemon.log"
        self.config = work / "station.yaml"
        self.parts = Parts(work, work / "tags")
        self.daemon = start_daemon(self.config, self.log)
        self.kills = 0
        self.kill_hook: Any = None  # a PLC request hook of kill_at()
        self.retained_writes = 0  # writes of the retained command's value that reached the PLC
        plc.on_request = self._on_request

    def _on_request(self, fc: int, address: int, count: int, values: list[Any] | None) -> None:
        if (
            fc in (6, 16)
            and values
            and address <= COOLANT < address + len(values)
            and values[COOLANT - address] == RETAINED_RAW
        ):
            self.retained_writes += 1
        if self.kill_hook is not None:
            self.kill_hook(fc, address, count, values)

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
        self.kill_hook = hook if phase != "tag" else None
        path = self.parts.feed()
        message = self.parts.waiting[path][0]
        end = time.monotonic() + 20
        while self.daemon.poll() is None and time.monotonic() < end:
            if phase == "tag" and path.read_bytes() != message:
                self.daemon.send_signal(signal.SIGKILL)
                break
            await asyncio.sleep(0.0005 if phase == "tag" else 0.005)
        await asyncio.to_thread(self.daemon.wait, 20)
        self.kill_hook = None
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

    async def restart_broker(self) -> None:
        await self.broker.stop()
        await asyncio.sleep(0.2)
        await self.broker.start()

    async def restart_daemon(self, sig: signal.Signals) -> None:
        if self.daemon.poll() is None:
            self.daemon.send_signal(sig)
            await asyncio.to_thread(self.daemon.wait, 40)
        self.daemon = start_daemon(self.config, self.log)

    async def retained_commands(self, line: Line, restarts: int) -> dict[str, int]:
        """Commands left retained before the gateway's session, then daemon and broker restarts
        while parts flow: each subscription receives them again; none may run."""
        self.daemon.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self.daemon.wait, 40)
        await asyncio.to_thread(forget_session, self.broker.port, f"edge-agent-{GATEWAY}")
        for name, params in RETAINED.items():
            body = {"correlation_id": f"retained-{name}", "params": params}
            await line.publish(name, json.dumps(body).encode(), retain=True)
        ignored_before = self.ignored()
        self.daemon = start_daemon(self.config, self.log)
        for n in range(restarts):
            await self.received_retained(ignored_before + (n + 1) * len(RETAINED))
            await self.flow(random.uniform(1.5, 2.5))
            await self.restart_daemon(signal.SIGKILL if n % 2 else signal.SIGTERM)
            await self.received_retained(ignored_before + (n + 2) * len(RETAINED))
            await self.flow(random.uniform(1.5, 2.5))
            await self.restart_broker()
        await self.flow(3)
        for name in RETAINED:  # cleared, as the line must: an empty retained message
            await line.publish(name, b"", retain=True)
        return {
            "replies": sum(line.replied(f"retained-{name}") for name in RETAINED),
            "ignored": self.ignored() - ignored_before,
        }

    def ignored(self) -> int:
        """Retained commands the daemon said it ignored (once per topic and run)."""
        return self.log.read_text().count("retained message ignored")

    async def received_retained(self, logged: int, timeout: float = 30) -> None:
        """Until this run of the daemon has received them all (parts flowing meanwhile): a
        restart before that would prove nothing."""
        end = time.monotonic() + timeout
        while self.ignored() < logged and time.monotonic() < end:
            await self.flow(0.1)

    async def measured_flow(self, seconds: float, subscriber: Subscriber) -> list[float]:
        """Parts flowing for ``seconds``; the total times (ms) of the ok cycles reported."""
        before = {r["id"] for r in subscriber.snapshot()}
        await self.flow(seconds)
        await asyncio.sleep(1)  # the last reports reach the subscriber
        return [
            r["durations_ms"]["total"]
            for r in subscriber.snapshot()
            if r["id"] not in before and r["status"] == "ok"
        ]

    async def command_flood(
        self, subscriber: Subscriber, seconds: float, rate: int
    ) -> dict[str, Any]:
        """Parts for ``seconds`` without commands, then as long under ``rate`` commands/s from
        a separate process; what the flood got back comes from that process."""
        quiet = await self.measured_flow(seconds, subscriber)
        flooder = await asyncio.create_subprocess_exec(
            *(sys.executable, __file__, "--flood", str(self.broker.port), str(rate), str(seconds)),
            stdout=asyncio.subprocess.PIPE,
        )
        assert flooder.stdout is not None
        await flooder.stdout.readline()  # "flooding": subscribed to the replies
        flooded = await self.measured_flow(seconds, subscriber)
        result: dict[str, Any] = json.loads(await flooder.stdout.read())
        await flooder.wait()
        return {**result, "quiet": quiet, "flooded": flooded}

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


def flood(port: int, rate: int, seconds: float) -> None:
    """The flood's own process: ``rate`` commands/s for ``seconds``, then the replies counted by
    correlation id (waiting up to 30 s for the last); prints the counts as JSON."""
    bodies = [
        ("read", {"points": ["spindle_speed", "feed_rate", "tool"]}),
        ("status", {}),
        ("read", {"points": ["actual_tool", "cycle_count"]}),
        ("status", {}),
        ("read", {"points": ["depth"]}),
        ("status", {}),
        ("read", {"points": ["dwell"]}),
        ("status", {}),
        ("read", {"points": ["coolant_temp"]}),
        ("write", {"values": {"tool": 5}}),  # the next cycle writes its own tool again
    ]
    replies: dict[str, int] = {}
    codes: dict[str, int] = {}
    lock = threading.Lock()
    subscribed = threading.Event()

    def on_message(client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        reply = json.loads(msg.payload)
        code = "ok" if reply.get("ok") else reply.get("error", {}).get("code", "?")
        key = str(reply.get("correlation_id"))
        with lock:
            replies[key] = replies.get(key, 0) + 1
            codes[code] = codes.get(code, 0) + 1

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="chaos-flood")
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(1000)
    client.on_message = on_message
    client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
    client.connect("127.0.0.1", port)
    client.subscribe(f"edge/{GATEWAY}/reply/#", qos=1)
    client.loop_start()
    subscribed.wait(10)
    print("flooding", flush=True)
    sent, t0 = 0, time.monotonic()
    while (elapsed := time.monotonic() - t0) < seconds:
        while sent < int(elapsed * rate):
            name, params = bodies[sent % len(bodies)]
            payload = json.dumps({"correlation_id": f"f-{sent}", "params": params})
            client.publish(f"edge/{GATEWAY}/cmd/{name}", payload, qos=1)
            sent += 1
        time.sleep(0.002)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with lock:
            if len(replies) >= sent:
                break
        time.sleep(0.05)
    client.disconnect()
    client.loop_stop()
    with lock:
        answered = sum(1 for n in range(sent) if f"f-{n}" in replies)
        twice = sum(1 for count in replies.values() if count > 1)
        print(json.dumps({"sent": sent, "answered": answered, "twice": twice, "codes": codes}))


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


async def run(kills: int, seconds: float, restarts: int, flood_seconds: float, rate: int) -> int:
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # the PLC's restarts are expected
    plc = ReferencePlc()
    await plc.start("127.0.0.1", 0)
    broker = EmbeddedBroker(persistent=True)
    await broker.start()
    subscriber = Subscriber(broker.port)
    line = Line(broker.port)
    with tempfile.TemporaryDirectory(prefix="edge-agent-chaos-") as tmp:
        work = Path(tmp)
        (work / "tags").mkdir()
        disk = work / "state"
        tmpfs = mount_tmpfs(disk, "16m")
        write_station(work, plc.port, broker.port, poll=0.005, extra=ALLOWED)
        chaos = Chaos(work, plc, broker)
        done: list[str] = []
        commands: dict[str, Any] = {}
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
            commands["retained"] = await chaos.retained_commands(line, restarts)
            done.append(
                f"retained cmd/{', cmd/'.join(RETAINED)}: daemon restarted {restarts}x "
                f"(SIGTERM, SIGKILL in turn), broker {restarts}x"
            )
            await chaos.drain()
            commands["flood"] = await chaos.command_flood(subscriber, flood_seconds, rate)
            done.append(
                f"{rate} commands/s for {flood_seconds:g} s, after {flood_seconds:g} s without"
            )
            await chaos.drain()
            await asyncio.sleep(3)  # the last reports reach the subscriber
        finally:
            if chaos.daemon.poll() is None:
                chaos.daemon.send_signal(signal.SIGTERM)
                await asyncio.to_thread(chaos.daemon.wait, 30)
            subscriber.close()
            line.close()
            await broker.stop()
            broker.close()
            await plc.stop()
            if tmpfs:
                subprocess.run(["umount", "-l", str(disk)], check=False)  # noqa: ASYNC221
        return report(chaos, subscriber, done, commands)


def report(chaos: Chaos, subscriber: Subscriber, done: list[str], commands: dict[str, Any]) -> int:
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
    failed = lost != 0 or false_ok != 0
    paused = reasons.get("rejected:paused", 0) + reasons.get("failed:paused", 0)
    if "retained" in commands:
        retained = commands["retained"]
        print(
            f"retained commands    executed at the PLC {chaos.retained_writes}, "
            f"replies {retained['replies']}, parts refused as paused {paused}, "
            f"'retained message ignored' logged {retained['ignored']}x"
        )
        failed |= chaos.retained_writes != 0 or retained["replies"] != 0 or paused != 0
    if "flood" in commands:
        f = commands["flood"]
        unanswered = f["sent"] - f["answered"]
        print(
            f"command flood        sent {f['sent']}, answered {f['answered']}, "
            f"unanswered {unanswered}, answered twice {f['twice']}  {dict(sorted(f['codes'].items()))}"
        )
        for label, times in (("without", f["quiet"]), ("flooded", f["flooded"])):
            print(f"  parts ok {label:8} {cycles(times)}")
        failed |= unanswered != 0 or f["twice"] != 0
    return 1 if failed else 0


def cycles(times: list[float]) -> str:
    if not times:
        return "0"
    ordered = sorted(times)
    p50 = ordered[len(ordered) // 2]
    return f"{len(times):4}  cycle p50 {p50:.0f} ms, slowest {ordered[-1]:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs at each phase")
    parser.add_argument("--seconds", type=float, default=20, help="each restart scenario")
    parser.add_argument(
        "--restarts", type=int, default=3, help="daemon and broker restarts with retained commands"
    )
    parser.add_argument("--flood-seconds", type=float, default=10, help="the command flood")
    parser.add_argument("--rate", type=int, default=1000, help="commands/s of the flood")
    parser.add_argument("--flood", nargs=3, help=argparse.SUPPRESS)  # the flood's own process
    args = parser.parse_args()
    if args.flood:
        port, rate, seconds = args.flood
        flood(int(port), int(rate), float(seconds))
        return
    sys.exit(
        asyncio.run(run(args.kills, args.seconds, args.restarts, args.flood_seconds, args.rate))
    )


if __name__ == "__main__":
    main()
