"""The daemon as systemd and a monitoring system see it: the real `edge-agent run`, a real
AF_UNIX datagram socket as $NOTIFY_SOCKET, SIGHUP, and /healthz and /metrics over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.instructions.signing import KeyRing, load_private_key
from edge_agent.service.heartbeat import Heartbeat
from edge_agent.service.run import Service
from edge_agent.sim.broker import EmbeddedBroker, free_port
from edge_agent.sim.reference_plc import ReferencePlc
from edge_agent.tag.simulated import SimulatedReader, SimulatedTag
from tests import REPO_ROOT
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import write_config
from tests.system.test_daemon_kill import tag_message

REPO = REPO_ROOT


class NotifySocket:
    """What systemd listens on: one datagram per sd_notify() call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.received: list[list[str]] = []

    async def until(self, field: str, timeout: float = 30) -> list[str]:
        """The next datagram carrying ``field``; every datagram is kept in ``received``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            assert remaining > 0, f"no {field} within {timeout} s: {self.received[-5:]}"
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), remaining)
            except TimeoutError:
                continue
            fields = data.decode().split("\n")
            self.received.append(fields)
            if field in fields or any(f.startswith(field) for f in fields):
                return fields

    def close(self) -> None:
        self.sock.close()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


async def test_notify_watchdog_reload_and_health_of_the_real_daemon(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    tags, port = tmp_path / "tags", free_port()
    config = write_config(tmp_path, reference_plc.port, broker.port)
    good = (
        config.read_text().replace(
            "reader: {type: simulated}",
            f"reader: {{type: simulated, directory: {json.dumps(str(tags))}, poll_interval: 0.05}}",
        )
        + f"health: {{listen: '127.0.0.1:{port}'}}\n"
    )
    config.write_text(good)
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(notify.path)}
    env.update(WATCHDOG_USEC="1000000")  # WatchdogSec=1: a ping every 0.5 s
    log = tmp_path / "daemon.log"
    with log.open("wb") as err:
        daemon = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge_agent", "run", "-c", str(config), "--log-format", "json",
            cwd=REPO, stderr=err, env=env,
        )  # fmt: skip
    key = load_private_key(tmp_path / "mes.key")
    keyring = KeyRing({"mes": key.public_key()})

    async def part(n: int) -> dict[str, Any]:
        uid = f"04C0FFEE{n:06X}"
        (tags / f"{uid}.part").write_bytes(tag_message(key, keyring, bytes.fromhex(uid), n))
        (tags / f"{uid}.part").rename(tags / f"{uid}.ndef")
        reports = await recorder.wait_for("gw-test/cycles", n + 1, timeout=20)
        return reports[n]

    try:
        ready = await notify.until("READY=1")
        assert any(f.startswith("STATUS=accepting parts") for f in ready)  # broker maybe not yet
        for _ in range(3):  # the watchdog is fed while all is well
            await notify.until("WATCHDOG=1", timeout=10)

        await recorder.wait_for("gw-test/status", 1)  # connected to the broker
        status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/healthz")
        health = json.loads(body)
        assert status == 200 and health["healthy"] and health["state"] == "accepting parts"
        assert health["status"]["gateway_id"] == "gw-test"
        # What Docker's HEALTHCHECK runs; and with nothing listening, a failure.
        command = [sys.executable, "-m", "edge_agent", "health", "--listen"]
        out = await asyncio.to_thread(
            subprocess.run,
            [*command, f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert (out.returncode, out.stdout) == (0, "edge-agent health: accepting parts\n")
        out = await asyncio.to_thread(
            subprocess.run,
            [*command, f"127.0.0.1:{free_port()}"],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert out.returncode == 1 and "no answer from" in out.stdout

        assert (await part(0))["status"] == "ok"
        status, text = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        lines = text.splitlines()
        assert "# TYPE edge_agent_cycles_total counter" in lines
        assert 'edge_agent_cycles_total{status="ok",reason=""} 1' in lines
        assert "# TYPE edge_agent_cycle_duration_seconds histogram" in lines
        assert 'edge_agent_cycle_duration_seconds_count{phase="total"} 1' in lines
        assert (
            'edge_agent_cycle_duration_seconds_bucket{phase="machine_cycle",le="+Inf"} 1' in lines
        )
        assert 'edge_agent_link_up{link="broker"} 1' in lines
        assert 'edge_agent_link_up{link="machine"} 1' in lines
        assert any(x.startswith("edge_agent_outbox_backlog_messages ") for x in lines)
        rss = next(x for x in lines if x.startswith("process_resident_memory_bytes "))
        assert 10 * 2**20 < float(rss.split()[1]) < 500 * 2**20
        status, _ = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/nothing")
        assert status == 404
        # Bounded: a request head over 8 KiB is refused, the connection closed.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"a" * 9000 + b"\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 431 ")

        # SIGHUP with a broken file: refused, said so, and the station runs on as it was.
        config.write_text(good.replace("timeout: 0.5", "timeout: -1"))
        daemon.send_signal(signal.SIGHUP)
        [refused] = await recorder.wait_for("gw-test/events", 1, timeout=20)
        assert refused["event"] == "config_reload_refused" and refused["trigger"] == "SIGHUP"
        assert any(f"{config}:" in p and "machine.timeout" in p for p in refused["problems"])
        assert (await part(1))["status"] == "ok"
        assert daemon.returncode is None

        # SIGHUP with a valid change: taken between cycles.
        config.write_text(good.replace("timeout: 0.5", "timeout: 0.7"))
        daemon.send_signal(signal.SIGHUP)
        events = await recorder.wait_for("gw-test/events", 2, timeout=20)
        assert events[1]["event"] == "config_reloaded"
        assert events[1]["machine_reloaded"] is True
        await notify.until("READY=1")  # after RELOADING=1
        assert any("RELOADING=1" in d for d in notify.received)
        assert (await part(2))["status"] == "ok"
    finally:
        daemon.send_signal(signal.SIGTERM)
        stopping = await notify.until("STOPPING=1")
        await asyncio.wait_for(daemon.wait(), 30)
        notify.close()
    assert any(f.startswith("STATUS=stopping") for f in stopping)
    assert daemon.returncode == 0, log.read_text()[-3000:]
    for line in log.read_text().splitlines():  # JSON mode: nothing but JSON lines
        json.loads(line)


class WedgedReader(SimulatedReader):
    """A reader whose ReadTag never returns until released, as a hung USB reader does."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def read_ndef(self, uid: bytes) -> bytes:
        await self.release.wait()
        return await super().read_ndef(uid)


