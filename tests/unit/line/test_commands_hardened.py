"""The command path under abuse: retained, repeated, oversized, deeply nested and hostile
messages, a flood, and MQTT 5 response topics elsewhere. Real mosquitto, reference PLC, the agent
(in this process or the real daemon)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import paho.mqtt.client as mqtt
import paho.mqtt.publish
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.instructions.model import Step
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import DRILL, PROFILE, REPO, Station, running_station, write_config
from tests.system.test_daemon_kill import events, start_daemon
from tests.unit.line.test_commands import ALL, Line, edit, error, in_cycle

WRITES = (5, 6, 15, 16)  # Modbus write function codes
NESTED = "[" * 60_000  # crashed libyaml's C composer (SIGSEGV)
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.fixture
async def station(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker
) -> AsyncIterator[Station]:
    extra = ALL.replace("commands: {", "commands: {queue: 20, ")
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=extra) as s:
        yield s


@pytest.fixture
def line(broker: EmbeddedBroker, recorder: MqttRecorder) -> Line:
    return Line(broker, recorder)


async def online(recorder: MqttRecorder, before: int) -> int:
    """Wait for a new retained status ``online``: the agent has (re)subscribed by then."""
    for _ in range(1000):
        found = [s for s in recorder.json("gw-test/status") if s.get("state") == "online"]
        if len(found) > before:
            return len(found)
        await asyncio.sleep(0.02)
    raise AssertionError("the agent did not come online")


async def answers(line: Line, recorder: MqttRecorder) -> None:
    """A live status command is answered (asked again while the agent or recorder reconnects)."""
    for _ in range(20):
        cid = f"live-{time.monotonic_ns()}"
        await line.send("status", json.dumps({"correlation_id": cid}))
        for _ in range(50):
            if any(r["correlation_id"] == cid for r in recorder.json("gw-test/reply/status")):
                return
            await asyncio.sleep(0.02)
    raise AssertionError("no live command answered")


def writes(plc: ReferencePlc) -> int:
    return sum(plc.requests[fc] for fc in WRITES)


# ------------------------------------------------------------------ retained commands


async def test_retained_commands_never_run_across_daemon_and_broker_restarts(
    tmp_path: Path, reference_plc: ReferencePlc
) -> None:
    # A persistent broker keeps retained messages (and our session) across its restart.
    broker = EmbeddedBroker(persistent=True)
    await broker.start()
    recorder = MqttRecorder(broker.host, broker.port)
    await recorder.ready()
    line = Line(broker, recorder)
    config = write_config(tmp_path, reference_plc.port, broker.port, extra=ALL)
    log = tmp_path / "daemon.log"
    for name, params in (
        ("write", {"values": {"tool": 9}}),
        ("push_profile", {"yaml": NESTED}),  # and hostile: once crashed every start
    ):
        body = json.dumps({"correlation_id": f"retained-{name}", "params": params})
        paho.mqtt.publish.single(
            f"edge/gw-test/cmd/{name}", body, qos=1, retain=True, port=broker.port
        )
    seen = 0
    try:
        for run in range(3):
            daemon = start_daemon(config, log)
            try:
                # Online means subscribed: the retained commands came. A live one is answered.
                seen = await online(recorder, seen)
                await answers(line, recorder)
                if run == 1:  # the broker restarts under the running daemon
                    await broker.stop()
                    await broker.start()
                    await answers(line, recorder)
            finally:
                daemon.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(daemon.wait, 20) == 0  # not -11 (SIGSEGV)
        assert reference_plc.snapshot()["holding"][7] == 0 and writes(reference_plc) == 0
        replies = recorder.json("gw-test/reply/write") + recorder.json("reply/push_profile")
        assert replies == []  # never taken as a command, so never answered
        ignored = events(
            log,
            "retained message ignored: this topic takes live messages only "
            "(a retained one would act again at every reconnect); clear it with an "
            "empty retained publish",
        )
        # Logged once per topic and daemon run, not at every reconnect.
        assert sorted(e["topic"] for e in ignored) == sorted(
            3 * ["edge/gw-test/cmd/write", "edge/gw-test/cmd/push_profile"]
        )
    finally:
        recorder.close()
        await broker.stop()
        broker.close()


# ------------------------------------------------------------------ repeated ids


async def test_a_repeated_command_id_is_answered_from_memory_not_run_twice(
    station: Station, line: Line, reference_plc: ReferencePlc, recorder: MqttRecorder
) -> None:
    body = json.dumps({"correlation_id": "mes-1", "params": {"values": {"dwell": 123}}})
    await line.send("write", body)
    first = await line.reply("write")
    assert first["ok"] is True and reference_plc.snapshot()["holding"][8] == 123
    reference_plc.poke("holding", 8, [0])  # the machine moved on
    before = writes(reference_plc)
    await line.send("write", body)  # a retry or a redelivery of the same command
    again = await line.reply("write", 1)
    assert again["repeated"] is True and again["correlation_id"] == "mes-1"
    assert {k: again[k] for k in first if k not in ("id", "seq")} == {
        k: first[k] for k in first if k not in ("id", "seq")
    }
    assert writes(reference_plc) == before and reference_plc.snapshot()["holding"][8] == 0
    # Another id runs; the same id under another command name is another command.
    assert (await line.call("write", {"values": {"dwell": 7}}))["ok"] is True
    assert reference_plc.snapshot()["holding"][8] == 7


# ------------------------------------------------------------------ hostile payloads


async def test_oversized_and_deeply_nested_payloads_are_refused_without_internal_errors(
    station: Station, line: Line
) -> None:
    await line.send("status", b'{"correlation_id": "big", "pad": "' + b"x" * 300_000 + b'"}')
    big = await line.reply("status")
    assert error(big) == "too_large" and "commands.max_payload (262144)" in big["error"]["message"]
    await line.send("status", b'{"correlation_id": "deep", "params": {"a": ' + b"[" * 100_000)
    await line.send(
        "status",
        b'{"correlation_id": "deep2", "params": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
    )
    for i in (1, 2):
        reply = await line.reply("status", i)
        assert error(reply) == "malformed", reply
        assert "nested" in reply["error"]["message"]
    assert (await line.call("status"))["ok"] is True


async def test_escapes_that_are_not_unicode_are_refused_and_every_command_answered(
    station: Station, line: Line
) -> None:
    # "\ud800" parses in Python but cannot be encoded as UTF-8: an id, a point name or a value
    # holding one left the command without any reply (the reply could not be sent).
    await line.send("status", b'{"correlation_id": "\\ud800"}')
    await line.send("read", b'{"correlation_id": "half", "params": {"points": ["\\udfff"]}}')
    await line.send(
        "write", b'{"correlation_id": "pair", "params": {"values": {"x\\ud83d\\ude00": 1}}}'
    )
    lone_id, lone_point, pair = (
        await line.reply("status"),
        await line.reply("read"),
        await line.reply("write"),
    )
    for reply in (lone_id, lone_point):
        assert error(reply) == "malformed", reply
        assert "surrogate" in reply["error"]["message"]
    assert lone_point["correlation_id"] == "half"  # still answered under its own id
    # A whole pair is ordinary text: the command is judged on its content.
    assert error(pair) == "unknown_point" and "x\U0001f600" in pair["error"]["message"], pair
    assert (await line.call("status"))["ok"] is True


async def test_hostile_profiles_are_refused_quickly_and_the_station_runs_on(
    station: Station, line: Line
) -> None:
    for text, words in (
        (ALIAS_BOMB, "pushed profile:1: anchor &a: anchors are not accepted"),
        (NESTED, "pushed profile:1: nested more than 50 levels deep"),
        (PROFILE.read_text().replace("points:", "points: &p"), "anchors are not accepted"),
    ):
        reply = await line.call("push_profile", {"yaml": text})
        assert error(reply) == "invalid_config" and words in reply["error"]["message"], reply
    assert (await line.call("status"))["result"]["profile"]["version"] == "1.0"


async def test_a_response_topic_outside_the_configured_ones_is_refused(
    station: Station, broker: EmbeddedBroker, recorder: MqttRecorder, reference_plc: ReferencePlc
) -> None:
    # The agent speaks 3.1.1 here; a 5 client's response topic reaches it only over MQTT 5.
    await station.agent.uplink.stop({"state": "offline"}, timeout=1)
    path = Path(station.agent.config.source)
    edit(path, "broker: {", "broker: {protocol: 5, ")
    from edge_agent.agent import Agent
    from edge_agent.config import load_config
    from edge_agent.tag.simulated import SimulatedReader

    agent = Agent(load_config(path), reader=SimulatedReader())
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        assert await agent.uplink.wait_connected(5)
        await asyncio.sleep(0.2)  # subscribed
        for cid, topic in (
            ("elsewhere", "edge/gw-other/cmd/write"),
            ("telemetry", "v1/gateway/telemetry"),
            ("own", "edge/gw-test/reply/mine"),
        ):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = topic
            body = {"correlation_id": cid, "params": {"values": {"tool": 4}}}
            info = client.publish(
                "edge/gw-test/cmd/write", json.dumps(body), qos=1, properties=props
            )
            await asyncio.to_thread(info.wait_for_publish, 5)
        replies = {
            r["correlation_id"]: r for r in await recorder.wait_for("gw-test/reply/write", 3)
        }
        assert error(replies["elsewhere"]) == "not_allowed"
        assert "commands.response_topics" in replies["elsewhere"]["error"]["message"]
        assert error(replies["telemetry"]) == "not_allowed"
        assert replies["own"]["ok"] is True  # the default: the gateway's own reply/#
        await recorder.wait_for("gw-test/reply/mine", 1)
        topics = {t for t, _, _ in recorder.messages}
        assert "edge/gw-other/cmd/write" not in topics and "v1/gateway/telemetry" not in topics
        assert writes(reference_plc) == 1  # only the command answered on its own topic wrote
    finally:
        client.loop_stop()
        client.disconnect()
        stop.set()
        await asyncio.wait_for(task, 20)


# ------------------------------------------------------------------ a flood


async def test_a_full_queue_answers_busy_before_parsing_and_still_answers_each_once(
    station: Station, line: Line, reference_plc: ReferencePlc, recorder: MqttRecorder
) -> None:
    assert (await line.call("status"))["ok"] is True  # c-1: answered, remembered
    reference_plc.done_delay = 0.6
    station.reader.present(station.tag([Step("drill", DRILL, "st-20")]))
    await in_cycle(station)
    await line.send("read", json.dumps({"correlation_id": "r-1", "params": {"points": ["tool"]}}))
    await asyncio.sleep(0.1)  # the worker holds the read until the cycle ends
    topic = "edge/gw-test/cmd/"
    queued = [(f"{topic}status", json.dumps({"correlation_id": f"q-{n}"})) for n in range(20)]
    probes = [
        (f"{topic}status", '{"correlation_id": "early-1"}'),
        (f"{topic}status", '{"correlation_id": "early-2", "unknown_key": 1}'),  # not parsed
        (f"{topic}status", '{"unknown_key": 1, "correlation_id": "late-1"}'),  # id not first
        (f"{topic}status", '{"correlation_id": "c-1"}'),  # a repeat: its answer, not busy
        (f"{topic}nope", '{"correlation_id": "n-1"}'),
    ]
    await asyncio.to_thread(
        paho.mqtt.publish.multiple,
        [{"topic": t, "payload": p, "qos": 1} for t, p in queued + probes],
        hostname=line.broker.host,
        port=line.broker.port,
    )
    replies = await recorder.wait_for("gw-test/reply/status", 1 + 20 + 4)
    by_id = {r["correlation_id"]: r for r in replies}  # c-1: its repeat, answered last
    assert len(by_id) == len(replies) - 1, "a status command was answered twice"
    assert error(by_id["early-1"]) == "busy" and error(by_id["early-2"]) == "busy"
    assert error(by_id["late-1"]) == "malformed"  # the full screen, as with room in the queue
    assert by_id["c-1"].get("repeated") is True and by_id["c-1"]["ok"] is True
    assert all(by_id[f"q-{n}"]["ok"] for n in range(20))
    [unknown] = await recorder.wait_for("gw-test/reply/nope", 1)
    assert error(unknown) == "unknown_command"
    [read] = await recorder.wait_for("gw-test/reply/read", 1)
    assert read["ok"] is True and read["correlation_id"] == "r-1"
    assert (await station.reports.get()).status == "ok"


async def test_a_worker_that_ended_is_started_again_by_the_next_command_into_a_full_queue(
    station: Station, line: Line, reference_plc: ReferencePlc, recorder: MqttRecorder
) -> None:
    reference_plc.done_delay = 0.6
    station.reader.present(station.tag([Step("drill", DRILL, "st-20")]))
    await in_cycle(station)
    await line.send("read", json.dumps({"correlation_id": "r-1", "params": {"points": ["tool"]}}))
    await asyncio.sleep(0.1)  # the worker holds the read until the cycle ends
    await asyncio.to_thread(
        paho.mqtt.publish.multiple,
        [
            ("edge/gw-test/cmd/status", json.dumps({"correlation_id": f"q-{n}"}), 1, False)
            for n in range(20)
        ],
        hostname=line.broker.host,
        port=line.broker.port,
    )
    await asyncio.sleep(0.1)
    worker = station.agent.commands._worker
    assert worker is not None
    worker.cancel()  # the worker ends (a bug, a stray cancel) with the queue full
    await asyncio.sleep(0.05)
    await line.send("status", json.dumps({"correlation_id": "after-1"}))  # refused busy, early
    replies = await recorder.wait_for("gw-test/reply/status", 21)
    by_id = {r["correlation_id"]: r for r in replies}
    assert error(by_id["after-1"]) == "busy"
    assert all(by_id[f"q-{n}"]["ok"] for n in range(20)), "the queued commands were never run"
    assert (await station.reports.get()).status == "ok"


async def test_a_flood_of_commands_neither_starves_cycles_nor_goes_unanswered(
    tmp_path: Path, reference_plc: ReferencePlc
) -> None:
    # mosquitto drops what it queues beyond 1 000 for a slow subscriber; the flooding client
    # counts every reply on a loaded machine, so no cap here.
    broker = EmbeddedBroker()
    broker.extra_config = "max_queued_messages 0\n"
    await broker.start()
    extra = ALL.replace("commands: {", "commands: {queue: 20, ")
    try:
        async with running_station(tmp_path, reference_plc.port, broker.port, extra=extra) as st:
            await flooded_cycles(st, broker, reference_plc)
    finally:
        await broker.stop()
        broker.close()


async def flooded_cycles(
    station: Station, broker: EmbeddedBroker, reference_plc: ReferencePlc
) -> None:
    # The line's client in its own process, as on a plant: ~1 000 commands/s until SIGTERM.
    flood = await asyncio.create_subprocess_exec(
        *(sys.executable, str(REPO / "benchmarks" / "commands.py")),
        *("--flood", str(broker.port), "1000"),
        stdout=asyncio.subprocess.PIPE,
    )
    assert flood.stdout is not None
    try:
        await flood.stdout.readline()  # flooding
        await asyncio.sleep(0.5)
        reference_plc.done_delay = 0.05  # 30 parts take ~2 s without the flood
        t0 = time.monotonic()
        for i in range(30):
            tag = station.tag([Step("drill", DRILL, "st-20")], uid=b"\x04" + i.to_bytes(6, "big"))
            report = await station.cycle(tag, timeout=30)
            assert report.status == "ok", report.error
        took = time.monotonic() - t0
    finally:
        flood.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(flood.communicate(), 60)
    got = json.loads(out.decode().splitlines()[-1])
    # Before: 7 parts in 8 s under 1 000 commands/s. Generous: a busy 2-core machine.
    assert took < 15, f"30 parts took {took:.1f} s under the flood"
    # Every command answered exactly once: run (ok, or busy for a write during a cycle) or
    # refused busy because the queue was full.
    assert got["answered"] == got["sent"] and got["repeated"] == 0, got
    assert set(got["codes"]) == {"ok", "busy"} and got["codes"]["busy"] > 100, got
