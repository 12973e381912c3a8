"""The Modbus driver against the reference PLC: a real pymodbus server on loopback, no mocks."""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from edge_agent.errors import ConfigError, MachineError, MachineFault
from edge_agent.machine import modbus
from edge_agent.machine.modbus import ModbusDriver, ModbusSettings, create
from edge_agent.machine.profile import Profile, load_profile
from edge_agent.sim.reference_plc import ReferencePlc
from tests import REPO_ROOT

PROFILE = REPO_ROOT / "firmware_profiles" / "reference-plc.yaml"

FC_READ_COILS, FC_READ_HOLDING, FC_READ_INPUT = 1, 3, 4
FC_WRITE_COIL, FC_WRITE_COILS, FC_WRITE_REGISTERS = 5, 15, 16

PARAMETERS: dict[str, Any] = {
    "spindle_speed": 1500,
    "feed_rate": 320.5,
    "depth": 12.5,
    "coolant_temp": 18.5,
    "force": 150000,
    "tool": 3,
    "dwell": 200,
    "program": 1,
}


@pytest.fixture(scope="module")
def profile() -> Profile:
    return load_profile(PROFILE)


def make_driver(plc: ReferencePlc, profile: Profile, **settings: Any) -> ModbusDriver:
    options: dict[str, Any] = {"timeout": 0.5, "retries": 0, "reconnect_min": 0.05}
    options.update(settings)
    return create(ModbusSettings(host=plc.host, port=plc.port, **options), profile)


@pytest_asyncio.fixture
async def driver(reference_plc: ReferencePlc, profile: Profile) -> AsyncIterator[ModbusDriver]:
    d = make_driver(reference_plc, profile)
    await d.connect()
    reference_plc.requests.clear()
    yield d
    await d.close()


