"""The station cycle end to end: simulated reader -> real pymodbus reference PLC -> real mosquitto."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import cbor2
import ndef
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.instructions.codec import TRAVELER_TYPE, decode_tag
from edge_agent.instructions.model import Step, StepStatus
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.tag.simulated import SimulatedTag
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import DRILL, MILL, PRESS, Station, running_station

Plc = Any  # edge_agent.sim.reference_plc.ReferencePlc


@pytest.fixture
async def station(tmp_path: Path, reference_plc: Plc, broker: EmbeddedBroker) -> Any:
    async with running_station(tmp_path, reference_plc.port, broker.port) as s:
        yield s


def routing(mine: Step) -> list[Step]:
    return [Step("drill", DRILL, "st-10"), mine, Step("press", PRESS, "st-30")]


@pytest.mark.parametrize(
    ("operation", "params"),
    [("drill", DRILL), ("mill", MILL), ("press", PRESS)],
    ids=["drill", "mill", "press"],
)
async def test_happy_path_programs_machine_and_reports(
    station: Station,
    reference_plc: Plc,
    recorder: MqttRecorder,
    operation: str,
    params: dict[str, Any],
) -> None:
    tag = station.tag(routing(Step(operation, params, "st-20")), done=1)
    cycles_before = reference_plc.snapshot()["input"][10]

    report = await station.cycle(tag)

    assert report.status == "ok", report.error
    assert report.step == {"index": 1, "count": 3, "operation": operation}
    assert report.machine_state == "cycle complete"
    # The PLC copies holding 0..9 to input 0..9 on the trigger's rising edge: the results read back
    # are what the agent wrote, decoded through the profile again.
    for name, value in params.items():
        echo = report.results[f"actual_{name}"]
        assert echo == pytest.approx(value, rel=1e-6), name
    assert report.results["cycle_count"] == cycles_before + 1
    snap = reference_plc.snapshot()
    assert snap["coil"][0] is False and snap["coil"][1] is False  # trigger reset, done cleared
    # Raw register words are reported as written.
    raw = {p["name"]: p["raw"] for p in report.parameters}
    assert set(raw) == set(params)
    # Progress is on the tag: step 2 done by this station, read back through the codec.
    contents = decode_tag(tag.message, tag.uid, station.keyring)
    assert contents.progress.done(0) and contents.progress.done(1) and not contents.progress.done(2)
    record = contents.progress.records[1]
    assert record is not None and record.station == "st-20" and record.status is StepStatus.OK
    assert report.tag_write == "ok"
    # And the report went upstream, exactly as produced.
    [sent] = await recorder.wait_for("gw-test/cycles", 1)
    assert sent.pop("seq") >= 1  # the uplink's per-gateway sequence number
    assert sent == report.as_message()
    assert sent["profile"]["hash"].startswith("sha256:")
    assert sent["key_id"] == "mes" and sent["tag_uid"] == tag.uid.hex().upper()


async def test_tag_left_on_reader_runs_once(station: Station, reference_plc: Plc) -> None:
    tag = station.tag(routing(Step("drill", DRILL, "st-20")), done=1)
    station.reader.present(tag)
    report = await asyncio.wait_for(station.reports.get(), 10)
    assert report.status == "ok"
    station.reader.present(tag)  # still lying there: the reader gives no new event
    await asyncio.sleep(0.3)
    assert station.reports.empty()
    assert reference_plc.snapshot()["input"][10] == 1
    # Taken away and put back: recognised, but its step here is done -> nothing runs.
    station.reader.remove(tag.uid)
    again = await station.cycle(tag)
    assert again.status == "rejected" and again.reason == "wrong_station"
    assert reference_plc.snapshot()["input"][10] == 1


def _records(message: bytes) -> list[ndef.Record]:
    return list(ndef.message_decoder(message, known_types={}))


def _with_traveler_payload(message: bytes, payload: bytes) -> bytes:
    records = _records(message)
    records[0] = ndef.Record(TRAVELER_TYPE, "", payload)
    return b"".join(ndef.message_encoder(records))


def _tamper_body(message: bytes) -> bytes:
    version, key_id, body, sig = cbor2.loads(_records(message)[0].data)
    fields = cbor2.loads(body)
    # Raise the first numeric parameter of the step for this station: a forged, larger value.
    step = fields[7][1]
    first = next(iter(step[1]))
    step[1][first] = step[1][first] + 1
    return _with_traveler_payload(
        message, cbor2.dumps([version, key_id, cbor2.dumps(fields, canonical=True), sig])
    )


def _rejection_cases(station: Station) -> dict[str, tuple[bytes, bytes]]:
    uid = b"\x04\xaa\xbb\xcc\xdd\xee\x01"
    good = station.tag(routing(Step("drill", DRILL, "st-20")), uid=uid, done=1).message
    _version, key_id, body, sig = cbor2.loads(_records(good)[0].data)
    forged = station.tag(
        routing(Step("drill", DRILL, "st-20")), uid=uid, key=Ed25519PrivateKey.generate()
    )
    other_uid = b"\x04\xaa\xbb\xcc\xdd\xee\x02"
    return {
        "malformed_ndef": (uid, b"\xd1\x01\xff\x55garbage"),
        "malformed_traveler": (uid, _with_traveler_payload(good, _records(good)[0].data[:-20])),
        "bad_signature": (uid, forged.message),
        "uid_mismatch": (other_uid, good),  # a genuine payload copied onto another tag
        "tampered": (uid, _tamper_body(good)),
        "unknown_version": (uid, _with_traveler_payload(good, cbor2.dumps([2, key_id, body, sig]))),
        "out_of_limits": (
            uid,
            station.tag(
                routing(Step("drill", {**DRILL, "depth": 95.0}, "st-20")), uid=uid, done=1
            ).message,
        ),
        "unknown_operation": (
            uid,
            station.tag(routing(Step("weld", {"current": 120}, "st-20")), uid=uid, done=1).message,
        ),
        "out_of_sequence": (
            uid,
            station.tag(routing(Step("drill", DRILL, "st-20")), uid=uid, done=0).message,
        ),
        "wrong_station": (
            uid,
            station.tag(routing(Step("drill", DRILL, "st-99")), uid=uid, done=1).message,
        ),
    }


EXPECTED_REASON = {"tampered": "bad_signature"}
WRITE_FUNCTIONS = (5, 6, 15, 16)  # write coil(s), write register(s)


def _write_requests(plc: Plc) -> int:
    return sum(plc.requests[fc] for fc in WRITE_FUNCTIONS)


async def test_every_rejection_leaves_the_machine_untouched(
    station: Station, reference_plc: Plc, recorder: MqttRecorder
) -> None:
    cases = _rejection_cases(station)
    before = reference_plc.snapshot()
    writes_before = _write_requests(reference_plc)
    for name, (uid, message) in cases.items():
        report = await station.cycle(SimulatedTag(uid, message))
        assert report.status == "rejected", (name, report.status, report.error)
        assert report.reason == EXPECTED_REASON.get(name, name), (name, report.error)
        assert uid.hex().upper() in (report.error or ""), (
            name,
            report.error,
        )  # messages name the tag
        assert report.machine_state == "untouched"
        assert report.tag_write == "skipped"
    assert reference_plc.snapshot() == before
    assert (
        _write_requests(reference_plc) == writes_before
    )  # not a single write request reached the PLC
    reports = await recorder.wait_for("gw-test/cycles", len(cases))
    assert [r["reason"] for r in reports] == [EXPECTED_REASON.get(n, n) for n in cases]


async def test_limit_rejection_names_every_violation(station: Station) -> None:
    bad = {**DRILL, "depth": 95.0, "spindle_speed": 20000}
    report = await station.cycle(station.tag(routing(Step("drill", bad, "st-20")), done=1))
    assert report.reason == "out_of_limits"
    assert "depth=95.0 mm" in (report.error or "") and "spindle_speed=20000" in (report.error or "")


async def test_plc_stops_answering_mid_cycle(station: Station, reference_plc: Plc) -> None:
    reference_plc.done_delay = 5.0  # the machine is "working" when the connection goes
    tag = station.tag(routing(Step("drill", DRILL, "st-20")), done=1)
    station.reader.present(tag)
    await asyncio.sleep(0.3)
    await reference_plc.stop()
    report = await asyncio.wait_for(station.reports.get(), 15)
    assert report.status == "failed"
    assert report.reason in ("machine_error", "machine_fault")
    assert "127.0.0.1" in (report.error or "")  # names the device
    # The failure is recorded on the tag; the step stays undone so the part can be redone.
    contents = decode_tag(tag.message, tag.uid, station.keyring)
    assert (
        contents.progress.records[1] is not None
        and contents.progress.records[1].status is StepStatus.FAILED
    )
    assert not contents.progress.done(1)
    station.reader.remove(tag.uid)

    # The PLC comes back: the agent reconnects and the part's step is redone.
    reference_plc.done_delay = 0.0
    await reference_plc.start("127.0.0.1", reference_plc.port)
    await asyncio.sleep(0.6)
    retry = await station.cycle(tag)
    assert retry.status == "ok", retry.error


async def test_done_never_comes_resets_trigger(station: Station, reference_plc: Plc) -> None:
    reference_plc.done_delay = 60.0  # done never comes within the profile's 5 s wait
    report = await station.cycle(
        station.tag(routing(Step("drill", DRILL, "st-20")), done=1), timeout=15
    )
    assert report.status == "failed" and report.reason == "machine_fault"
    assert report.machine_state == "aborted (trigger reset)"
    assert reference_plc.snapshot()["coil"][0] is False


async def test_broker_down_reports_delivered_exactly_as_produced(
    tmp_path: Path, reference_plc: Plc
) -> None:
    broker = EmbeddedBroker(
        persistent=True
    )  # the counting subscriber's session survives the outage
    await broker.start()
    recorder = MqttRecorder(broker.host, broker.port, "edge/gw-test/cycles", session="line-mes")
    await recorder.ready()
    try:
        async with running_station(tmp_path, reference_plc.port, broker.port) as station:
            await broker.stop()
            produced = []
            for i in range(6):
                uid = bytes([4, 1, 2, 3, 4, 5, i])
                tag = station.tag(routing(Step("drill", DRILL, "st-20")), uid=uid, done=1)
                produced.append(await station.cycle(tag))
            assert all(r.status == "ok" for r in produced)
            assert station.agent.uplink.backlog >= 6
            await broker.start()
            assert await station.agent.uplink.flush(10)
            await recorder.wait_for("gw-test/cycles", 6)
        # Duplicates are allowed only as redeliveries with the same id; the rest is exact.
        received = list({r["id"]: r for r in recorder.json("gw-test/cycles")}.values())
        assert [{k: v for k, v in r.items() if k != "seq"} for r in received] == [
            r.as_message() for r in produced
        ]
    finally:
        recorder.close()
        await broker.stop()
        broker.close()


async def test_durations_are_rounded_to_three_decimals_in_every_phase(
    station: Station, recorder: MqttRecorder
) -> None:
    # The parameter write is two requests here (parameters, program): their sum was reported as
    # e.g. 0.5790000000000001 while every other phase had 3 decimals.
    for n in range(12):
        tag = station.tag(
            routing(Step("drill", DRILL, "st-20")), done=1, uid=bytes([4, n, 2, 3, 4, 5, 6])
        )
        report = await station.cycle(tag)
        assert report.status == "ok", report.error
    reports = await recorder.wait_for("gw-test/cycles", 12)
    for message in reports:
        durations = message["durations_ms"]
        assert {"total", "tag_read", "verify", "machine_write", "machine_cycle"} <= set(durations)
        for phase, ms in durations.items():
            assert ms == round(ms, 3), (phase, ms)
