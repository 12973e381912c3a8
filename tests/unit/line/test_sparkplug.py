"""Sparkplug B edge node: real mosquitto, the reference PLC, the whole agent.

The host side decodes with Eclipse Tahu's compiled schema and the protobuf runtime only (the
generated ``Payload`` class), never with the agent's own code.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.publish
import pytest
from esio_spb_builder.core.sparkplug_b_pb2 import DataType, Payload

from edge_agent.config import load_config
from edge_agent.instructions.model import Step
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc
from edge_agent.sim.station import running_station as run_agent
from edge_agent.tag.simulated import SimulatedReader
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import DRILL, Station, running_station, write_config

NODE = "spBv1.0/plant/{}/gw-test"
SP = "sparkplug: {enabled: true, group_id: plant}\n"
ALLOW = "commands: {allowed: [status, read, write, pause, resume, reload]}\n"


class Host:
    """A Sparkplug host's view: decoded messages in arrival order, aliases from the last birth."""

    def __init__(self, recorder: MqttRecorder) -> None:
        self.recorder = recorder

    def messages(self, kind: str | None = None) -> list[tuple[str, Any]]:
        found = []
        for topic, payload, _ in list(self.recorder.messages):
            parts = topic.split("/")
            if parts[0] != "spBv1.0" or parts[1] == "STATE":
                continue
            if kind is None or parts[2] == kind:
                found.append((parts[2], Payload.FromString(payload)))
        return found

    async def wait(self, kind: str, count: int = 1, timeout: float = 10) -> list[Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(found := [p for _, p in self.messages(kind)]) < count:
            if loop.time() > deadline:
                raise AssertionError(f"{len(found)} of {count} {kind} after {timeout} s")
            await asyncio.sleep(0.02)
        return found

    def names(self) -> dict[int, str]:
        births = [p for _, p in self.messages("DBIRTH")]
        return {m.alias: m.name for m in births[-1].metrics} if births else {}

    def data(self) -> list[dict[str, Any]]:
        """Every DDATA metric as {name, value, timestamp, historical}, names from the birth."""
        names = self.names()
        out = []
        for _, p in self.messages("DDATA"):
            for m in p.metrics:
                kind = m.WhichOneof("value")
                out.append(
                    {
                        "name": names[m.alias],
                        "value": None if m.is_null else getattr(m, kind) if kind else None,
                        "timestamp": m.timestamp,
                        "historical": m.is_historical,
                        "datatype": m.datatype,
                    }
                )
        return out

    async def wait_metric(self, name: str, timeout: float = 10) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (found := [d for d in self.data() if d["name"] == name]):
            if loop.time() > deadline:
                raise AssertionError(f"no DDATA {name} after {timeout} s")
            await asyncio.sleep(0.02)
        return found


@pytest.fixture
async def spb(broker: EmbeddedBroker) -> AsyncIterator[Host]:
    r = MqttRecorder(broker.host, broker.port, "spBv1.0/#")
    await r.ready()
    yield Host(r)
    r.close()


@pytest.fixture
async def station(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker, spb: Host
) -> AsyncIterator[Station]:
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=SP + ALLOW) as s:
        yield s


def by_name(payload: Any) -> dict[str, Any]:
    return {m.name: m for m in payload.metrics}


def props(metric: Any) -> dict[str, Any]:
    out = {}
    for key, value in zip(metric.properties.keys, metric.properties.values, strict=True):
        out[key] = getattr(value, value.WhichOneof("value"))
    return out


async def command(broker: EmbeddedBroker, topic: str, metrics: list[tuple[Any, int, Any]]) -> None:
    payload = Payload()
    for key, datatype, value in metrics:
        m = payload.metrics.add()
        if isinstance(key, int):
            m.alias = key
        else:
            m.name = key
        m.datatype = datatype
        field = {
            DataType.Boolean: "boolean_value",
            DataType.Double: "double_value",
        }.get(datatype, "int_value")
        setattr(m, field, value)
    await asyncio.to_thread(
        paho.mqtt.publish.single,
        topic,
        payload.SerializeToString(),
        qos=1,
        hostname=broker.host,
        port=broker.port,
    )