def tiny_profile(tmp_path: Path, points: str) -> Profile:
    """A profile with the given extra points (YAML lines indented by two spaces)."""
    text = (
        'profile: tiny\nversion: "1"\ndriver: modbus\npoints:\n'
        f"{points}"
        "  trigger: {table: coil, address: 0, type: bool}\n"
        "  done: {table: coil, address: 1, type: bool, read_only: true}\n"
        "operations:\n  op: {}\n"
        "handshake:\n  - set: trigger\n  - wait: done\n  - reset: trigger\n"
        "on_abort:\n  - reset: trigger\n"
    )
    return load_profile(tmp_path / "tiny.yaml", text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- connection ---------------------------------------------------------------------------------


async def test_device_names_host_port_and_unit(
    reference_plc: ReferencePlc, profile: Profile
) -> None:
    d = make_driver(reference_plc, profile, unit_id=7)
    assert d.device == f"modbus 127.0.0.1:{reference_plc.port} unit 7"
    assert not d.connected
    await d.connect()
    assert d.connected
    assert await d.read(["cycle_count"]) == {"cycle_count": 0}  # any unit id answers
    await d.close()
    assert not d.connected
    await d.close()  # twice is fine


async def test_connect_refused_names_host_and_port_then_backs_off(profile: Profile) -> None:
    port = free_port()  # nothing listens there any more
    # Backoffs long enough that a loaded machine's scheduling delays stay well inside them.
    settings = ModbusSettings(host="127.0.0.1", port=port, reconnect_min=0.2, reconnect_max=0.6)
    d = create(settings, profile)
    with pytest.raises(MachineError) as err:
        await d.connect()
    assert str(err.value) == (
        f"modbus 127.0.0.1:{port} unit 1: cannot connect to 127.0.0.1:{port}: Connection refused"
    )

    # In backoff: fail fast, without knocking (the message says so; an attempt would say
    # "cannot connect").
    with pytest.raises(MachineError, match=r"unreachable, next attempt in 0\.\d\d s") as err:
        await d.read(["tool"])
    assert err.value.device == d.device
    assert str(err.value).endswith(
        f"(last error: cannot connect to 127.0.0.1:{port}: Connection refused)"
    )

    # The wait doubles with each failed attempt and stops at reconnect_max (jitter: 0.8..1.2).
    waits = []
    for _ in range(4):
        await asyncio.sleep(0.75)  # past any backoff: this is a real attempt
        with pytest.raises(MachineError, match="cannot connect"):
            await d.connect()
        with pytest.raises(MachineError) as err:
            await d.connect()
        match = re.search(r"next attempt in ([\d.]+) s", str(err.value))
        assert match is not None
        waits.append(float(match.group(1)))
    assert 0.25 < waits[0] <= 0.5  # second failure: 0.4 +- 20 %, less the time since
    assert waits[1:] == [pytest.approx(0.6, abs=0.1)] * 3
    await d.close()


async def test_reconnects_after_plc_restart(reference_plc: ReferencePlc, profile: Profile) -> None:
    d = make_driver(reference_plc, profile)
    await d.write({"tool": d.encode("tool", 5)})
    await reference_plc.restart()  # drops our connection; memory is retentive
    assert (await d.read(["tool"])) == {"tool": 5}
    assert d.connected
    await d.close()


async def test_plc_down_then_back(reference_plc: ReferencePlc, profile: Profile) -> None:
    d = make_driver(reference_plc, profile, reconnect_min=0.1)
    await d.connect()
    await reference_plc.stop()
    with pytest.raises(MachineError):  # "connection lost" or, once noticed, "cannot connect"
        await d.read(["tool"])
    with pytest.raises(MachineError, match=r"cannot connect to|unreachable"):
        await d.read(["tool"])
    await reference_plc.start(reference_plc.host, reference_plc.port)
    with pytest.raises(MachineError, match="unreachable, next attempt in"):
        await d.read(["tool"])  # still in backoff: no request
    assert reference_plc.requests == {}
    await asyncio.sleep(0.13)
    assert await d.read(["tool"]) == {"tool": 0}
    await d.close()


# -- writing and reading ------------------------------------------------------------------------


async def test_write_all_parameters_is_one_request_and_round_trips(
    driver: ModbusDriver, reference_plc: ReferencePlc
) -> None:
    encoded = {name: driver.encode(name, value) for name, value in PARAMETERS.items()}
    await driver.write(encoded)
    assert reference_plc.requests == {FC_WRITE_REGISTERS: 1}

    holding = reference_plc.snapshot()["holding"]
    assert holding[0] == 1500
    assert holding[1] == 3205  # 320.5 mm/min at scale 0.1
    assert holding[2:4] == [0x4148, 0x0000]  # 12.5 as f32, high word first
    assert holding[4] == 185
    assert holding[5:7] == [0x0002, 0x49F0]  # 150000
    assert holding[7:10] == [3, 200, 1]

    reference_plc.requests.clear()
    assert await driver.read(list(PARAMETERS)) == PARAMETERS
    assert reference_plc.requests == {FC_READ_HOLDING: 1}


async def test_write_only_touches_the_points_given(
    driver: ModbusDriver, reference_plc: ReferencePlc
) -> None:
    reference_plc.poke("holding", 0, [11, 12, 13, 14, 15, 16, 17, 18, 19, 20])
    await driver.write({"depth": driver.encode("depth", 1.0), "tool": driver.encode("tool", 9)})
    # Not contiguous: two requests, and registers 0, 1, 4..6, 8, 9 keep their values.
    assert reference_plc.requests == {FC_WRITE_REGISTERS: 2}
    assert reference_plc.snapshot()["holding"] == [11, 12, 0x3F80, 0, 15, 16, 17, 9, 19, 20]


async def test_read_results_merges_contiguous_points(
    driver: ModbusDriver, reference_plc: ReferencePlc, profile: Profile
) -> None:
    results = profile.operations["mill"].results
    reference_plc.poke("input", 0, [8000, 12000, 0x4010, 0, 0xFF9C, 0, 0, 7, 0, 2, 41])
    values = await driver.read(results)
    assert values == {
        "actual_spindle_speed": 8000,
        "actual_feed_rate": 1200.0,
        "actual_depth": 2.25,
        "actual_tool": 7,
        "actual_coolant_temp": -10.0,
        "cycle_count": 41,
    }
    assert list(values) == results  # in the order asked
    # input 0..4 (five points), 7, 10: three requests without gap bridging, one with it
    assert reference_plc.requests == {FC_READ_INPUT: 3}
    bridging = make_driver(reference_plc, profile, max_gap=2)
    reference_plc.requests.clear()
    assert await bridging.read(results) == values
    assert reference_plc.requests == {FC_READ_INPUT: 1}
    await bridging.close()


async def test_requests_are_planned_once_per_point_set_within_a_bound(
    driver: ModbusDriver, reference_plc: ReferencePlc, profile: Profile
) -> None:
    # A `read` command may name any points in any order: the plans kept must not grow with them.
    reference_plc.poke("holding", 0, [1000])
    reference_plc.poke("holding", 7, [4])
    assert await driver.read(["tool", "spindle_speed", "tool"]) == {
        "tool": 4,
        "spindle_speed": 1000,
    }
    assert list(await driver.read(["tool", "spindle_speed", "tool"])) == ["tool", "spindle_speed"]
    names = [
        n for n, p in profile.points.items() if getattr(p, "table", "") in ("holding", "input")
    ]
    sets = list(itertools.permutations(names, 2))[: modbus._MAX_PLANS + 50]
    for pair in sets:
        assert list(await driver.read(pair)) == list(pair)
    assert len(driver._plans) <= modbus._MAX_PLANS


async def test_max_gap_bridges_unused_registers(
    reference_plc: ReferencePlc, profile: Profile
) -> None:
    points = ["spindle_speed", "tool"]  # holding 0 and 7
    strict = make_driver(reference_plc, profile)
    bridging = make_driver(reference_plc, profile, max_gap=6)
    reference_plc.poke("holding", 0, [1000])
    reference_plc.poke("holding", 7, [4])
    for d, requests in ((strict, 2), (bridging, 1)):
        await d.connect()
        reference_plc.requests.clear()
        assert await d.read(points) == {"spindle_speed": 1000, "tool": 4}
        assert reference_plc.requests == {FC_READ_HOLDING: requests}
        await d.close()


async def test_coils_single_and_multiple(tmp_path: Path, reference_plc: ReferencePlc) -> None:
    profile = tiny_profile(
        tmp_path,
        "  a: {table: coil, address: 2, type: bool}\n"
        "  b: {table: coil, address: 3, type: bool}\n"
        "  c: {table: coil, address: 4, type: bool}\n"
        "  ready: {table: discrete, address: 0, type: bool}\n",
    )
    d = make_driver(reference_plc, profile)
    await d.connect()
    reference_plc.requests.clear()
    await d.write({n: d.encode(n, True) for n in "abc"})
    assert reference_plc.requests == {FC_WRITE_COILS: 1}
    await d.write({"b": d.encode("b", False)})
    assert reference_plc.requests == {FC_WRITE_COILS: 1, FC_WRITE_COIL: 1}
    assert reference_plc.snapshot()["coil"][:5] == [False, False, True, False, True]
    reference_plc.requests.clear()
    assert await d.read(["a", "b", "c"]) == {"a": True, "b": False, "c": True}
    assert reference_plc.requests == {FC_READ_COILS: 1}
    assert await d.read(["ready"]) == {"ready": True}
    await d.close()


async def test_string_and_little_word_order_round_trip(
    tmp_path: Path, reference_plc: ReferencePlc
) -> None:
    profile = tiny_profile(
        tmp_path,
        "  label: {table: holding, address: 0, type: string, length: 6}\n"
        "  total: {table: holding, address: 3, type: u32, word_order: little}\n"
        "  level: {table: holding, address: 5, type: f64, word_order: little, byte_order: little}\n",
    )
    d = make_driver(reference_plc, profile)
    values = {"label": "AB-12", "total": 0x12345678, "level": -0.1}
    await d.write({n: d.encode(n, v) for n, v in values.items()})
    holding = reference_plc.snapshot()["holding"]
    assert holding[0:3] == [0x4142, 0x2D31, 0x3200]
    assert holding[3:5] == [0x5678, 0x1234]
    assert holding[5:9] == [0x9A99, 0x9999, 0x9999, 0xB9BF]
    assert await d.read(list(values)) == values
    await d.close()


# -- the reference PLC's machine cycle, driven through the driver ------------------------------


async def test_handshake_cycle(driver: ModbusDriver, reference_plc: ReferencePlc) -> None:
    drill = {k: PARAMETERS[k] for k in ("spindle_speed", "feed_rate", "depth", "tool", "dwell")}
    await driver.write({k: driver.encode(k, v) for k, v in drill.items()})
    await driver.write({"program": driver.encode("program", 1)})
    assert await driver.read(["done", "cycle_count"]) == {"done": False, "cycle_count": 0}
    assert reference_plc.snapshot()["input"] == [0] * 11  # nothing copied before the trigger

    await driver.write({"trigger": driver.encode("trigger", True)})
    await driver.wait_until("done", True, 1.0)
    results = await driver.read([f"actual_{k}" for k in drill] + ["actual_program", "cycle_count"])
    assert results == {f"actual_{k}": v for k, v in drill.items()} | {
        "actual_program": 1,
        "cycle_count": 1,
    }
    await driver.write({"trigger": driver.encode("trigger", False)})
    await driver.wait_until("done", False, 1.0)

    # Holding the trigger (no new rising edge) does not start another cycle; a new edge does.
    await driver.write({"trigger": driver.encode("trigger", False)})
    assert await driver.read(["cycle_count"]) == {"cycle_count": 1}
    await driver.write({"trigger": driver.encode("trigger", True)})
    await driver.write({"trigger": driver.encode("trigger", True)})
    assert await driver.read(["cycle_count", "done"]) == {"cycle_count": 2, "done": True}
    assert reference_plc.requests[FC_WRITE_COIL] == 5


async def test_done_belongs_to_the_plc(driver: ModbusDriver, reference_plc: ReferencePlc) -> None:
    with pytest.raises(ValueError, match="done: coil 1 is read-only"):
        await driver.write({"done": True})
    assert reference_plc.requests == {}
    # Even a client that ignores the profile cannot set it.
    assert driver._client is not None
    await driver._client.write_coils(0, [False, True])
    assert reference_plc.snapshot()["coil"][:2] == [False, False]


async def test_done_delay_and_wait_polls(driver: ModbusDriver, reference_plc: ReferencePlc) -> None:
    reference_plc.done_delay = 0.1
    await driver.write({"trigger": True})
    t0 = time.perf_counter()
    await driver.wait_until("done", True, 2.0)
    elapsed = time.perf_counter() - t0
    assert 0.09 <= elapsed < 1.5  # when done came, well before the 2 s timeout
    assert reference_plc.requests[FC_READ_COILS] > 3  # it polled


async def test_wait_times_out_with_machine_fault(
    driver: ModbusDriver, reference_plc: ReferencePlc
) -> None:
    t0 = time.perf_counter()
    with pytest.raises(MachineFault) as err:
        await driver.wait_until("done", True, 0.2)
    assert 0.2 <= time.perf_counter() - t0 < 2.0  # gave up at its timeout, did not hang
    assert str(err.value) == (
        f"{driver.device}: done did not become true within 0.2 s (last value false)"
    )
    assert err.value.device == driver.device


async def test_wait_reads_immediately(driver: ModbusDriver, reference_plc: ReferencePlc) -> None:
    await driver.write({"trigger": True})
    reference_plc.requests.clear()
    await driver.wait_until("done", True, 5)
    assert reference_plc.requests == {FC_READ_COILS: 1}


# -- failures -----------------------------------------------------------------------------------


async def test_illegal_address_is_named(tmp_path: Path, reference_plc: ReferencePlc) -> None:
    profile = tiny_profile(
        tmp_path,
        "  beyond: {table: holding, address: 50, type: u32}\n"
        "  missing: {table: input, address: 11, type: u16}\n",
    )
    d = make_driver(reference_plc, profile)
    with pytest.raises(MachineFault) as err:
        await d.write({"beyond": d.encode("beyond", 1)})
    assert str(err.value) == (
        f"modbus 127.0.0.1:{reference_plc.port} unit 1: write_registers address 50 count 2 "
        "(beyond): device answered ILLEGAL_ADDRESS (Modbus exception code 2)"
    )
    assert err.value.code == 2
    assert not err.value.retryable
    with pytest.raises(MachineFault, match=r"read_input_registers address 11 count 1 \(missing\)"):
        await d.read(["missing"])
    assert d.connected  # an exception response is an answer: the connection stays
    await d.close()


async def test_plc_stopped_mid_cycle(driver: ModbusDriver, reference_plc: ReferencePlc) -> None:
    await driver.write({"tool": driver.encode("tool", 4)})
    await reference_plc.stop()
    with pytest.raises(MachineError) as err:
        await driver.write({"trigger": driver.encode("trigger", True)})
    assert str(err.value).startswith(f"modbus 127.0.0.1:{reference_plc.port} unit 1: ")
    assert err.value.device == driver.device
    assert not driver.connected
    assert reference_plc.snapshot()["coil"][0] is False


async def test_plc_that_stops_answering(reference_plc: ReferencePlc, profile: Profile) -> None:
    d = make_driver(reference_plc, profile, timeout=0.2, retries=1)
    await d.connect()
    reference_plc.set_unreachable()
    t0 = time.perf_counter()
    with pytest.raises(MachineError) as err:
        await d.read(["cycle_count"])
    assert 0.35 < time.perf_counter() - t0 < 3.0  # two tries of 0.2 s (the message says 1 retry)
    assert str(err.value) == (
        f"{d.device}: read_input_registers address 10 count 1 (cycle_count): "
        "no response within 0.2 s (1 retries)"
    )
    assert not d.connected  # a late answer must never be taken for the next request's
    reference_plc.set_unreachable(False)
    assert await d.read(["cycle_count"]) == {"cycle_count": 0}  # reconnects at once
    await d.close()


async def test_connection_dropped_during_a_request_fails_at_once(
    reference_plc: ReferencePlc, profile: Profile
) -> None:
    d = make_driver(reference_plc, profile, timeout=5.0)
    await d.connect()
    reference_plc.set_unreachable()
    read = asyncio.create_task(d.read(["tool"]))
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    reference_plc.drop_connections()
    with pytest.raises(
        MachineError, match=r"read_holding_registers address 7 count 1 \(tool\): connection lost"
    ):
        await read
    assert time.perf_counter() - t0 < 2.5  # not the 5 s timeout
    reference_plc.set_unreachable(False)
    assert await d.read(["tool"]) == {"tool": 0}
    await d.close()


# -- encoding -----------------------------------------------------------------------------------


def test_encode_refuses_what_the_type_cannot_hold(
    profile: Profile, reference_plc_settings: ModbusSettings
) -> None:
    d = create(reference_plc_settings, profile)
    assert d.encode("feed_rate", 320.5) == [3205]
    assert d.encode("trigger", True) is True
    with pytest.raises(ValueError, match=r"^spindle_speed: 70000 does not fit u16"):
        d.encode("spindle_speed", 70000)
    with pytest.raises(ValueError, match=r"^feed_rate: 7000 does not fit u16 with scale 0\.1"):
        d.encode("feed_rate", 7000)
    with pytest.raises(ValueError, match=r"^depth: nan is not a finite number"):
        d.encode("depth", float("nan"))
    with pytest.raises(ValueError, match=r"^trigger: 2 is not a bool"):
        d.encode("trigger", 2)
    with pytest.raises(ValueError, match=r"^nozzle: no such point in profile reference-plc"):
        d.encode("nozzle", 1)


def test_raw_for_report(profile: Profile, reference_plc_settings: ModbusSettings) -> None:
    d = create(reference_plc_settings, profile)
    assert d.raw_for_report(d.encode("force", 150000)) == [2, 0x49F0]
    assert d.raw_for_report(d.encode("trigger", 1)) is True


async def test_write_refuses_read_only_and_malformed_values(
    driver: ModbusDriver, reference_plc: ReferencePlc
) -> None:
    with pytest.raises(ValueError, match="actual_tool: input 7 is read-only"):
        await driver.write({"actual_tool": [1]})
    with pytest.raises(ValueError, match="force: wire value"):
        await driver.write({"force": [1]})  # one word for a u32
    with pytest.raises(ValueError, match="tool: wire value"):
        await driver.write({"tool": [70000]})
    with pytest.raises(ValueError, match="trigger: wire value"):
        await driver.write({"trigger": [1]})
    assert reference_plc.requests == {}


@pytest.fixture
def reference_plc_settings() -> ModbusSettings:
    return ModbusSettings(host="127.0.0.1", port=1)


def test_settings_defaults_and_refusals() -> None:
    s = ModbusSettings(host="plc.local")
    assert (s.port, s.unit_id, s.timeout, s.retries) == (502, 1, 1.0, 1)
    assert (s.poll_interval, s.reconnect_max, s.max_gap) == (0.005, 30.0, 0)
    for bad in (
        {"unit_id": 256},
        {"port": 0},
        {"profile": "x"},
        {"reconnect_min": 60, "reconnect_max": 1},
    ):
        with pytest.raises(ValueError):
            ModbusSettings(host="plc.local", **bad)


def test_profile_constants_are_checked_when_the_profile_is_loaded(tmp_path: Path) -> None:
    text = PROFILE.read_text(encoding="utf-8")
    text = text.replace("  - write: program ", "  - {write: program, value: 70000}")
    text = text.replace(
        "      dwell: dwell\n    results",
        "      dwell: {point: dwell, default: 20000}\n    results",
    )
    with pytest.raises(ConfigError) as err:
        load_profile(tmp_path / "p.yaml", text)
    assert [(p.path, p.message) for p in err.value.problems] == [
        ("handshake[1].value", "program=70000 is outside the safe range: above maximum 3"),
        (
            "operations.drill.parameters.dwell.default",
            "dwell=20000 ms is outside the safe range: above maximum 10000 ms",
        ),
    ]
    assert all(p.file == str(tmp_path / "p.yaml") and p.line for p in err.value.problems)


def test_what_only_the_driver_knows_is_checked_when_it_is_created(
    tmp_path: Path, reference_plc_settings: ModbusSettings
) -> None:
    # Three characters fit a 4-character point, but in UTF-8 they are six bytes.
    text = (
        'profile: tiny\nversion: "1"\ndriver: modbus\npoints:\n'
        "  label: {table: holding, address: 0, type: string, length: 4, encoding: utf-8}\n"
        "operations:\n  op: {parameters: {label: {point: label, default: äöü}}}\n"
        "handshake: [write_parameters]\n"
    )
    profile = load_profile(tmp_path / "p.yaml", text)
    with pytest.raises(ConfigError) as err:
        create(reference_plc_settings, profile)
    [problem] = err.value.problems
    assert problem.path == "operations.op.parameters.label.default"
    assert "6 bytes long" in problem.message
