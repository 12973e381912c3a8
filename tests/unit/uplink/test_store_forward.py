"""Store and forward against a real mosquitto: broker outages, kill -9 of the agent, a full outbox.

A subscriber that counts proves every cycle report arrived, in order; duplicates are allowed only
with the same id and seq as the original, so a consumer can drop them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config_schema import BrokerConfig
from edge_agent.instructions.model import Step
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc as Plc
from edge_agent.uplink.mqtt import MqttUplink
from edge_agent.uplink.outbox_sqlite import SqliteOutbox
from tests import REPO_ROOT
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import DRILL, running_station

REPO = REPO_ROOT

# The uplink with its disk outbox in a process of its own, so that it can be SIGKILLed.
# argv: state_dir broker_port first_n count inflight
CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from edge_agent.config_schema import BrokerConfig
    from edge_agent.uplink.mqtt import MqttUplink
    from edge_agent.uplink.outbox_sqlite import SqliteOutbox

    async def main() -> None:
        state, port, first, count, inflight = sys.argv[1:6]
        outbox = SqliteOutbox(Path(state) / "outbox.sqlite3")
        config = BrokerConfig(
            host="127.0.0.1", port=int(port), inflight=int(inflight),
            reconnect_min=0.05, reconnect_max=0.2,
        )
        uplink = MqttUplink(config, "gw-kill", "edge-agent-gw-kill", outbox=outbox)
        await uplink.start(lambda: {})
        for n in range(int(first), int(first) + int(count)):
            uplink.publish("cycles", {"n": n})
        print("queued", flush=True)
        while not await uplink.flush(1):
            pass
        print("flushed", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def spawn(
    state: Path, port: int, first: int, count: int, inflight: int = 20
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state), str(port), str(first), str(count), str(inflight)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


async def wait_line(proc: subprocess.Popen[str], expected: str, timeout: float = 30) -> None:
    """Read the child's stdout (its log lines too) until ``expected``."""
    assert proc.stdout is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), remaining)
        assert line, f"child exited before saying {expected!r}"
        if line.strip() == expected:
            return