async def test_watchdog_pings_stop_while_a_part_is_stuck_and_resume_after(
    tmp_path: Path,
    reference_plc: ReferencePlc,
    broker: EmbeddedBroker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
    config = load_config(write_config(tmp_path, reference_plc.port, broker.port))
    reader = WedgedReader()
    agent = Agent(config, reader=reader)
    stop = asyncio.Event()
    service = Service(agent, stop)
    service.longest_cycle = lambda: 0.5  # the profile allows 67 s; the test has less time
    running = asyncio.create_task(service.run())
    try:
        await notify.until("READY=1")
        await notify.until("WATCHDOG=1", timeout=5)
        key = load_private_key(tmp_path / "mes.key")
        uid = bytes.fromhex("04C0FFEE000001")
        message = tag_message(key, KeyRing({"mes": key.public_key()}), uid, 1)
        reader.present(SimulatedTag(uid, message))
        stuck = await notify.until("STATUS=degraded: one part has been in hand", timeout=10)
        assert "WATCHDOG=1" not in stuck
        healthy, words = service.health()
        assert not healthy and words.startswith("degraded: one part has been in hand for")
        # Silence from here on: systemd would kill and restart the daemon.
        seen = len(notify.received)
        with contextlib.suppress(AssertionError):
            await notify.until("WATCHDOG=1", timeout=1.5)
        assert not any("WATCHDOG=1" in d for d in notify.received[seen:])

        reader.release.set()  # the part goes through after all: the loop is alive again
        await notify.until("WATCHDOG=1", timeout=10)
        assert service.health() == (True, "accepting parts")
        assert agent.metrics.cycles == {("ok", ""): 1}
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        stopping = await notify.until("STOPPING=1", timeout=5)
        notify.close()
    assert any(f.startswith("STATUS=stopping") for f in stopping)


async def test_heartbeat_says_when_the_part_taking_loop_has_ended() -> None:
    heartbeat = Heartbeat()
    assert heartbeat.stalled(60) == "the part-taking loop has not started"
    reader = SimulatedReader()

    async def take_parts() -> None:  # dies on its first part, as a write-back error once did
        async for _event in heartbeat.events(reader.events()):
            raise PermissionError("tag file not writable")

    loop = asyncio.create_task(take_parts())
    await heartbeat.running.wait()
    assert heartbeat.stalled(60) is None  # waiting for a tag is alive
    reader.present(SimulatedTag(b"\x04\x01\x02\x03\x04\x05\x06", b""))
    with pytest.raises(PermissionError):
        await loop
    assert heartbeat.stalled(60) == "the part-taking loop has ended"
