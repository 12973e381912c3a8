"""Soak: the real daemon (`edge-agent run`) through many cycles; its memory must not grow.

    python benchmarks/soak.py [--cycles 100000] [--every 10000] [--window 8]

The reference PLC runs in this process, mosquitto is started on a free port, the daemon runs as a
subprocess with a disk outbox (``state_dir``) and the simulated reader in directory mode: a part is
a ``<UID>.ndef`` file appearing, its write-back is the file changing, and the part leaves when the
file is deleted. ``--window`` parts wait on the reader at once so the daemon never waits for a poll.

Prints the daemon's RSS (``/proc/<pid>/status`` VmRSS) every ``--every`` cycles, the cycle rate,
and at the end the growth after the first ``--every`` cycles (must stay under 2 MiB), the cycles
the PLC counted and the reports delivered through the broker. Exit 1 if the growth is over the
limit or a report is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
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

from edge_agent.instructions.codec import (  # noqa: E402
    TAG_CAPACITY,
    decode_tag,
    encode_tag,
    update_progress,
)
from edge_agent.instructions.model import Step, StepRecord, StepStatus  # noqa: E402
from edge_agent.instructions.recipe import Recipe  # noqa: E402
from edge_agent.instructions.signing import (  # noqa: E402
    KeyRing,
    generate_keypair,
    load_private_key,
)
from edge_agent.sim.station import station_config  # noqa: E402

PROFILE = REPO / "firmware_profiles" / "reference-plc.yaml"
DRILL = {"spindle_speed": 1500, "feed_rate": 320.5, "depth": 12.5, "tool": 3, "dwell": 200}
LIMIT_MIB = 2.0


class Reports:
    """Counts the cycle reports that reach the broker (by id: redeliveries count once)."""

    def __init__(self, port: int, topic: str) -> None:
        self.ids: set[str] = set()
        self.by_status: dict[str, int] = {}
        self.messages: list[dict[str, Any]] = []  # kept only when asked (chaos)
        self.keep = False
        self._lock = threading.Lock()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-{os.getpid()}")
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]  # paho: ints, sleeps floats
        self._client.connect_async("127.0.0.1", port)
        self._client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        report = json.loads(msg.payload)
        with self._lock:
            if report["id"] in self.ids:
                return
            self.ids.add(report["id"])
            status = report["status"] if report["status"] == "ok" else report["reason"]
            self.by_status[status] = self.by_status.get(status, 0) + 1
            if self.keep:
                self.messages.append(report)

    def __len__(self) -> int:
        with self._lock:
            return len(self.ids)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class Parts:
    """Signed tags for st-20, each with its own UID; a part is on the reader while its file is."""

    def __init__(self, work: Path, tags: Path) -> None:
        self.tags = tags
        self.key = load_private_key(work / "mes.key")
        self.keyring = KeyRing({"mes": self.key.public_key()})
        self.steps = [Step("drill", DRILL, "st-10"), Step("drill", DRILL, "st-20")]
        self.fed = 0
        self.waiting: dict[Path, tuple[bytes, float]] = {}  # file -> what was put there, when

    def message(self, n: int, uid: bytes) -> bytes:
        recipe = Recipe.from_steps(
            part_id=f"P-{n:07d}", product="bracket", variant="B", order="ORD-1", steps=self.steps
        )
        message = encode_tag(recipe, uid, self.key, "mes", TAG_CAPACITY["ntag215"])
        contents = decode_tag(message, uid, self.keyring)
        done = contents.progress.with_record(
            0, StepRecord(StepStatus.OK, "st-10", 0), len(self.steps)
        )
        tag: bytes = update_progress(contents, done)
        return tag

    def feed(self) -> Path:
        uid = b"\x04" + (self.fed + 1).to_bytes(6, "big")
        path = self.tags / f"{uid.hex().upper()}.ndef"
        message = self.message(self.fed, uid)
        part = path.with_suffix(".part")
        part.write_bytes(message)
        part.rename(path)  # never half a file on the reader
        self.fed += 1
        self.waiting[path] = (message, time.monotonic())
        return path

    def collect(self, patience: float | None = None) -> int:
        """Take away the parts whose tag was written back (and, with ``patience``, those left
        unwritten that long: refused parts); how many were taken away."""
        done = 0
        now = time.monotonic()
        for path, (message, fed) in list(self.waiting.items()):
            try:
                written = path.read_bytes() != message
            except FileNotFoundError:
                written = True
            if written or (patience is not None and now - fed > patience):
                path.unlink(missing_ok=True)
                del self.waiting[path]
                done += 1
        return done


def write_station(
    work: Path, plc_port: int, broker_port: int, *, poll: float = 0.005, extra: str = ""
) -> Path:
    _private, public = generate_keypair("mes", work)
    reader = (
        f"{{type: simulated, directory: {json.dumps(str(work / 'tags'))}, poll_interval: {poll}}}"
    )
    return station_config(
        work / "station.yaml",
        gateway_id="gw-soak",
        profile=PROFILE,
        machine=f"host: 127.0.0.1, port: {plc_port}, timeout: 1.0, reconnect_max: 0.5",
        broker=f"host: 127.0.0.1, port: {broker_port}, reconnect_min: 0.05, reconnect_max: 0.5",
        trusted_keys={"mes": public},
        reader=reader,
        state_dir=work / "state",
        extra="telemetry: {enabled: false}\nlog: {level: warning}\n" + extra,
    )


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as err:  # a file, not a pipe: a full pipe would stall the daemon
        return subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "-c", str(config), "--log-format", "json"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def soak(cycles: int, every: int, window: int) -> int:
    from edge_agent.sim.broker import EmbeddedBroker
    from edge_agent.sim.reference_plc import ReferencePlc

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # the PLC's restarts are expected
    plc = ReferencePlc()
    await plc.start("127.0.0.1", 0)
    broker = EmbeddedBroker()
    await broker.start()
    with tempfile.TemporaryDirectory(prefix="edge-agent-soak-") as tmp:
        work = Path(tmp)
        (work / "tags").mkdir()
        config = write_station(work, plc.port, broker.port)
        reports = Reports(broker.port, "edge/gw-soak/cycles")
        daemon = start_daemon(config, work / "daemon.log")
        parts = Parts(work, work / "tags")
        print(f"soak: {cycles} cycles, daemon pid {daemon.pid}, broker {broker.kind}", flush=True)
        print(f"{'cycles':>8} {'rss MiB':>8} {'cycles/s':>9} {'elapsed s':>10}", flush=True)
        samples: list[tuple[int, float]] = []
        done = 0
        started = last = time.perf_counter()
        try:
            while done < cycles:
                if daemon.poll() is not None:
                    raise SystemExit(f"the daemon exited with {daemon.returncode}")
                while len(parts.waiting) < window and parts.fed < cycles:
                    parts.feed()
                await asyncio.sleep(0.002)
                before = done
                done += parts.collect()
                if done // every > before // every:
                    now = time.perf_counter()
                    rss = rss_mib(daemon.pid)
                    samples.append((done, rss))
                    rate = every / (now - last)
                    print(f"{done:>8} {rss:>8.1f} {rate:>9.1f} {now - started:>10.0f}", flush=True)
                    last = now
            deadline = time.monotonic() + 30
            while len(reports) < cycles and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        finally:
            daemon.terminate()
            code = await asyncio.to_thread(daemon.wait, 30)
            reports.close()
            await broker.stop()
            broker.close()
            await plc.stop()
        growth = samples[-1][1] - samples[0][1] if len(samples) > 1 else 0.0
        print(
            f"daemon RSS after {samples[0][0] if samples else 0} cycles "
            f"{samples[0][1] if samples else 0:.1f} MiB, after {done}: "
            f"{samples[-1][1] if samples else 0:.1f} MiB; growth {growth:+.2f} MiB "
            f"(limit {LIMIT_MIB} MiB)"
        )
        print(
            f"PLC cycles {plc.cycles}, reports delivered {len(reports)} {reports.by_status}, "
            f"daemon exit {code}, {done / (time.perf_counter() - started):.1f} cycles/s"
        )
        ok = growth < LIMIT_MIB and len(reports) == cycles and plc.cycles == cycles
        return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=10_000, help="RSS sample interval, cycles")
    parser.add_argument("--window", type=int, default=8, help="parts on the reader at once")
    args = parser.parse_args()
    sys.exit(asyncio.run(soak(args.cycles, args.every, args.window)))


if __name__ == "__main__":
    main()