def seqs(host: Host) -> list[int]:
    return [p.seq for kind, p in host.messages() if kind != "NDEATH"]


async def test_births_declare_every_metric_and_a_cycle_arrives_with_its_time(
    station: Station, spb: Host
) -> None:
    (nbirth,) = await spb.wait("NBIRTH")
    (dbirth,) = await spb.wait("DBIRTH")
    assert nbirth.seq == 0 and dbirth.seq == 1
    node = by_name(nbirth)
    assert node["bdSeq"].datatype == DataType.UInt64
    assert node["Node Control/Rebirth"].boolean_value is False
    assert "Node Control/Reload" in node
    metrics = by_name(dbirth)
    assert len({m.alias for m in dbirth.metrics}) == len(dbirth.metrics)  # aliases are unique
    # Datatypes follow the profile: a scaled u16 is a Double, a plain u16 a UInt16.
    feed = metrics["Machine/feed_rate"]
    assert feed.datatype == DataType.Double
    assert props(feed) == {"engUnit": "mm/min", "engLow": 0.0, "engHigh": 5000.0, "readOnly": False}
    assert metrics["Machine/tool"].datatype == DataType.UInt16
    assert metrics["Machine/depth"].datatype == DataType.Float
    assert props(metrics["Machine/trigger"])["readOnly"] is True  # the handshake's
    assert metrics["Cycle/Parameters/feed_rate"].datatype == DataType.Double
    assert metrics["Cycle/Results/cycle_count"].datatype == DataType.UInt16
    assert metrics["Profile/Hash"].string_value.startswith("sha256:")

    report = await station.cycle(station.tag([Step("drill", DRILL)]))
    assert report.status == "ok"
    status = (await spb.wait_metric("Cycle/Status"))[-1]
    stamp = int(report.time.timestamp() * 1000)
    assert status["value"] == "ok" and status["timestamp"] == stamp
    assert not status["historical"]
    cycle = {d["name"]: d for d in spb.data() if d["name"].startswith("Cycle/")}
    assert cycle["Cycle/Part ID"]["value"] == "P-1"
    assert cycle["Cycle/Variant"]["value"] == "B-long"
    assert cycle["Cycle/Operation"]["value"] == "drill"
    assert cycle["Cycle/Parameters/feed_rate"]["value"] == pytest.approx(320.5)
    assert cycle["Cycle/Results/actual_tool"]["value"] == 3
    assert cycle["Cycle/Profile/Version"]["value"] == "1.0"
    assert cycle["Cycle/Duration/total ms"]["datatype"] == DataType.Double
    assert cycle["Cycle/Parameters/force"]["value"] is None  # not this operation's
    # Telemetry by exception, under the birth's aliases, with the read's timestamp.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not (tool := [d for d in spb.data() if d["name"] == "Machine/actual_tool"]) or (
        tool[-1]["value"] != 3
    ):
        assert loop.time() < deadline, f"actual_tool never reported 3: {tool}"
        await asyncio.sleep(0.02)
    assert tool[-1]["timestamp"] >= stamp - 5000
    s = seqs(spb)
    assert s == [i % 256 for i in range(len(s))]  # one session: no gap, no repeat


async def test_the_will_is_the_ndeath_with_the_births_bdseq(station: Station, spb: Host) -> None:
    (nbirth,) = await spb.wait("NBIRTH")
    await spb.wait("DBIRTH")
    bd_seq = by_name(nbirth)["bdSeq"].long_value
    # The connection dies without a DISCONNECT: the broker publishes the will.
    sock = station.agent.uplink._client.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)
    (ndeath,) = await spb.wait("NDEATH")
    assert by_name(ndeath)["bdSeq"].long_value == bd_seq
    # Reconnected: a new session, the next bdSeq, seq from 0 again.
    births = await spb.wait("NBIRTH", 2)
    assert by_name(births[1])["bdSeq"].long_value == (bd_seq + 1) % 256
    assert births[1].seq == 0
    await spb.wait("DBIRTH", 2)


