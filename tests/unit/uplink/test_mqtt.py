"""The MQTT uplink against a real mosquitto: status, last will, delivery across broker outages."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import pytest

from edge_agent.config_schema import BrokerConfig
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.uplink.mqtt import MqttUplink
from tests.fixtures_broker import MqttRecorder


def make_uplink(broker: EmbeddedBroker, **kw: object) -> MqttUplink:
    config = BrokerConfig(
        host=broker.host, port=broker.port, reconnect_min=0.05, reconnect_max=0.2, **kw
    )
    return MqttUplink(config, "gw-test", "edge-agent-gw-test")


async def test_status_online_then_offline_retained(
    broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    uplink = make_uplink(broker)
    await uplink.start(lambda: {"gateway_id": "gw-test"})
    assert await uplink.wait_connected(5)
    [online] = await recorder.wait_for("gw-test/status", 1)
    assert online["state"] == "online"
    await uplink.stop({"state": "offline", "reason": "shutdown"})
    statuses = await recorder.wait_for("gw-test/status", 2)
    assert statuses[-1].items() >= {"state": "offline", "reason": "shutdown"}.items()
    # retained: a late subscriber sees the last state
    late = MqttRecorder(broker.host, broker.port, "edge/gw-test/status")
    await late.ready()
    [(_, _, retained)] = [m for m in (await _wait_messages(late, 1))]
    assert retained
    late.close()


async def _wait_messages(r: MqttRecorder, n: int) -> list[tuple[str, bytes, bool]]:
    for _ in range(200):
        if len(r.messages) >= n:
            return r.messages
        await asyncio.sleep(0.01)
    raise AssertionError("no message")


def _data_segments_out(sock: Any) -> int | None:
    """tcpi_data_segs_out of a TCP socket (Linux 4.6+); None where TCP_INFO does not say."""
    option = getattr(socket, "TCP_INFO", None)
    if option is None:
        return None
    info = sock.getsockopt(socket.IPPROTO_TCP, option, 256)
    return struct.unpack_from("I", info, 156)[0] if len(info) >= 160 else None


async def test_a_burst_of_messages_leaves_whole_in_order_and_in_few_segments(
    broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    # paho sends each packet on its own; under a flood of commands every PUBACK and reply was a
    # segment that woke the broker, on the cores the station needs.
    uplink = make_uplink(broker, inflight=200)
    await uplink.start(lambda: {})
    assert await uplink.wait_connected(5)
    await recorder.wait_for("gw-test/status", 1)
    sock = uplink._client.socket()
    before = _data_segments_out(sock)
    if before is None:
        pytest.skip("this kernel does not count a socket's data segments")
    for n in range(200):
        uplink.publish("events", {"n": n})
    got = await recorder.wait_for("gw-test/events", 200)
    assert [m["n"] for m in got] == list(range(200))
    segments = (_data_segments_out(sock) or 0) - before
    assert segments < 50, f"200 messages took {segments} segments"
    await uplink.stop({"state": "offline"})


async def test_last_will_when_connection_dies(
    broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    uplink = make_uplink(broker, keepalive=5)
    await uplink.start(lambda: {})
    assert await uplink.wait_connected(5)
    # Cut the socket without DISCONNECT: the broker must publish the will.
    sock = uplink._client.socket()
    assert sock is not None
    sock.close()
    statuses = await recorder.wait_for("gw-test/status", 2, timeout=15)
    assert statuses[1]["state"] == "offline"
    await uplink.stop({"state": "offline"}, timeout=0.5)


async def test_reports_queued_while_broker_down_arrive_in_order(tmp_path: object) -> None:
    broker = EmbeddedBroker(persistent=True)  # the recorder's session survives the outage
    await broker.start()
    recorder = MqttRecorder(broker.host, broker.port, "edge/gw-test/cycles", session="recorder")
    await recorder.ready()
    uplink = make_uplink(broker)
    await uplink.start(lambda: {})
    assert await uplink.wait_connected(5)
    for i in range(5):
        uplink.publish("cycles", {"n": i})
    assert await uplink.flush(5)

    await broker.stop()
    for i in range(5, 50):
        uplink.publish("cycles", {"n": i})
    await asyncio.sleep(0.3)
    assert uplink.backlog >= 45  # nothing is dropped while the broker is away

    await broker.start()
    assert await uplink.flush(10)
    await recorder.wait_for("cycles", 50)
    await asyncio.sleep(0.3)  # redeliveries, if any, arrive right behind
    received = recorder.json("cycles")
    # At-least-once: the broker may redeliver what it had not seen acknowledged when it stopped.
    # Each payload carries its id, so a consumer drops those; what remains is complete and ordered.
    unique = list({m["id"]: m for m in received}.values())
    assert [m["n"] for m in unique] == list(range(50))
    assert [m["seq"] for m in unique] == sorted(m["seq"] for m in unique)
    recorder.close()
    await uplink.stop({"state": "offline"})
    await broker.stop()
    broker.close()


async def test_broker_absent_at_start_is_not_fatal(broker: EmbeddedBroker) -> None:
    await broker.stop()
    uplink = make_uplink(broker)
    await uplink.start(lambda: {})
    uplink.publish("cycles", {"n": 1})
    assert not await uplink.wait_connected(0.3)
    await broker.start()
    assert await uplink.wait_connected(5)
    assert await uplink.flush(5)
    await uplink.stop({"state": "offline"})


async def test_subscriptions_survive_reconnect(broker: EmbeddedBroker) -> None:
    uplink = make_uplink(broker)
    got: list[tuple[str, bytes]] = []
    uplink.subscribe("cmd/#", lambda topic, payload, props: got.append((topic, payload)))
    await uplink.start(lambda: {})
    assert await uplink.wait_connected(5)
    sender = MqttRecorder(broker.host, broker.port, "unused")
    await sender.ready()
    sender._client.publish("edge/gw-test/cmd/status", b"1", qos=1).wait_for_publish(5)
    sender.close()
    await broker.kill()
    for _ in range(100):  # wait until the uplink has noticed the loss
        if not uplink.connected:
            break
        await asyncio.sleep(0.02)
    await broker.start()
    assert await uplink.wait_connected(5)
    sender = MqttRecorder(broker.host, broker.port, "unused")
    await sender.ready()
    for _ in range(100):  # the uplink renews its subscription right after CONNACK
        sender._client.publish("edge/gw-test/cmd/pause", b"2", qos=1).wait_for_publish(5)
        await asyncio.sleep(0.05)
        if len(got) >= 2:
            break
    assert got[:2] == [("edge/gw-test/cmd/status", b"1"), ("edge/gw-test/cmd/pause", b"2")]
    sender.close()
    await uplink.stop({"state": "offline"})