def kill9(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(5)
    assert proc.returncode == -signal.SIGKILL


def check_complete_and_ordered(received: list[dict[str, Any]], total: int) -> int:
    """Every n once at least; duplicates identical to their original; first copies in order."""
    first: dict[str, dict[str, Any]] = {}
    order: list[int] = []
    for m in received:
        if m["id"] in first:
            assert first[m["id"]] == m  # a redelivery: same id, same seq, same content
            continue
        first[m["id"]] = m
        order.append(m["n"])
    assert order == list(range(total))
    seqs = [m["seq"] for m in first.values()]
    assert seqs == sorted(seqs) and len(set(seqs)) == total
    return len(received) - total


async def test_agent_killed_before_and_during_replay_delivers_everything(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    await broker.stop()  # a long outage: everything queues on disk
    child = spawn(tmp_path, broker.port, 0, 3000)
    await wait_line(child, "queued")
    kill9(child)  # power cut right after the last report was produced

    await broker.start()
    recorder = MqttRecorder(broker.host, broker.port, "edge/gw-kill/cycles")
    await recorder.ready()
    child = spawn(tmp_path, broker.port, 3000, 0, inflight=2)  # replay only, a narrow window
    await wait_line(child, "queued")
    await recorder.wait_for("cycles", 500, timeout=30)  # mid-backlog
    kill9(child)
    delivered_before_kill = len(recorder.messages)
    assert delivered_before_kill < 3000

    child = spawn(tmp_path, broker.port, 3000, 10)  # restart; 10 new reports after the backlog
    await wait_line(child, "queued")
    await wait_line(child, "flushed")
    kill9(child)
    received = await recorder.wait_for("cycles", 3010)
    duplicates = check_complete_and_ordered(received, 3010)
    assert duplicates <= 2 + 1  # at most the in-flight window when the kill came
    recorder.close()

    box = SqliteOutbox(tmp_path / "outbox.sqlite3")
    assert len(box) == 0
    box.close()


class DurableRecorder:
    """A subscriber with a persistent session: the broker queues for it while it is away."""

    def __init__(self, broker: EmbeddedBroker, topic: str) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id="durable-recorder",
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        self._client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]  # paho: ints, sleeps floats
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self._client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self._client.on_message = lambda c, u, msg: self.messages.append(
            (msg.topic, json.loads(msg.payload))
        )
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()

    async def ready(self) -> None:
        assert await asyncio.to_thread(self._subscribed.wait, 5)

    def on(self, suffix: str) -> list[dict[str, Any]]:
        return [m for t, m in list(self.messages) if t.endswith(suffix)]

    async def wait_for(self, suffix: str, unique: int, timeout: float = 15) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len({m["id"] for m in self.on(suffix)}) < unique:
            assert loop.time() < deadline, f"{len(self.on(suffix))} messages on *{suffix}"
            await asyncio.sleep(0.01)
        return self.on(suffix)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def _store_dir() -> Path:
    store = Path(tempfile.mkdtemp(prefix="edge-agent-mosquitto-"))
    store.chmod(0o777)  # mosquitto drops to its own user when started as root
    return store


async def persistent(broker: EmbeddedBroker) -> None:
    """Restart the test's mosquitto with persistence: sessions survive a graceful stop."""
    await broker.stop()
    store = _store_dir()
    broker.extra_config = f"persistence true\npersistence_location {store}/\n"
    await broker.start()


def first_copies(received: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for m in received:
        if m["id"] in seen:
            assert seen[m["id"]] == m  # a redelivery is the same message, same seq
        else:
            seen[m["id"]] = m
    return list(seen.values())


async def test_broker_outage_during_cycles_and_telemetry(
    tmp_path: Path, reference_plc: Plc, broker: EmbeddedBroker
) -> None:
    await persistent(broker)
    state = tmp_path / "state"
    extra = f"state_dir: {json.dumps(str(state))}\n"
    recorder = DurableRecorder(broker, "edge/gw-test/#")
    await recorder.ready()
    steps = [Step("drill", DRILL, "st-10"), Step("drill", DRILL, "st-20")]
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=extra) as station:
        uplink = station.agent.uplink
        produced = []
        for i in range(12):
            if i == 4:
                await broker.stop()
            if i == 9:
                assert uplink.backlog >= 10  # five reports and five telemetry messages wait
                await broker.start()
            tag = station.tag(steps, uid=bytes([4, 9, 9, 9, 9, 9, i]), done=1)
            produced.append(await station.cycle(tag))
            uplink.publish("telemetry/spindle", {"rpm": 1000 + i})
        assert (state / "outbox.sqlite3").is_file()
        assert await uplink.flush(15)
        cycles = first_copies(await recorder.wait_for("gw-test/cycles", 12))
        telemetry = first_copies(await recorder.wait_for("gw-test/telemetry/spindle", 12))
    recorder.close()
    assert [m["id"] for m in cycles] == [r.id for r in produced]
    assert [m["rpm"] for m in telemetry] == [1000 + i for i in range(12)]
    seqs = [m["seq"] for m in cycles]
    assert seqs == sorted(seqs)
    # The status after the restart tells the backlog, and again once it is delivered.
    online = [m for m in recorder.on("gw-test/status") if m["state"] == "online"]
    assert all(m["accepting_parts"] for m in online)
    # oldest_age_s is in tenths of a second: a short outage on a fast machine may show 0.0.
    assert any(m["backlog"] >= 10 and m["oldest_age_s"] >= 0 for m in online)
    assert online[-1]["backlog"] == 0


async def test_full_outbox_of_reports_stops_taking_parts(
    tmp_path: Path, reference_plc: Plc, broker: EmbeddedBroker
) -> None:
    await persistent(broker)
    state = tmp_path / "state"
    extra = f"state_dir: {json.dumps(str(state))}\noutbox: {{max_messages: 10}}\n"
    recorder = DurableRecorder(broker, "edge/gw-test/cycles")
    await recorder.ready()
    steps = [Step("drill", DRILL, "st-10"), Step("drill", DRILL, "st-20")]
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=extra) as station:
        uplink = station.agent.uplink
        await broker.stop()
        for i in range(4):
            uplink.publish("telemetry/spindle", {"rpm": i})
        for i in range(10):  # ten reports displace the four telemetry messages
            tag = station.tag(steps, uid=bytes([4, 7, 7, 7, 7, 7, i]), done=1)
            assert (await station.cycle(tag)).status == "ok"
        assert uplink.outbox.full and uplink.backlog == 10
        assert station.agent.status()["accepting_parts"] is False

        # The next part waits at the station: no cycle, no report, the machine untouched.
        machine_before = reference_plc.snapshot()
        station.reader.present(station.tag(steps, uid=bytes([4, 7, 7, 7, 7, 7, 99]), done=1))
        await asyncio.sleep(1.0)
        assert station.reports.empty()
        assert reference_plc.snapshot() == machine_before

        await broker.start()
        report = await asyncio.wait_for(station.reports.get(), 15)
        assert report.status == "ok"  # taken once the broker drained the outbox
        assert await uplink.flush(10)
        received = first_copies(await recorder.wait_for("gw-test/cycles", 11))
    recorder.close()
    assert len(received) == 11 and received[-1]["tag_uid"] == "04070707070763"


