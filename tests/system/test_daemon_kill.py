"""The real daemon (`edge-agent run`) SIGKILLed while it delivers a backlog, then restarted.

Parts arrive as tag files while the broker is down, so their cycle reports pile up in the disk
outbox. The broker comes back; when a counting subscriber with a persistent session has seen a
part of the backlog, the daemon is killed with SIGKILL from that subscriber's own callback (mid-
delivery, not after it). Restarted, the daemon delivers the rest: every report arrives, in order,
and a duplicate is always an identical copy (same id, same seq) that a consumer can drop.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edge_agent.instructions.codec import TAG_CAPACITY, decode_tag, encode_tag, update_progress
from edge_agent.instructions.model import Step, StepRecord, StepStatus
from edge_agent.instructions.recipe import Recipe
from edge_agent.instructions.signing import KeyRing, load_private_key
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc
from edge_agent.uplink.outbox import Keep
from edge_agent.uplink.outbox_sqlite import SqliteOutbox
from tests import REPO_ROOT
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import DRILL, write_config

REPO = REPO_ROOT
PARTS = 200
KILL_AT = 40  # reports seen by the subscriber when the daemon is killed


class KillingRecorder(MqttRecorder):
    """Counts cycle reports; SIGKILLs ``victim`` the moment the ``at``-th one arrives."""

    victim = 0
    at = 0
    seen_at_kill = -1

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        super()._on_message(client, userdata, msg)
        if self.victim and len(self.messages) >= self.at:
            os.kill(self.victim, signal.SIGKILL)
            self.seen_at_kill, self.victim = len(self.messages), 0


def tag_message(key: Any, keyring: KeyRing, uid: bytes, n: int) -> bytes:
    """Signed instructions whose first step (st-10) is done: st-20 runs the second."""
    steps = [Step("drill", DRILL, "st-10"), Step("drill", DRILL, "st-20")]
    recipe = Recipe.from_steps(
        part_id=f"P-{n:05d}", product="bracket", variant="B-long", order="ORD-1", steps=steps
    )
    message = encode_tag(recipe, uid, key, "mes", TAG_CAPACITY["ntag215"])
    contents = decode_tag(message, uid, keyring)
    done = contents.progress.with_record(0, StepRecord(StepStatus.OK, "st-10", 0), len(steps))
    return update_progress(contents, done)


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as err:  # a file, not a pipe: a full pipe would stall the daemon
        return subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "-c", str(config), "--log-format", "json"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )


def events(log: Path, name: str) -> list[dict[str, Any]]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [
        e for line in lines if line.startswith("{") and (e := json.loads(line))["event"] == name
    ]


async def until(condition: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_daemon_sigkilled_mid_backlog_and_restarted_delivers_every_report(
    tmp_path: Path, reference_plc: ReferencePlc
) -> None:
    broker = EmbeddedBroker(persistent=True)
    await broker.start()
    topic = "edge/gw-test/cycles"
    # Register the counter's persistent session, then let the broker go down: an outage.
    counter = MqttRecorder(broker.host, broker.port, topic, session="counter")
    await counter.ready()  # subscribed: from now on the broker keeps what it misses
    counter.close()
    await broker.stop()

    tags, state, log = tmp_path / "tags", tmp_path / "state", tmp_path / "daemon.log"
    config = write_config(tmp_path, reference_plc.port, broker.port)
    text = config.read_text().replace(
        "reader: {type: simulated}",
        f"reader: {{type: simulated, directory: {json.dumps(str(tags))}, poll_interval: 0.05}}",
    )
    # A narrow window: the replay takes long enough to be caught in the middle.
    text = text.replace("reconnect_min: 0.05", "inflight: 2, reconnect_min: 0.05")
    config.write_text(text + f"state_dir: {json.dumps(str(state))}\n")
    daemon = start_daemon(config, log)
    recorder: KillingRecorder | None = None
    try:
        key = load_private_key(tmp_path / "mes.key")
        keyring = KeyRing({"mes": key.public_key()})
        tags.mkdir()
        uids = [f"04C0FFEE{n:06X}" for n in range(PARTS)]
        for n, uid in enumerate(uids):
            part = tags / f"{uid}.part"  # renamed into place: the reader never sees half a file
            part.write_bytes(tag_message(key, keyring, bytes.fromhex(uid), n))
            part.rename(tags / f"{uid}.ndef")
        await until(lambda: len(events(log, "cycle ok")) == PARTS, 30, "every cycle")
        for uid in uids:  # the parts move on: a restarted daemon must not see them again
            (tags / f"{uid}.ndef").unlink()
        assert daemon.poll() is None

        await broker.start()
        recorder = KillingRecorder(broker.host, broker.port, topic, session="counter")
        recorder.victim, recorder.at = daemon.pid, KILL_AT
        await until(lambda: daemon.poll() is not None, 15, "the kill")
        assert daemon.returncode == -signal.SIGKILL
        outbox = SqliteOutbox(state / "outbox.sqlite3")
        left = outbox.count(Keep.RECORD)
        outbox.close()
        assert 0 < left < PARTS, f"{left} reports waited when the daemon was killed"

        daemon = start_daemon(config, log)  # the backlog first, then whatever comes next
        await until(lambda: len({m["id"] for m in recorder.json("cycles")}) >= PARTS, 15, "all")
        received = recorder.json("cycles")
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            await asyncio.to_thread(daemon.wait, 20)
        if recorder is not None:
            recorder.close()
        await broker.stop()
        broker.close()
    assert daemon.returncode == 0, log.read_text()[-3000:]

    first: dict[str, dict[str, Any]] = {}
    for m in received:
        if m["id"] in first:
            assert first[m["id"]] == m  # a redelivery: the same message, same seq
        else:
            first[m["id"]] = m
    reports = list(first.values())
    assert [m["tag_uid"] for m in reports] == uids  # every part once, in the order made
    assert all(m["status"] == "ok" for m in reports)
    seqs = [m["seq"] for m in reports]
    assert seqs == sorted(seqs)
    assert len(received) - PARTS <= 2  # at most the in-flight window when the kill came
    # The restarted daemon said so: a backlog from the last run, then all of it delivered.
    assert events(log, "outbox has a backlog from the last run")[-1]["backlog"] >= left
    assert events(log, "backlog delivered")