async def test_rebirth_on_ncmd_and_seq_wraps(
    station: Station, spb: Host, broker: EmbeddedBroker
) -> None:
    (nbirth,) = await spb.wait("NBIRTH")
    await spb.wait("DBIRTH")
    node = station.agent.sparkplug
    assert node is not None
    for i in range(300):  # telemetry the agent reports, through the node's own path
        node.mirror(
            "telemetry/process",
            {
                "group": "process",
                "time": "2026-01-01T00:00:00+00:00",
                "quality": "good",
                "values": {"cycle_count": i},
            },
        )
    s = seqs(spb)
    await spb.wait("DDATA", 300)
    s = seqs(spb)
    assert s == [i % 256 for i in range(len(s))] and len(s) > 256
    rebirth = by_name(nbirth)["Node Control/Rebirth"].alias
    await command(broker, NODE.format("NCMD"), [(rebirth, DataType.Boolean, True)])
    births = await spb.wait("NBIRTH", 2)
    assert births[1].seq == 0
    assert by_name(births[1])["bdSeq"].long_value == by_name(nbirth)["bdSeq"].long_value
    dbirths = await spb.wait("DBIRTH", 2)
    assert dbirths[1].seq == 1


async def test_dcmd_writes_within_limits_and_is_refused_outside(
    station: Station, spb: Host, broker: EmbeddedBroker, reference_plc: ReferencePlc
) -> None:
    await spb.wait("DBIRTH")
    speed = by_name((await spb.wait("DBIRTH"))[0])["Machine/spindle_speed"].alias
    dcmd = NODE.format("DCMD") + "/st-20"
    await command(broker, dcmd, [(speed, DataType.UInt16, 20000)])  # max 12000
    refused = await spb.wait_metric("Command/Last Result")
    assert "refused" in refused[-1]["value"] and "spindle_speed" in refused[-1]["value"]
    assert reference_plc.snapshot()["holding"][0] != 20000
    await command(broker, dcmd, [("Machine/spindle_speed", DataType.UInt16, 1234)])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while reference_plc.snapshot()["holding"][0] != 1234:
        assert loop.time() < deadline, "the PLC's register was not written"
        await asyncio.sleep(0.02)
    # The handshake's points are never written from outside.
    await command(broker, dcmd, [("Machine/trigger", DataType.Boolean, True)])
    loop_deadline = loop.time() + 10
    while not any("trigger" in str(d["value"]) for d in spb.data()):
        assert loop.time() < loop_deadline
        await asyncio.sleep(0.02)
    assert reference_plc.snapshot()["coil"][0] is False


async def test_pause_as_a_writable_metric(
    station: Station, spb: Host, broker: EmbeddedBroker
) -> None:
    await spb.wait("DBIRTH")
    await command(
        broker, NODE.format("DCMD") + "/st-20", [("Station/Paused", DataType.Boolean, True)]
    )
    paused = await spb.wait_metric("Station/Paused")
    assert paused[-1]["value"] is True and station.agent.paused


async def test_ddeath_while_the_machine_is_away_and_dbirth_when_it_returns(
    station: Station, spb: Host, reference_plc: ReferencePlc
) -> None:
    await spb.wait("DBIRTH")
    reference_plc.set_unreachable()
    await spb.wait("DDEATH", timeout=15)
    reference_plc.set_unreachable(False)
    await spb.wait("DBIRTH", 2, timeout=15)
    kinds = [k for k, _ in spb.messages() if k in ("DBIRTH", "DDEATH")]
    assert kinds == ["DBIRTH", "DDEATH", "DBIRTH"]


