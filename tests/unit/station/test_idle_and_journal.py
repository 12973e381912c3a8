"""`ok` means this part's cycle ran: the machine is shown idle before every trigger.

Against the reference PLC (pymodbus server) and a real mosquitto: a daemon SIGKILLed with the
trigger high, a done stuck high, a trigger left high, a handshake that never resets its trigger,
a reconnect, and the cycle counter that must advance by exactly one.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua

from edge_agent.errors import ConfigError
from edge_agent.instructions.codec import TAG_CAPACITY, decode_tag, encode_tag, update_progress
from edge_agent.instructions.model import Step, StepRecord, StepStatus
from edge_agent.instructions.recipe import Recipe
from edge_agent.instructions.signing import KeyRing, load_private_key
from edge_agent.machine.profile import load_profile
from edge_agent.machine.steps import ResetPoint, WaitFor
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.opcua_machine import NAMESPACE
from edge_agent.sim.reference_plc import ReferencePlc
from edge_agent.station.journal import FILE_NAME, AbortJournal, PendingAbort
from tests.fixtures_broker import MqttRecorder
from tests.fixtures_opcua import OpcUaMachineProcess, machine_yaml, opcua_station
from tests.station_harness import DRILL, PRESS, PROFILE, Station, running_station, write_config
from tests.system.test_daemon_kill import start_daemon, until

TRIGGER, DONE, CYCLES = 0, 1, 10
OTHER = {"spindle_speed": 3100, "feed_rate": 120.0, "depth": 4.5, "tool": 11, "dwell": 40}
FC_WRITE_REGISTERS = 16


def routing(params: dict[str, Any]) -> list[Step]:
    return [Step("drill", DRILL, "st-10"), Step("drill", params, "st-20"), Step("press", PRESS)]


def assert_own_results(report: Any, params: dict[str, Any], cycles: int) -> None:
    """The results are this part's: the PLC echoes the values of the cycle it ran."""
    results = report["results"] if isinstance(report, dict) else report.results
    for name, value in params.items():
        assert results[f"actual_{name}"] == pytest.approx(value), (name, results)
    assert results["cycle_count"] == cycles


@pytest.fixture
async def station(tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker) -> Any:
    # Telemetry off: its reads would interleave with the request sequences checked here.
    extra = f"state_dir: {json.dumps(str(tmp_path / 'state'))}\ntelemetry: {{enabled: false}}\n"
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=extra) as s:
        yield s


# ----------------------------------------------------------------------------- a crash


def tag_file(tmp: Path, uid: bytes, params: dict[str, Any], part: str) -> bytes:
    key = load_private_key(tmp / "mes.key")
    keyring = KeyRing({"mes": key.public_key()})
    steps = routing(params)
    recipe = Recipe.from_steps(
        part_id=part, product="bracket", variant="B-long", order="ORD-1", steps=steps
    )
    message = encode_tag(recipe, uid, key, "mes", TAG_CAPACITY["ntag215"])
    contents = decode_tag(message, uid, keyring)
    done = contents.progress.with_record(0, StepRecord(StepStatus.OK, "st-10", 0), len(steps))
    return update_progress(contents, done)


def present(tags: Path, uid: bytes, message: bytes) -> None:
    part = tags / f"{uid.hex().upper()}.part"  # renamed into place: never half a file
    part.write_bytes(message)
    part.rename(tags / f"{uid.hex().upper()}.ndef")


