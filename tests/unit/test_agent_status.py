"""The retained status keeps the line told: refreshed periodically, and at once as a backlog grows."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from edge_agent.config_schema import BrokerConfig
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.uplink.mqtt import MqttUplink
from tests.fixtures_broker import MqttRecorder


def uplink_for(broker: EmbeddedBroker, status_interval: float) -> MqttUplink:
    config = BrokerConfig(
        host=broker.host,
        port=broker.port,
        reconnect_min=0.05,
        reconnect_max=0.2,
        status_interval=status_interval,
    )
    return MqttUplink(config, "gw-s", "edge-agent-gw-s")


def online(recorder: MqttRecorder) -> list[dict[str, Any]]:
    return [m for m in recorder.json("gw-s/status") if m["state"] == "online"]


async def until(condition: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_status_is_refreshed_every_interval_and_stays_retained(
    broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    uplink = uplink_for(broker, status_interval=0.2)
    await uplink.start(lambda: {"station": "st-20"})
    assert await uplink.wait_connected(5)
    await until(lambda: len(online(recorder)) >= 4, 5, "three refreshes after the connect")
    assert all(m["backlog"] == 0 and "oldest_age_s" in m for m in online(recorder))
    assert all(m["station"] == "st-20" for m in online(recorder))

    late = MqttRecorder(broker.host, broker.port, "edge/gw-s/status")  # the line, joining later
    await late.ready()
    await until(lambda: bool(late.messages), 5, "the retained status")
    _, payload, retained = late.messages[0]
    assert retained and b'"backlog":0' in payload
    late.close()
    await uplink.stop({"state": "offline"})


async def test_a_growing_backlog_refreshes_the_status_at_once(
    broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    uplink = uplink_for(broker, status_interval=600)  # the periodic refresh cannot be the reason
    await uplink.start(lambda: {})
    assert await uplink.wait_connected(5)
    await until(lambda: len(online(recorder)) == 1, 5, "the status of the connect")
    with structlog.testing.capture_logs() as logs:
        for n in range(150):  # faster than the broker takes them: a backlog of 150 builds up
            uplink.publish("cycles", {"n": n})
        await until(lambda: len(online(recorder)) >= 2, 5, "a status for the backlog")
        assert await uplink.flush(10)
    assert online(recorder)[1]["backlog"] >= 100
    growing = [e for e in logs if e["event"] == "outbox backlog growing"]
    assert len(growing) == 1 and growing[0]["backlog"] >= 100  # one line per tenfold growth
    # Drained: the status says so, and the thresholds count again from zero.
    await until(lambda: online(recorder)[-1]["backlog"] == 0, 5, "the drained status")
    for n in range(20):
        uplink.publish("cycles", {"n": n})
    await until(lambda: any(m["backlog"] >= 10 for m in online(recorder)[2:]), 5, "again")
    await uplink.stop({"state": "offline"})


async def test_backlog_growth_during_an_outage_is_logged(broker: EmbeddedBroker) -> None:
    uplink = uplink_for(broker, status_interval=0.2)
    await uplink.start(lambda: {})
    assert await uplink.wait_connected(5)
    await broker.stop()
    await until(lambda: not uplink.connected, 5, "the link to drop")
    with structlog.testing.capture_logs() as logs:
        for n in range(120):
            uplink.publish("cycles", {"n": n})
            if n in (9, 99):
                await asyncio.sleep(0.05)  # the sender looks at the backlog as it grows
        await asyncio.sleep(0.5)  # several status intervals: nothing to publish to, no error
    growing = [e["backlog"] for e in logs if e["event"] == "outbox backlog growing"]
    assert growing == [10, 100]
    assert all(not t.done() for t in uplink._tasks)
    await broker.start()
    assert await uplink.flush(10)
    await uplink.stop({"state": "offline"})