async def test_primary_host_offline_holds_cycles_and_replays_them_historical(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker, spb: Host
) -> None:
    state = "spBv1.0/STATE/scada"

    async def host_state(online: bool, ts: int) -> None:
        body = json.dumps({"online": online, "timestamp": ts})
        await asyncio.to_thread(
            paho.mqtt.publish.single,
            state,
            body,
            qos=1,
            retain=True,
            hostname=broker.host,
            port=broker.port,
        )

    await host_state(False, 1)
    extra = "sparkplug: {enabled: true, group_id: plant, primary_host_id: scada}\n" + ALLOW
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=extra) as s:
        report = await s.cycle(s.tag([Step("drill", DRILL)]))
        await asyncio.sleep(0.5)
        assert spb.messages() == []  # nothing born while the host is offline
        await host_state(True, 2)
        await spb.wait("NBIRTH")
        status = await spb.wait_metric("Cycle/Status")
        stamp = int(report.time.timestamp() * 1000)
        assert status[0]["historical"] and status[0]["timestamp"] == stamp
        await host_state(False, 3)
        await asyncio.sleep(0.3)
        second = await s.cycle(s.tag([Step("drill", DRILL)], uid=b"\x04\x99\x22\x33\x44\x55\x66"))
        await asyncio.sleep(0.5)
        assert len([d for d in spb.data() if d["name"] == "Cycle/ID"]) == 1  # held
        await host_state(True, 4)
        await spb.wait("NBIRTH", 2)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while len(ids := [d for d in spb.data() if d["name"] == "Cycle/ID"]) < 2:
            assert loop.time() < deadline
            await asyncio.sleep(0.02)
        assert [d["value"] for d in ids] == [report.id, second.id]
        assert ids[1]["historical"]


async def test_dcmd_is_refused_while_a_cycle_holds_the_machine(
    station: Station, spb: Host, broker: EmbeddedBroker, reference_plc: ReferencePlc
) -> None:
    await spb.wait("DBIRTH")
    dcmd = NODE.format("DCMD") + "/st-20"
    async with station.agent.machine_lock:  # what a station cycle holds for its whole run
        await command(broker, dcmd, [("Machine/tool", DataType.UInt16, 5)])
        refused = await spb.wait_metric("Command/Last Result")
    assert "refused" in refused[-1]["value"] and "cycle" in refused[-1]["value"]
    assert reference_plc.snapshot()["holding"][7] != 5
    # Unknown metrics write nothing and are answered too.
    await command(broker, dcmd, [("Machine/no_such_point", DataType.UInt16, 5)])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not any("no_such_point" in str(d["value"]) for d in spb.data()):
        assert loop.time() < deadline
        await asyncio.sleep(0.02)


async def test_reload_on_ncmd_rebirths_and_json_topics_off_keeps_only_status_and_replies(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker, spb: Host
) -> None:
    extra = "sparkplug: {enabled: true, group_id: plant, json_topics: false}\n" + ALLOW
    json_view = MqttRecorder(broker.host, broker.port, "edge/#")
    await json_view.ready()
    try:
        async with running_station(tmp_path, reference_plc.port, broker.port, extra=extra) as s:
            (nbirth,) = await spb.wait("NBIRTH")
            report = await s.cycle(s.tag([Step("drill", DRILL)]))
            status = await spb.wait_metric("Cycle/Status")
            assert status[-1]["value"] == report.status == "ok"
            reload = by_name(nbirth)["Node Control/Reload"].alias
            await command(broker, NODE.format("NCMD"), [(reload, DataType.Boolean, True)])
            await spb.wait("NBIRTH", 2)
            await spb.wait("DBIRTH", 2)
            assert json_view.json("/status")  # the retained status stays on the JSON topics
        topics = {t for t, _, _ in json_view.messages}
        assert not any(t.endswith(("/cycles", "/events")) or "/telemetry/" in t for t in topics)
    finally:
        json_view.close()


async def test_json_topics_off_keeps_no_held_report_once_the_cycle_is_final(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker, spb: Host
) -> None:
    # The report is held ahead in the JSON outbox even when Sparkplug replaces the JSON topics;
    # kept after its cycle, every one was sent at the next start as it stood when held.
    state = tmp_path / "state"
    extra = "sparkplug: {enabled: true, group_id: plant, json_topics: false}\n"
    extra += f"state_dir: {json.dumps(str(state))}\n"
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=extra) as s:
        await spb.wait("DBIRTH")
        for n in range(3):
            tag = s.tag([Step("drill", DRILL)], uid=bytes([4, 9, 9, 9, 9, 9, n]))
            assert (await s.cycle(tag)).status == "ok"
        await spb.wait_metric("Cycle/Status")
        assert s.agent.uplink.outbox.held() == []
        assert s.agent.sparkplug is not None and len(s.agent.sparkplug.store) == 0