async def test_daemon_killed_with_trigger_high_never_reports_another_parts_results(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker
) -> None:
    reference_plc.done_delay = 2.0  # a 2 s machine cycle: the kill lands in the middle
    tags, state, log = tmp_path / "tags", tmp_path / "state", tmp_path / "daemon.log"
    config = write_config(
        tmp_path,
        reference_plc.port,
        broker.port,
        reader=f"{{type: simulated, directory: {json.dumps(str(tags))}, poll_interval: 0.05}}",
        extra=f"state_dir: {json.dumps(str(state))}\n",
    )
    tags.mkdir()
    first, second = b"\x04\xaa\x00\x00\x00\x00\x01", b"\x04\xbb\x00\x00\x00\x00\x02"
    recorder = MqttRecorder(broker.host, broker.port, "edge/gw-test/cycles")
    await recorder.ready()
    daemon = start_daemon(config, log)
    try:
        present(tags, first, tag_file(tmp_path, first, DRILL, "P-A"))
        await until(lambda: reference_plc.snapshot()["coil"][TRIGGER], 30, "the trigger")
        daemon.send_signal(signal.SIGKILL)
        await asyncio.to_thread(daemon.wait, 10)
        cycles = reference_plc.snapshot()["input"][CYCLES]
        # The abort was owed when it died, and the journal says so.
        journal = json.loads((state / FILE_NAME).read_text())
        assert journal["pending"] is True and journal["operation"] == "drill"
        # The machine finishes the killed part's cycle on its own: trigger and done both high.
        await until(lambda: reference_plc.snapshot()["coil"][DONE], 5, "the machine's done")
        (tags / f"{first.hex().upper()}.ndef").unlink()  # that part moves on

        reference_plc.done_delay = 0.0
        daemon = start_daemon(config, log)
        present(tags, second, tag_file(tmp_path, second, OTHER, "P-B"))
        # The killed part's write-ahead record goes out at the restart, then P-B's own report.
        reports = await recorder.wait_for("cycles", 2, timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            await asyncio.to_thread(daemon.wait, 20)
        recorder.close()
    killed, report = sorted(reports, key=lambda r: r["part"]["id"])
    assert killed["part"]["id"] == "P-A" and killed["reason"] == "interrupted", killed
    assert killed["results"] == {}  # never the results of another cycle
    assert report["part"]["id"] == "P-B"
    # Never the previous part's results: either its own cycle ran, or it was refused untouched.
    assert report["status"] in ("ok", "rejected"), report
    if report["status"] == "rejected":
        assert report["reason"] == "machine_not_idle"
    else:
        assert_own_results(report, OTHER, cycles + 1)
        assert reference_plc.snapshot()["input"][CYCLES] == cycles + 1
        assert report["machine_state"] == "cycle complete"
    assert json.loads((state / FILE_NAME).read_text())["pending"] is False


# ----------------------------------------------------------------------------- not idle


async def test_done_stuck_high_rejects_the_part_and_leaves_the_machine_untouched(
    station: Station, reference_plc: ReferencePlc
) -> None:
    assert (await station.cycle(station.tag(routing(DRILL), done=1))).status == "ok"
    reference_plc.poke("coil", DONE, [True])  # done high with the trigger low: stuck
    before = reference_plc.snapshot()
    register_writes = reference_plc.requests[FC_WRITE_REGISTERS]
    tag = station.tag(routing(OTHER), uid=b"\x04\x01\x02\x03\x04\x05\x06", done=1)
    message = tag.message

    report = await station.cycle(tag)

    assert report.status == "rejected" and report.reason == "machine_not_idle", report.error
    assert report.machine_state == "not idle"
    error = report.error or ""
    assert "127.0.0.1" in error and "done is already true" in error and "trigger" in error
    # No parameter, no program, no trigger: the machine's memory is as it was, no cycle ran.
    assert reference_plc.snapshot() == before
    assert reference_plc.requests[FC_WRITE_REGISTERS] == register_writes
    assert tag.message == message  # the tag is unchanged too
    assert report.tag_write == "skipped"

    reference_plc.poke("coil", DONE, [False])  # the machine is fixed: the part runs
    retry = await station.cycle(tag)
    assert retry.status == "ok", retry.error
    assert_own_results(retry, OTHER, before["input"][CYCLES] + 1)


async def test_trigger_and_done_left_high_are_aborted_before_the_part_runs(
    station: Station, reference_plc: ReferencePlc
) -> None:
    assert (await station.cycle(station.tag(routing(DRILL), done=1))).status == "ok"
    # Trigger and done both high, the results of an earlier cycle in the input registers.
    reference_plc.poke("coil", TRIGGER, [True, True])
    cycles = reference_plc.snapshot()["input"][CYCLES]

    report = await station.cycle(
        station.tag(routing(OTHER), uid=b"\x04\x08\x08\x08\x08\x08\x08", done=1)
    )
    assert report.status == "ok", report.error
    assert_own_results(report, OTHER, cycles + 1)  # a real rising edge ran this part's cycle


async def test_a_handshake_that_never_resets_its_trigger_gives_no_stale_ok(
    station: Station, reference_plc: ReferencePlc
) -> None:
    # A profile whose handshake stops after reading the results (trigger left high), as if one
    # had got past the validator: no part may be reported ok with another part's results.
    profile = station.agent.cycle.profile
    profile.handshake = [
        s
        for s in profile.handshake
        if not isinstance(s, ResetPoint) and not (isinstance(s, WaitFor) and s.equals is False)
    ]
    assert not any(isinstance(s, ResetPoint) for s in profile.handshake)
    parts = [DRILL, OTHER, {**DRILL, "tool": 5}]
    cycles = reference_plc.snapshot()["input"][CYCLES]
    for n, params in enumerate(parts):
        uid = bytes([4, 0x40, 0, 0, 0, 0, n])
        report = await station.cycle(station.tag(routing(params), uid=uid, done=1))
        assert report.status == "ok", report.error
        assert_own_results(report, params, cycles + n + 1)
        assert reference_plc.snapshot()["coil"][TRIGGER] is True  # left high each time

    # And with no abort steps to reset it, the next part is refused: the machine is not idle.
    profile.on_abort = []
    writes = reference_plc.requests[FC_WRITE_REGISTERS]
    report = await station.cycle(station.tag(routing(OTHER), uid=b"\x04\x41\0\0\0\0\0", done=1))
    assert report.status == "rejected" and report.reason == "machine_not_idle"
    assert "trigger is already true: the cycle starts by setting it" in (report.error or "")
    assert reference_plc.requests[FC_WRITE_REGISTERS] == writes
    assert reference_plc.snapshot()["input"][CYCLES] == cycles + len(parts)


async def test_abort_steps_run_after_a_reconnect_before_the_first_part(
    station: Station, reference_plc: ReferencePlc
) -> None:
    assert (await station.cycle(station.tag(routing(DRILL), done=1))).status == "ok"
    requests: list[tuple[int, int, list[Any] | None]] = []
    reference_plc.on_request = lambda fc, address, count, values: requests.append(
        (fc, address, values)
    )
    sessions = station.agent.driver.sessions
    reference_plc.drop_connections()
    await asyncio.sleep(0.1)

    report = await station.cycle(station.tag(routing(OTHER), uid=b"\x04\x33\0\0\0\0\0", done=1))
    assert report.status == "ok", report.error
    assert station.agent.driver.sessions == sessions + 1
    # The new session's first request resets the trigger (on_abort), then idle is read, and only
    # then do the parameters go out.
    assert requests[0] == (5, TRIGGER, [False])
    first_parameters = next(i for i, r in enumerate(requests) if r[0] == FC_WRITE_REGISTERS)
    assert any(r[0] == 1 for r in requests[1:first_parameters])  # the idle read of the coils


async def test_an_abort_owed_after_an_outage_is_said_in_words_and_completed_first(
    station: Station, reference_plc: ReferencePlc
) -> None:
    reference_plc.done_delay = 5.0  # the machine is working when it goes away
    station.reader.present(station.tag(routing(DRILL), done=1))
    await until(lambda: reference_plc.snapshot()["coil"][TRIGGER], 10, "the trigger")
    await reference_plc.stop()
    report = await asyncio.wait_for(station.reports.get(), 20)
    assert report.status == "failed"
    assert report.machine_state.startswith(
        "abort failed: could not reset trigger: modbus 127.0.0.1"
    )
    assert "ResetPoint" not in report.machine_state  # words, not class names

    # Back on (its memory kept: the trigger is still high): the owed abort runs first, and the
    # next part's own cycle runs.
    reference_plc.done_delay = 0.0
    await reference_plc.start("127.0.0.1", reference_plc.port)
    assert reference_plc.snapshot()["coil"][TRIGGER] is True
    cycles = reference_plc.snapshot()["input"][CYCLES]
    await asyncio.sleep(0.6)  # the driver's reconnect backoff (reconnect_max 0.5 s)
    tag = station.tag(routing(OTHER), uid=b"\x04\x55\0\0\0\0\0", done=1)
    retry = await station.cycle(tag)
    assert retry.status == "ok", retry.error
    assert_own_results(retry, OTHER, cycles + 1)


# ----------------------------------------------------------------------------- cycle counter


async def test_cycle_counter_that_does_not_advance_by_one_fails_the_cycle(
    station: Station, reference_plc: ReferencePlc
) -> None:
    reference_plc.done_delay = 0.5
    tag = station.tag(routing(OTHER), done=1)
    station.reader.present(tag)
    # The machine's counter jumps while its cycle runs (a second cycle counted, or a reset).
    await until(lambda: reference_plc.snapshot()["coil"][TRIGGER], 10, "the trigger")
    before = reference_plc.snapshot()["input"][CYCLES] - 1
    reference_plc.poke("input", CYCLES, [before + 3])
    report = await asyncio.wait_for(station.reports.get(), 10)
    station.reader.remove(tag.uid)

    assert report.status == "failed" and report.reason == "machine_fault", report.error
    assert f"cycle_count went from {before} to {before + 3} (expected {before + 1})" in (
        report.error or ""
    )
    assert report.results == {}
    contents = decode_tag(tag.message, tag.uid, station.keyring)
    assert not contents.progress.done(1)  # recorded FAILED: the step is not done
    assert reference_plc.snapshot()["coil"][TRIGGER] is False


async def test_cycle_counter_is_read_with_the_idle_check_and_the_results(
    station: Station, reference_plc: ReferencePlc
) -> None:
    assert (await station.cycle(station.tag(routing(DRILL), done=1))).status == "ok"
    requests: list[tuple[int, int, int]] = []
    reference_plc.on_request = lambda fc, address, count, values: requests.append(
        (fc, address, count)
    )
    report = await station.cycle(station.tag(routing(OTHER), uid=b"\x04\x44\0\0\0\0\0", done=1))
    assert report.status == "ok", report.error
    reads = [r for r in requests if r[0] in (1, 2, 3, 4)]
    # Idle, before anything is written: the counter (input 10) and trigger + done in one read of
    # coils 0..1. After the trigger: done polled, then the results, the counter among them (no
    # read of its own), then done polled after the reset.
    idle, after = reads[:2], reads[2:]
    assert sorted(idle) == [(1, 0, 2), (4, 10, 1)]
    assert after[0] == after[-1] == (1, 1, 1)
    assert after[1:-1] == [(4, 0, 4), (4, 7, 2), (4, 10, 1)]  # drill's results, as planned


def test_cycle_counter_must_name_an_integer_point(tmp_path: Path) -> None:
    text = PROFILE.read_text()
    for counter, expected in [
        ("cycle_cnt", "no point named 'cycle_cnt' in points (did you mean 'cycle_count'?)"),
        ("actual_depth", "point 'actual_depth' is f32: a cycle counter is an integer"),
        ("actual_feed_rate", "point 'actual_feed_rate' has a scale or offset"),
    ]:
        bad = text.replace("cycle_counter: cycle_count", f"cycle_counter: {counter}")
        with pytest.raises(ConfigError) as err:
            load_profile(tmp_path / "p.yaml", bad)
        [problem] = err.value.problems
        assert problem.path == "cycle_counter" and expected in problem.message
        assert problem.line == bad.splitlines().index(f"cycle_counter: {counter}") + 1
    assert load_profile(PROFILE).cycle_counter == "cycle_count"


# ----------------------------------------------------------------------------- the journal


def test_journal_survives_a_restart_and_an_unreadable_one_counts_as_owed(tmp_path: Path) -> None:
    journal = AbortJournal(tmp_path)
    assert AbortJournal(tmp_path).pending is None  # journal.pending here would narrow it to None
    journal.mark("drill", 1)
    marked = journal.pending
    assert marked is not None
    assert AbortJournal(tmp_path).pending == PendingAbort("drill", 1, marked.since)
    journal.clear()
    assert AbortJournal(tmp_path).pending is None
    (tmp_path / FILE_NAME).write_bytes(b'{"pending": tr\x00\x00')  # torn by a power cut
    assert AbortJournal(tmp_path).pending == PendingAbort(None)
    assert AbortJournal(None).pending is None  # no state_dir: in memory


async def test_an_unreadable_journal_is_completed_before_the_first_part(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / FILE_NAME).write_text("not json")
    reference_plc.poke("coil", TRIGGER, [True, True])  # what the crashed agent left behind
    extra = f"state_dir: {json.dumps(str(state))}\n"
    async with running_station(tmp_path, reference_plc.port, broker.port, extra=extra) as s:
        cycles = reference_plc.snapshot()["input"][CYCLES]
        report = await s.cycle(s.tag(routing(OTHER), done=1))
    assert report.status == "ok", report.error
    assert_own_results(report, OTHER, cycles + 1)
    assert json.loads((state / FILE_NAME).read_text())["pending"] is False


# ----------------------------------------------------------------------------- over OPC UA


async def test_opcua_machine_left_with_trigger_and_done_high_runs_this_parts_cycle(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    machine = OpcUaMachineProcess(tmp_path / "pki", done_delay=1.0)
    machine.start()
    try:
        # What a daemon killed mid-cycle leaves: the previous part's setpoint, trigger high, then
        # the machine's done.
        async with Client(machine.url) as client:
            idx = await client.get_namespace_index(NAMESPACE)

            def node(name: str) -> Any:  # an asyncua Node
                return client.get_node(ua.NodeId(name, idx))

            await node("Double").write_value(ua.Variant(7.0, ua.VariantType.Double))
            await node("Trigger").write_value(ua.Variant(True, ua.VariantType.Boolean))
            await until_async(lambda: node("Done").read_value(), 5, "the machine's done")
            cycles = await node("Cycles").read_value()
        steps = [Step("process", {"setpoint": 1.0, "count": 1}, "st-10")]
        steps.append(Step("process", {"setpoint": 21.5, "count": 4}, "st-20"))
        async with opcua_station(tmp_path, broker.port, machine_yaml(machine.url)) as station:
            report = await station.cycle(station.tag(steps, done=1), timeout=20)
    finally:
        machine.stop()
    assert report.status == "ok", report.error
    # 2 x this part's setpoint, not the 14.0 of the cycle the machine had finished before.
    assert report.results == {"expected_result": 43.0, "result": 43.0, "cycles": cycles + 1}
    assert report.machine_state == "cycle complete"


async def until_async(condition: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
