"""The real daemon (`edge-agent run`) with a disk outbox damaged as worn flash damages it.

A 4 KiB sector of the outbox file reads back as zeros; it holds an overflow page of an event
queued by an earlier run. Reading that message back fails with SQLite's "database disk image is
malformed": the file's structure is broken, and no retry inside the process mends it.

- Damaged while the daemon runs: the MQTT sender fails at each attempt, the supervisor restarts it
  with backoff, and after more than ``restarts`` failures within its window the daemon stops with
  exit code 1. Started again, as systemd does, it finds the file malformed at open, moves it aside,
  copies every readable message into a fresh outbox and delivers them: the station is back
  without a person.
- Damaged before the daemon starts: it salvages at open and never fails.

Nothing of ours is replaced: the file is made with the daemon's own outbox class and damaged on
disk in place, as a bad sector would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from edge_agent.instructions.signing import KeyRing, load_private_key
from edge_agent.sim.broker import EmbeddedBroker, free_port
from edge_agent.sim.reference_plc import ReferencePlc
from edge_agent.supervisor import Supervisor
from edge_agent.uplink.outbox import Keep
from edge_agent.uplink.outbox_sqlite import SqliteOutbox
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import write_config
from tests.system.test_daemon_kill import events, start_daemon, tag_message, until

PAGE = 4096  # SQLite's default page size, and a flash sector
EXIT_BOUND = 120.0  # s: restarts back off 0.2 + 0.4 + ... + 3.2 s; the rest is start and stop
#: Events queued after the damaged one: more than SQLite's page cache (2 MB), so the damaged
#: page is read from the disk again when the sender reaches it, not from memory.
FILLER = 80


def earlier_outbox(path: Path, filler: int = 0) -> int:
    """An outbox left by an earlier run: a small event, a large one (on overflow pages), a small
    one, then ``filler`` events of 50 KB. Returns the offset of the large one's second overflow
    page."""
    outbox = SqliteOutbox(path)
    texts = ["small", "x" * 20_000, "small", *(["f" * 50_000] * filler)]
    for n, text in enumerate(texts):
        payload = json.dumps({"id": f"earlier-{n}", "event": "note", "text": text}).encode()
        outbox.put("edge/gw-test/events", payload, 1, False, Keep.EVENT)
    outbox.close()  # checkpoints the WAL into the file
    data = path.read_bytes()
    overflow = [
        at for at in range(0, len(data), PAGE) if data[at + 4 : at + PAGE].count(b"x") > PAGE - 100
    ]
    assert len(overflow) >= 2, "the event did not spill onto overflow pages"
    return overflow[1]


def zero_sector(path: Path, at: int) -> None:
    fd = os.open(path, os.O_WRONLY)  # in place: the same file, as a bad sector
    try:
        os.pwrite(fd, bytes(PAGE), at)
        os.fsync(fd)
    finally:
        os.close(fd)


def line_config(tmp_path: Path, plc_port: int, broker_port: int) -> Path:
    config = write_config(tmp_path, plc_port, broker_port)
    tags, state = tmp_path / "tags", tmp_path / "state"
    text = config.read_text().replace(
        "reader: {type: simulated}",
        f"reader: {{type: simulated, directory: {json.dumps(str(tags))}, poll_interval: 0.05}}",
    )
    config.write_text(text + f"state_dir: {json.dumps(str(state))}\n")
    tags.mkdir()
    (tmp_path / "state").mkdir()
    return config


async def feed_parts(
    tmp_path: Path, daemon: subprocess.Popen[bytes], stop: asyncio.Event, first: int = 0
) -> int:
    """Parts keep coming, as on a line, while the daemon runs and until ``stop``: each report
    queued wakes the sender again. A part leaves once written back (or after 10 s)."""
    key = load_private_key(tmp_path / "mes.key")
    keyring = KeyRing({"mes": key.public_key()})
    tags = tmp_path / "tags"
    fed = first
    waiting: dict[Path, tuple[bytes, float]] = {}  # on the reader: what was put there, when
    while daemon.poll() is None and not stop.is_set():
        for path, (message, since) in list(waiting.items()):
            if path.read_bytes() != message or time.monotonic() - since > 10:
                path.unlink()
                del waiting[path]
        if len(waiting) < 2:
            uid = f"04C0FFEE{fed:06X}"
            message = tag_message(key, keyring, bytes.fromhex(uid), fed)
            part = tags / f"{uid}.part"
            part.write_bytes(message)
            part.rename(tags / f"{uid}.ndef")  # the reader never sees half a file
            waiting[tags / f"{uid}.ndef"] = (message, time.monotonic())
            fed += 1
        await asyncio.sleep(0.25)
    return fed - first


async def test_an_outbox_damaged_under_the_daemon_ends_it_with_exit_1_and_a_restart_salvages_it(
    tmp_path: Path, reference_plc: ReferencePlc
) -> None:
    port = free_port()  # the broker comes once the damage is done: nothing is read before
    config, log = line_config(tmp_path, reference_plc.port, port), tmp_path / "daemon.log"
    outbox = tmp_path / "state" / "outbox.sqlite3"
    sector = earlier_outbox(outbox, FILLER)
    daemon = start_daemon(config, log)
    broker = EmbeddedBroker(port=port)
    stop = asyncio.Event()
    try:
        await until(lambda: events(log, "agent started"), 30, "the daemon to start")
        assert not events(
            log, "outbox file damaged: moved aside, every readable message copied into a new one"
        )
        zero_sector(outbox, sector)
        await broker.start()
        status = MqttRecorder(broker.host, broker.port, "edge/gw-test/status")
        line = asyncio.create_task(feed_parts(tmp_path, daemon, stop))
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(daemon.wait, EXIT_BOUND)
        stop.set()
        fed = await line
        output = log.read_text()
        assert daemon.returncode == 1, (
            f"exit {daemon.returncode} after {fed} parts\n{output[-4000:]}"
        )

        # The line was told which component and why, while the daemon was still up.
        degraded = [
            problem
            for s in status.json("status")
            if s.get("health") == "degraded"
            for problem in s["problems"]
        ]
        assert any(
            p["component"] == "mqtt-sender" and "cannot read the outbox" in p["error"]
            for p in degraded
        ), status.json("status")
        status.close()

        # Every failure is in the log: the first with its traceback, the same error again as
        # one line without it; then the supervisor gives up and the agent exits for a restart.
        first = events(log, "component failed; restarting it")
        again = events(log, "component failed again")
        assert [e["component"] for e in first] == ["mqtt-sender"]
        assert "database disk image is malformed" in first[0]["exception"]
        assert sum("Traceback" in line for line in output.splitlines()) == 1
        assert all(e["component"] == "mqtt-sender" and "exception" not in e for e in again)
        assert len(first) + len(again) == Supervisor().restarts + 1
        gave_up = events(log, "agent cannot go on; exiting for a restart")
        assert len(gave_up) == 1 and "malformed" in gave_up[0]["reason"]
        assert events(log, "cycle ok")  # the fault was in delivery, not in the station

        # systemd starts it again: the file is salvaged at open and what it held delivered.
        recorder = MqttRecorder(broker.host, broker.port, "edge/gw-test/#")
        await recorder.ready()
        log.write_text("")
        daemon = start_daemon(config, log)
        readable = {f"earlier-{n}" for n in range(FILLER + 3)} - {"earlier-1"}

        def notes() -> set[str]:
            return {e["id"] for e in recorder.json("gw-test/events") if e.get("event") == "note"}

        def salvage_events() -> list[dict[str, Any]]:
            return [e for e in recorder.json("events") if e.get("event") == "outbox_salvaged"]

        await until(lambda: notes() >= readable, 60, "the readable events of the earlier run")
        assert notes() == readable
        await until(salvage_events, 30, "the outbox_salvaged event")  # queued after them
        [salvaged] = salvage_events()
        # Also the reports and events the first run queued meanwhile: none is lost.
        assert salvaged["salvaged"] >= FILLER + 2 and salvaged["unreadable"] == 1, salvaged
        assert list(outbox.parent.glob("outbox.sqlite3.corrupt-*"))  # kept for a person
        reports = len(recorder.json("gw-test/cycles"))
        stop.clear()
        line = asyncio.create_task(feed_parts(tmp_path, daemon, stop, first=1000))
        await recorder.wait_for("gw-test/cycles", reports + 2, timeout=30)  # parts taken again
        stop.set()
        await line
        daemon.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.wait, 30) == 0
        recorder.close()
    finally:
        stop.set()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        await broker.stop()
        broker.close()


async def test_an_outbox_damaged_before_the_start_is_salvaged_and_the_daemon_goes_on(
    tmp_path: Path, broker: EmbeddedBroker, reference_plc: ReferencePlc
) -> None:
    config, log = line_config(tmp_path, reference_plc.port, broker.port), tmp_path / "daemon.log"
    outbox = tmp_path / "state" / "outbox.sqlite3"
    zero_sector(outbox, earlier_outbox(outbox))
    recorder = MqttRecorder(broker.host, broker.port, "edge/gw-test/#")
    await recorder.ready()
    daemon = start_daemon(config, log)
    stop = asyncio.Event()
    try:
        delivered = await recorder.wait_for("gw-test/events", 3, timeout=60)
        assert {e["id"] for e in delivered if e.get("event") == "note"} == {
            "earlier-0",
            "earlier-2",
        }
        [salvaged] = [e for e in delivered if e.get("event") == "outbox_salvaged"]
        assert (salvaged["salvaged"], salvaged["unreadable"]) == (2, 1)
        assert "overflow list" in salvaged["damage"] and ".corrupt-" in salvaged["moved_to"]
        [logged] = events(
            log, "outbox file damaged: moved aside, every readable message copied into a new one"
        )
        assert logged["level"] == "error" and logged["moved_to"] == salvaged["moved_to"]
        line = asyncio.create_task(feed_parts(tmp_path, daemon, stop))
        await recorder.wait_for("gw-test/cycles", 3, timeout=30)
        stop.set()
        await line
        assert all(s["health"] == "ok" for s in recorder.json("gw-test/status") if "health" in s)
        daemon.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.wait, 30) == 0
    finally:
        stop.set()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        recorder.close()
