"""The real daemon (`edge-agent run`) ends with exit code 1 when a component cannot recover.

The fault is one a gateway meets on worn flash: a 4 KiB sector of the disk outbox reads back as
zeros. The sector holds an overflow page of an event queued by an earlier run, so the outbox still
opens (its counts come from the row headers) but reading that message back fails with SQLite's
"database disk image is malformed". That is no damaged row the outbox can set aside: the file's
structure is broken, and no retry inside the process mends it. The MQTT sender fails each time
it is woken (every cycle report queues a message), the supervisor restarts it with backoff, and
after more than ``restarts`` failures within its window the daemon stops with exit code 1, so
that systemd starts it afresh and, the fault persisting, its restart limit makes a person look.

Nothing of ours is replaced: the file is made with the daemon's own outbox class and damaged
on disk before the daemon starts, as a bad sector would.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from edge_agent.instructions.signing import KeyRing, load_private_key
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc
from edge_agent.supervisor import Supervisor
from edge_agent.uplink.outbox import Keep
from edge_agent.uplink.outbox_sqlite import SqliteOutbox
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import write_config
from tests.system.test_daemon_kill import events, start_daemon, tag_message

PAGE = 4096  # SQLite's default page size, and a flash sector
EXIT_BOUND = 120.0  # s: restarts back off 0.2 + 0.4 + ... + 3.2 s; the rest is start and stop


def damaged_outbox(path: Path) -> None:
    """An outbox with one large event from an earlier run, one of its overflow pages zeroed."""
    outbox = SqliteOutbox(path)
    note = "x" * 20_000  # larger than a page: stored on overflow pages
    for n, text in enumerate(("small", note)):
        payload = json.dumps({"id": f"earlier-{n}", "event": "note", "text": text}).encode()
        outbox.put("edge/gw-test/events", payload, 1, False, Keep.EVENT)
    outbox.close()  # checkpoints the WAL into the file
    data = bytearray(path.read_bytes())
    overflow = [
        at for at in range(0, len(data), PAGE) if data[at + 4 : at + PAGE].count(b"x") > PAGE - 100
    ]
    assert len(overflow) >= 2, "the event did not spill onto overflow pages"
    data[overflow[1] : overflow[1] + PAGE] = bytes(PAGE)  # the sector reads back as zeros
    path.write_bytes(data)


async def test_a_component_that_cannot_recover_ends_the_daemon_with_exit_1(
    tmp_path: Path, broker: EmbeddedBroker, reference_plc: ReferencePlc
) -> None:
    tags, state, log = tmp_path / "tags", tmp_path / "state", tmp_path / "daemon.log"
    config = write_config(tmp_path, reference_plc.port, broker.port)
    text = config.read_text().replace(
        "reader: {type: simulated}",
        f"reader: {{type: simulated, directory: {json.dumps(str(tags))}, poll_interval: 0.05}}",
    )
    config.write_text(text + f"state_dir: {json.dumps(str(state))}\n")
    damaged_outbox(state / "outbox.sqlite3")
    key = load_private_key(tmp_path / "mes.key")
    keyring = KeyRing({"mes": key.public_key()})
    tags.mkdir()

    status = MqttRecorder(broker.host, broker.port, "edge/gw-test/status")
    await status.ready()
    daemon = start_daemon(config, log)
    started = time.monotonic()
    fed = 0
    waiting: dict[Path, tuple[bytes, float]] = {}  # on the reader: what was put there, when
    try:
        # Parts keep coming, as on a line: each report queued wakes the sender again. A part
        # leaves once written back (or after 10 s: a busy machine may be slow to start).
        while daemon.poll() is None and time.monotonic() - started < EXIT_BOUND:
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
        await asyncio.to_thread(daemon.wait, 30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        status.close()
    output = log.read_text()
    assert daemon.returncode == 1, f"exit {daemon.returncode} after {fed} parts\n{output[-4000:]}"

    # The line was told which component and why, while the daemon was still up.
    degraded = [
        problem
        for s in status.json("status")
        if s.get("health") == "degraded"
        for problem in s["problems"]
    ]
    assert any(
        p["component"] == "mqtt-sender" and "cannot read the outbox" in p["error"] for p in degraded
    ), status.json("status")

    # Every failure is in the log: the first with its traceback, the same error again as one
    # line without it; then the supervisor gives up and the agent says it exits for a restart.
    first = events(log, "component failed; restarting it")
    again = events(log, "component failed again")
    assert [e["component"] for e in first] == ["mqtt-sender"]
    assert "database disk image is malformed" in first[0]["exception"]
    assert sum("Traceback" in line for line in output.splitlines()) == 1
    failures = len(first) + len(again)
    assert all(e["component"] == "mqtt-sender" and "exception" not in e for e in again)
    assert failures == Supervisor().restarts + 1, f"{failures} failures logged"
    gave_up = events(log, "agent cannot go on; exiting for a restart")
    assert len(gave_up) == 1
    assert "mqtt-sender failed" in gave_up[0]["reason"]
    assert "malformed" in gave_up[0]["reason"]
    # Parts were taken meanwhile: the fault is in delivery, not in the station.
    assert events(log, "cycle ok")

    # Gone, the daemon does not leave the line believing it is online.
    after = MqttRecorder(broker.host, broker.port, "edge/gw-test/status")
    try:
        retained = (await after.wait_for("status", 1))[-1]
    finally:
        after.close()
    assert retained["state"] == "offline", retained