async def test_demo_waits_out_a_broker_restart_and_exits_0(tmp_path: Path) -> None:
    """`edge-agent demo --parts 300 --rate 50 --broker HOST:PORT` with the broker stopped and
    started again mid-run: all 300 reports arrive, in order, and the demo exits 0."""
    parts, rate = 300, 50
    broker = EmbeddedBroker(persistent=True)  # the counter's session survives the restart
    await broker.start()
    counter = MqttRecorder(broker.host, broker.port, "edge/+/cycles", session="demo-counter")
    await counter.ready()
    demo = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "edge_agent", "demo", "--parts", str(parts), "--rate", str(rate)],
        *["--broker", f"{broker.host}:{broker.port}", "--state-dir", str(tmp_path / "state")],
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert demo.stdout is not None and demo.stderr is not None
    stderr = asyncio.create_task(demo.stderr.read())  # drained, so the demo never blocks on it
    lines: list[str] = []

    async def cycles(n: int) -> None:  # read the demo's output until n parts are through
        assert demo.stdout is not None
        while sum("-> ok" in line for line in lines) < n:
            line = await asyncio.wait_for(demo.stdout.readline(), 15)
            assert line, "".join(lines)
            lines.append(line.decode())

    try:
        await cycles(50)
        await broker.stop()  # mid-run: the reports of the next parts pile up in the disk outbox
        await cycles(150)
        await broker.start()
        await cycles(parts)
        lines += [line.decode() for line in (await demo.stdout.read()).splitlines(True)]
        assert await asyncio.wait_for(demo.wait(), 30) == 0, "".join(lines)
    finally:
        if demo.returncode is None:
            demo.kill()
        await demo.wait()
        await stderr
        counter.close()
        await broker.stop()
        broker.close()
    assert "300 cycles ok" in lines[-1]
    received = counter.json("cycles")
    reports = first_copies(received)
    assert [r["part"]["id"] for r in reports] == [f"P-{i + 1:05d}" for i in range(parts)]
    box = SqliteOutbox(tmp_path / "state" / "outbox.sqlite3")
    assert len(box) == 0  # exit 0 only once the broker acknowledged everything
    box.close()


async def test_replay_leaves_room_for_live_messages_and_keeps_per_topic_order(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    recorder = MqttRecorder(broker.host, broker.port, "edge/gw-r/#")
    await recorder.ready()
    config = BrokerConfig(
        host=broker.host, port=broker.port, inflight=2, reconnect_min=0.05, reconnect_max=0.2
    )
    outbox = SqliteOutbox(tmp_path / "outbox.sqlite3")
    uplink = MqttUplink(config, "gw-r", "edge-agent-gw-r", outbox=outbox)
    for n in range(400):  # queued before the link is up: the backlog
        uplink.publish("cycles", {"n": n})
    await uplink.start(lambda: {})
    assert await uplink.wait_connected(5)
    uplink.publish("events", {"event": "live"})  # no backlog on this topic: may go ahead
    uplink.publish("cycles", {"n": 400})  # same topic as the backlog: strictly after it
    assert await uplink.flush(15)
    await uplink.stop({"state": "offline"})
    outbox.close()
    await recorder.wait_for("gw-r/cycles", 401)
    topics = [(t.rsplit("/", 1)[-1], json.loads(p)) for t, p, _ in recorder.messages]
    cycles = [m["n"] for t, m in topics if t == "cycles"]
    assert cycles == list(range(401))
    order = [m.get("n", "live") for t, m in topics if t in ("cycles", "events")]
    assert order.index("live") < order.index(399)  # not starved by the 400-message replay
    recorder.close()