async def test_garbage_commands_are_ignored_and_the_node_answers_on(
    station: Station, spb: Host, broker: EmbeddedBroker
) -> None:
    (nbirth,) = await spb.wait("NBIRTH")
    await spb.wait("DBIRTH")
    for topic in (NODE.format("NCMD"), NODE.format("DCMD") + "/st-20"):
        await asyncio.to_thread(
            paho.mqtt.publish.single,
            topic,
            b"\xff\xff\xff not protobuf",
            qos=1,
            hostname=broker.host,
            port=broker.port,
        )
    rebirth = by_name(nbirth)["Node Control/Rebirth"].alias
    await command(broker, NODE.format("NCMD"), [(rebirth, DataType.Boolean, True)])
    await spb.wait("NBIRTH", 2)
    assert station.agent.sparkplug is not None and station.agent.sparkplug.born


def test_a_value_not_of_its_declared_type_is_sent_null_and_signed_values_round_trip() -> None:
    from edge_agent.line.sparkplug_metrics import get_value, set_value

    payload = Payload()
    wrong = payload.metrics.add()
    set_value(wrong, DataType.UInt16, "not a number")  # must not hold a stored cycle back
    assert wrong.is_null and wrong.WhichOneof("value") is None
    for datatype, value in ((DataType.Int16, -5), (DataType.Int32, -70000), (DataType.Int64, -1)):
        m = Payload().metrics.add()
        set_value(m, datatype, value)
        assert get_value(Payload.Metric.FromString(m.SerializeToString()), datatype) == value


async def test_next_server_with_one_broker_dies_cleanly_and_is_born_again(
    station: Station, spb: Host, broker: EmbeddedBroker
) -> None:
    (nbirth,) = await spb.wait("NBIRTH")
    control = by_name(nbirth)["Node Control/Next Server"]
    assert control.datatype == DataType.Boolean and control.boolean_value is False
    await command(broker, NODE.format("NCMD"), [(control.alias, DataType.Boolean, True)])
    (ndeath,) = await spb.wait("NDEATH")
    births = await spb.wait("NBIRTH", 2)
    bd_seq = by_name(nbirth)["bdSeq"].long_value
    assert by_name(ndeath)["bdSeq"].long_value == bd_seq
    assert by_name(births[1])["bdSeq"].long_value == (bd_seq + 1) % 256
    kinds = [kind for kind, _ in spb.messages()]
    assert kinds.index("NDEATH") < len(kinds) - 1 - kinds[::-1].index("NBIRTH")
    # The command acts once: it is acknowledged before the node leaves, so never redelivered.
    await asyncio.sleep(1)
    assert len(spb.messages("NBIRTH")) == 2 and len(spb.messages("NDEATH")) == 1


async def test_next_server_moves_the_node_to_the_next_broker_of_the_list(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker, spb: Host
) -> None:
    second = EmbeddedBroker()
    await second.start()
    other = Host(MqttRecorder(second.host, second.port, "spBv1.0/#"))
    try:
        await other.recorder.ready()
        path = write_config(tmp_path, reference_plc.port, broker.port, extra=SP + ALLOW)
        uris = f"uris: [mqtt://127.0.0.1:{broker.port}, mqtt://127.0.0.1:{second.port}]"
        path.write_text(path.read_text().replace(f"host: 127.0.0.1, port: {broker.port}", uris))
        async with run_agent(load_config(path), reader=SimulatedReader()):
            (nbirth,) = await spb.wait("NBIRTH")
            await spb.wait("DBIRTH")
            assert other.messages() == []  # the first broker of the list
            alias = by_name(nbirth)["Node Control/Next Server"].alias
            await command(broker, NODE.format("NCMD"), [(alias, DataType.Boolean, True)])
            (born,) = await other.wait("NBIRTH")
            await other.wait("DBIRTH")
            # The first broker saw the node's own NDEATH (a clean disconnect sends no will).
            (ndeath,) = await spb.wait("NDEATH")
            bd_seq = by_name(nbirth)["bdSeq"].long_value
            assert by_name(ndeath)["bdSeq"].long_value == bd_seq
            assert by_name(born)["bdSeq"].long_value == (bd_seq + 1) % 256
            assert [kind for kind, _ in spb.messages()][-1] == "NDEATH"
    finally:
        other.recorder.close()
        await second.stop()
        second.close()
