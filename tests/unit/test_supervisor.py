"""One supervisor for every long-lived task: a defect degrades the status, it never stops the
station silently; what cannot recover ends the process for systemd to restart."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config_schema import BrokerConfig
from edge_agent.instructions.model import Step
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc
from edge_agent.supervisor import Supervisor
from edge_agent.uplink.mqtt import MqttUplink
from edge_agent.uplink.outbox_sqlite import SqliteOutbox
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import DRILL, running_station


async def until(condition: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_a_failing_component_degrades_the_status_restarts_and_recovers() -> None:
    changes: list[str] = []
    supervisor = Supervisor(settle=0.2, backoff=(0.01, 0.05))
    supervisor.on_change = lambda: changes.append(supervisor.status()["health"])
    runs = 0
    running = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise PermissionError(13, "Permission denied", "/srv/tags/04A1.ndef")
        running.set()
        await asyncio.Event().wait()

    task = supervisor.spawn("reader-events", flaky)
    await asyncio.wait_for(running.wait(), 5)
    problem = supervisor.status()["problems"][0]
    assert problem["component"] == "reader-events"
    assert "Permission denied" in problem["error"] and "/srv/tags/04A1.ndef" in problem["error"]
    await until(lambda: supervisor.healthy, 5, "the problem to clear after the settle time")
    assert changes == ["degraded", "ok"]  # told once when it broke, once when it recovered
    assert supervisor.fatal is None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_component_that_cannot_recover_makes_the_supervisor_fatal() -> None:
    supervisor = Supervisor(restarts=3, window=30, backoff=(0.01, 0.02))

    async def broken() -> None:
        raise RuntimeError("state file unreadable")

    task = supervisor.spawn("mqtt-sender", broken)
    await asyncio.wait_for(supervisor.failed.wait(), 5)
    await task
    assert supervisor.fatal is not None
    assert "mqtt-sender failed 4 times" in supervisor.fatal
    assert "state file unreadable" in supervisor.fatal
    assert supervisor.status()["health"] == "degraded"


@contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """The file cannot be written, even by root: a read-only mode, or the immutable attribute."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        yield
        path.chmod(0o644)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("root, and the file system has no immutable attribute")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


async def test_a_tag_that_cannot_be_written_back_does_not_stop_part_taking(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    tags = tmp_path / "tags"
    reader = f"{{type: simulated, directory: {json.dumps(str(tags))}, poll_interval: 0.02}}"
    async with running_station(tmp_path, reference_plc.port, broker.port, reader=reader) as st:
        routing = [Step("drill", DRILL, "st-10"), Step("drill", DRILL, "st-20")]
        locked = tags / "04A1A2A3A4A5A6.ndef"
        locked.write_bytes(st.tag(routing, uid=bytes.fromhex("04A1A2A3A4A5A6"), done=1).message)
        with unwritable(locked):
            first = await asyncio.wait_for(st.reports.get(), 10)
            # The machine ran: the report says so, and says the tag could not be updated.
            assert first.status == "ok", first.error
            assert first.tag_write.startswith("failed:")
            assert "not permitted" in first.tag_write or "denied" in first.tag_write
            fine = tags / "04B1B2B3B4B5B6.ndef"
            fine.write_bytes(st.tag(routing, uid=bytes.fromhex("04B1B2B3B4B5B6"), done=1).message)
            second = await asyncio.wait_for(st.reports.get(), 10)
        assert (second.status, second.tag_write) == ("ok", "ok")
        assert reference_plc.cycles == 2
        status = st.agent.status()
        assert (status["health"], status["accepting_parts"]) == ("ok", True)
    assert [r["tag_uid"] for r in recorder.json("gw-test/cycles")] == [
        "04A1A2A3A4A5A6",
        "04B1B2B3B4B5B6",
    ]


async def test_a_corrupt_outbox_row_is_quarantined_and_delivery_goes_on(
    tmp_path: Path, broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = SqliteOutbox(path)
    for n in range(3):
        outbox.put(f"edge/gw-c/cycles/{n}", json.dumps({"n": n}).encode(), 1, False)
    outbox.close()
    db = sqlite3.connect(path)  # damaged on disk: a class this version does not know
    db.execute("UPDATE messages SET keep = 42 WHERE id = 2")
    db.commit()
    db.close()

    outbox = SqliteOutbox(path)
    uplink = MqttUplink(
        BrokerConfig(host=broker.host, port=broker.port, reconnect_min=0.05, reconnect_max=0.2),
        "gw-c",
        "edge-agent-gw-c",
        outbox=outbox,
    )
    await uplink.start(lambda: {})
    uplink.publish("cycles/3", {"n": 3})
    found = await recorder.wait_for("gw-c/cycles/3", 1)
    assert found[0]["n"] == 3
    seen = [t for t, _, _ in recorder.messages if "/cycles/" in t]
    assert seen == ["edge/gw-c/cycles/0", "edge/gw-c/cycles/2", "edge/gw-c/cycles/3"]
    await uplink.stop({"state": "offline"})
    outbox.close()
    kept = sqlite3.connect(path).execute("SELECT id, topic FROM quarantine").fetchall()
    assert kept == [(2, "edge/gw-c/cycles/1")]  # set aside for a person, never sent


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real full disk (ENOSPC) for the outbox, freed by deleting a filler."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, bytes(65536))
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


async def test_a_full_disk_refuses_parts_untouched_and_taking_resumes_when_space_returns(
    tmp_path: Path,
    small_disk: Path,
    reference_plc: ReferencePlc,
    broker: EmbeddedBroker,
    recorder: MqttRecorder,
) -> None:
    extra = f"state_dir: {json.dumps(str(small_disk))}\n"
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=extra) as st:
        routing = [Step("drill", DRILL, "st-10"), Step("drill", DRILL, "st-20")]
        uids = [bytes([4, n, n, n, n, n, n]) for n in range(1, 5)]
        assert (await st.cycle(st.tag(routing, uid=uids[0], done=1))).status == "ok"

        filler = fill(small_disk)
        refused = [await st.cycle(st.tag(routing, uid=uid, done=1)) for uid in uids[1:3]]
        assert [(r.status, r.reason, r.machine_state) for r in refused] == [
            ("rejected", "not_recording", "untouched")
        ] * 2
        assert reference_plc.cycles == 1  # the machine was not moved for a part not recorded
        status = st.agent.status()
        assert (status["health"], status["accepting_parts"]) == ("degraded", False)
        assert status["problems"][0]["component"] == "outbox"
        assert "full" in status["problems"][0]["error"]
        # The line hears of it at once (straight to the broker), and from the retained status.
        failed = await recorder.wait_for("gw-test/events", 1)
        assert failed[0]["event"] == "outbox_failed"
        await until(
            lambda: any(s.get("health") == "degraded" for s in recorder.json("gw-test/status")),
            5,
            "a degraded status",
        )

        filler.unlink()
        await until(lambda: st.agent.accepting_parts, 15, "taking parts again")
        assert st.agent.status()["health"] == "ok"
        assert (await st.cycle(st.tag(routing, uid=uids[3], done=1))).status == "ok"
        assert reference_plc.cycles == 2
        reports = await recorder.wait_for("gw-test/cycles", 4)
    # Nothing lost: the refusals kept in memory while the disk was full were stored and sent.
    assert [r["tag_uid"] for r in reports] == [uid.hex().upper() for uid in uids]
    events = [e["event"] for e in recorder.json("gw-test/events")]
    assert "outbox_recovered" in events
