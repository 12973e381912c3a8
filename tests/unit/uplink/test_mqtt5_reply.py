"""MQTT 5 request/response and the uplink's absolute topics: real mosquitto, the whole agent."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.config_schema import BrokerConfig
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc
from edge_agent.tag.simulated import SimulatedReader
from edge_agent.uplink.mqtt import MqttUplink, response_properties
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import write_config

ALL = "commands: {allowed: [status, read, write], response_topics: ['mes/replies/#']}\n"


class Mes:
    """The line's side over MQTT 5: sends commands with a response topic, keeps what comes back."""

    def __init__(self, broker: EmbeddedBroker, listen: str) -> None:
        self.received: list[tuple[str, bytes, Any]] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(listen, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.client.on_message = lambda c, u, m: self.received.append(
            (m.topic, bytes(m.payload), m.properties)
        )
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    async def ready(self) -> None:
        assert await asyncio.to_thread(self._subscribed.wait, 5)

    async def command(
        self, name: str, body: dict[str, Any], response_topic: str, correlation: bytes | None
    ) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = response_topic
        if correlation is not None:
            props.CorrelationData = correlation
        info = self.client.publish(
            f"edge/gw-test/cmd/{name}", json.dumps(body), qos=1, properties=props
        )
        await asyncio.to_thread(info.wait_for_publish, 5)

    async def wait(self, count: int, timeout: float = 5) -> list[tuple[str, bytes, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.received) < count:
            assert loop.time() < deadline, f"{len(self.received)} of {count} responses"
            await asyncio.sleep(0.01)
        return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
async def agent(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker
) -> AsyncIterator[Agent]:
    path = write_config(tmp_path, reference_plc.port, broker.port, extra=ALL)
    path.write_text(path.read_text().replace("broker: {", "broker: {protocol: 5, "))
    agent = Agent(load_config(path), reader=SimulatedReader())
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        assert await agent.uplink.wait_connected(5)
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


@pytest.fixture
async def mes(broker: EmbeddedBroker) -> AsyncIterator[Mes]:
    m = Mes(broker, "mes/replies/#")
    await m.ready()
    yield m
    m.close()


async def test_a_command_with_a_response_topic_is_answered_there_with_its_correlation_data(
    agent: Agent, mes: Mes, recorder: MqttRecorder
) -> None:
    await mes.command(
        "read",
        {"correlation_id": "c-1", "params": {"points": ["tool"]}},
        "mes/replies/st-20",
        b"\x00\x01binary-corr",
    )
    [(topic, payload, props)] = await mes.wait(1)
    assert topic == "mes/replies/st-20"
    assert props.CorrelationData == b"\x00\x01binary-corr"  # byte for byte, not re-encoded
    reply = json.loads(payload)
    assert reply["ok"] is True and reply["command"] == "read"
    assert reply["correlation_id"] == "c-1" and "tool" in reply["result"]["values"]
    assert "seq" not in reply  # the reply as is: no uplink id/seq on the response topic
    # Besides: reply/<name> stays the record every consumer sees.
    [record] = await recorder.wait_for("gw-test/reply/read", 1)
    assert record["correlation_id"] == "c-1" and record["ok"] is True


async def test_correlation_data_alone_identifies_the_reply(agent: Agent, mes: Mes) -> None:
    await mes.command("status", {"params": {}}, "mes/replies/a", b"mes-77")
    await mes.command("nope", {"params": {}}, "mes/replies/b", b"mes-78")
    received = await mes.wait(2)
    by_corr = {p.CorrelationData: (t, json.loads(b)) for t, b, p in received}
    assert by_corr[b"mes-77"][0] == "mes/replies/a"
    assert by_corr[b"mes-77"][1]["correlation_id"] == "mes-77"
    assert by_corr[b"mes-77"][1]["ok"] is True
    topic, refused = by_corr[b"mes-78"]  # an error reply goes the same way
    assert topic == "mes/replies/b" and refused["error"]["code"] == "unknown_command"


async def test_a_response_topic_without_correlation_data_still_gets_the_reply(
    agent: Agent, mes: Mes
) -> None:
    await mes.command("status", {"correlation_id": 5}, "mes/replies/plain", None)
    [(topic, payload, props)] = await mes.wait(1)
    assert topic == "mes/replies/plain" and json.loads(payload)["correlation_id"] == 5
    assert not hasattr(props, "CorrelationData")


async def test_a_wildcard_response_topic_is_refused_and_the_agent_answers_on(
    agent: Agent, mes: Mes, recorder: MqttRecorder
) -> None:
    # The broker may refuse such a PUBLISH outright; either way the agent must carry on.
    await mes.command("status", {"correlation_id": "w"}, "mes/replies/+", b"w")
    await mes.command("status", {"correlation_id": "ok"}, "mes/replies/fine", b"ok")
    [(topic, _, props)] = await mes.wait(1)
    assert topic == "mes/replies/fine" and props.CorrelationData == b"ok"
    replies = {r["correlation_id"]: r for r in await recorder.wait_for("gw-test/reply/status", 2)}
    assert replies["ok"]["ok"] is True
    assert replies["w"]["error"]["code"] == "not_allowed"  # refused, and nothing was done
    assert agent.uplink.connected


async def test_publish_absolute_goes_through_the_outbox_unchanged(
    broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    # Queued before the uplink ever connected: delivered once it does, payload byte for byte.
    config = BrokerConfig(host=broker.host, port=broker.port, reconnect_min=0.05)
    uplink = MqttUplink(config, "gw-abs", "edge-agent-gw-abs")
    uplink.publish_absolute("v1/gateway/connect", b'{"device":"A"}')
    uplink.publish_absolute("plain/topic", b"\x00raw", properties=response_properties(b"x"))
    assert uplink.backlog == 2
    with pytest.raises(ValueError):
        uplink.publish_absolute("bad/+/topic", b"{}")
    await uplink.start(lambda: {})
    try:
        assert await uplink.flush(5)
        deadline = asyncio.get_running_loop().time() + 5
        while len(got := {t: p for t, p, _ in recorder.messages if not t.startswith("edge/")}) < 2:
            assert asyncio.get_running_loop().time() < deadline, got
            await asyncio.sleep(0.01)
        assert got == {"v1/gateway/connect": b'{"device":"A"}', "plain/topic": b"\x00raw"}
    finally:
        await uplink.stop({"state": "offline"}, timeout=2)
