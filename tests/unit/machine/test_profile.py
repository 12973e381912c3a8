"""Firmware profiles: the shipped ones load; broken ones are reported with file, line and key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.errors import ConfigError, ConfigProblem
from edge_agent.machine.modbus import ModbusPoint
from edge_agent.machine.profile import PointType, load_profile
from tests import REPO_ROOT

PROFILES = REPO_ROOT / "firmware_profiles"
REFERENCE = PROFILES / "reference-plc.yaml"


@pytest.mark.parametrize("path", sorted(PROFILES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_profile_loads(path: Path) -> None:
    profile = load_profile(path)
    assert profile.name == path.stem
    assert profile.operations
    assert profile.content_hash.startswith("sha256:")


def test_there_are_profiles_to_check() -> None:
    assert {p.name for p in PROFILES.glob("*.yaml")} >= {
        "reference-plc.yaml",
        "acme-press-x200-fw3.yaml",
    }


def test_reference_profile_matches_the_reference_plc() -> None:
    profile = load_profile(REFERENCE)
    points = profile.points
    assert all(isinstance(p, ModbusPoint) for p in points.values())
    holding = {n: (p.address, p.type) for n, p in points.items() if p.table == "holding"}  # type: ignore[attr-defined]
    assert holding == {
        "spindle_speed": (0, PointType.U16),
        "feed_rate": (1, PointType.U16),
        "depth": (2, PointType.F32),
        "coolant_temp": (4, PointType.I16),
        "force": (5, PointType.U32),
        "tool": (7, PointType.U16),
        "dwell": (8, PointType.U16),
        "program": (9, PointType.U16),
    }
    for name, (address, type_) in holding.items():
        echo = points[f"actual_{name}"]
        assert (echo.table, echo.address, echo.type, echo.scale) == (  # type: ignore[attr-defined]
            "input",
            address,
            type_,
            points[name].scale,
        )
    assert (points["cycle_count"].table, points["cycle_count"].address) == ("input", 10)  # type: ignore[attr-defined]
    assert not points["done"].writable
    assert not points["actual_tool"].writable
    assert points["trigger"].writable
    assert {n: op.program for n, op in profile.operations.items()} == {
        "drill": 1,
        "mill": 2,
        "press": 3,
    }
    for op in profile.operations.values():
        assert op.results[-1] == "cycle_count"
        for spec in op.parameters.values():
            assert f"actual_{spec.point}" in op.results
    assert profile.parameter_limits("mill", "coolant_temp") == (5.0, 40.0)


def test_example_press_uses_little_word_order_and_a_string() -> None:
    profile = load_profile(PROFILES / "acme-press-x200-fw3.yaml")
    label = profile.points["job_label"]
    assert (label.type, label.length, label.registers) == (PointType.STRING, 16, 8)  # type: ignore[attr-defined]
    assert profile.points["press_force"].word_order == "little"  # type: ignore[attr-defined]
    assert profile.points["firmware"].word_order == "big"  # type: ignore[attr-defined]
    assert profile.parameter_limits("press_fit", "force") == (0.0, 120.0)


# -- broken profiles ----------------------------------------------------------------------------


def broken(tmp_path: Path, *edits: tuple[str, str]) -> tuple[list[ConfigProblem], str, str]:
    """Load the reference profile with ``edits`` applied; return its problems, file and text."""
    text = REFERENCE.read_text(encoding="utf-8")
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    for problem in err.value.problems:  # every problem says where
        assert problem.file == str(path)
        assert problem.line is not None
        assert str(problem).startswith(f"{path}:{problem.line}: ")
    return err.value.problems, str(path), text


def line_of(text: str, needle: str) -> int:
    (line,) = [i for i, s in enumerate(text.splitlines(), 1) if needle in s]
    return line


def test_unknown_key(tmp_path: Path) -> None:
    problems, _, text = broken(
        tmp_path,
        ("tool: {table: holding, address: 7,", "tool: {table: holding, adress: 7,"),
    )
    assert [(p.path, p.message) for p in problems] == [
        ("points.tool.address", "required key is missing"),
        ("points.tool.adress", "unknown key (did you mean 'address'?)"),
    ]
    assert {p.line for p in problems} == {line_of(text, "adress")}


def test_wrong_type(tmp_path: Path) -> None:
    problems, _, text = broken(
        tmp_path, ("dwell: {table: holding, address: 8,", "dwell: {table: holding, address: eight,")
    )
    (problem,) = problems
    assert problem.path == "points.dwell.address"
    assert "integer" in problem.message
    assert problem.line == line_of(text, "address: eight")


def test_coil_with_type_u16(tmp_path: Path) -> None:
    problems, _, text = broken(
        tmp_path,
        (
            "trigger: {table: coil, address: 0, type: bool,",
            "trigger: {table: coil, address: 0, type: u16,",
        ),
    )
    (problem,) = problems
    assert problem.path == "points.trigger.table"
    assert problem.message == "a coil holds one bit: the point's type must be bool, not u16"
    assert problem.line == line_of(text, "trigger: {table: coil")


def test_min_outside_the_type_range_with_scale(tmp_path: Path) -> None:
    problems, _, text = broken(
        tmp_path,
        ("mm/min, min: 0, max: 5000}", "mm/min, min: 0, max: 7000}"),
    )
    (problem,) = problems
    assert problem.path == "points.feed_rate"
    assert problem.message.startswith("max 7000.0 cannot be represented by u16 with scale 0.1")
    assert "6553.5" in problem.message
    assert problem.line == line_of(text, "  feed_rate: {")


def test_negative_min_for_unsigned(tmp_path: Path) -> None:
    problems, _, _ = broken(
        tmp_path, ("unit: rpm, min: 0, max: 12000}", "unit: rpm, min: -100, max: 12000}")
    )
    assert [(p.path, p.message.split(" cannot")[0]) for p in problems] == [
        ("points.spindle_speed", "min -100.0")
    ]


def test_handshake_referencing_a_missing_point(tmp_path: Path) -> None:
    problems, _, text = broken(
        tmp_path, ("{wait: done, equals: true, timeout: 5}", "{wait: finished, equals: true}")
    )
    (problem,) = problems
    assert problem.path == "handshake[3]"
    assert problem.message == "no point named 'finished' in points"
    assert problem.line == line_of(text, "wait: finished")


def test_write_to_an_input_register(tmp_path: Path) -> None:
    problems, _, text = broken(
        tmp_path,
        ("      force: force\n", "      force: actual_force\n"),
        ("  - set: trigger\n", "  - set: done\n"),
    )
    assert [(p.path, p.message) for p in problems] == [
        (
            "operations.press.parameters.force",
            "point 'actual_force' is read-only and cannot be written",
        ),
        ("handshake[2]", "point 'done' is read-only and cannot be written"),
    ]
    assert problems[0].line == line_of(text, "force: actual_force")
    assert problems[1].line == line_of(text, "- set: done")


def test_string_without_length_and_bad_address(tmp_path: Path) -> None:
    problems, _, _ = broken(
        tmp_path,
        (
            "tool: {table: holding, address: 7, type: u16,",
            "tool: {table: holding, address: 7, type: string,",
        ),
        ("dwell: {table: holding, address: 8,", "dwell: {table: holding, address: 70000,"),
    )
    assert sorted((p.path, p.message) for p in problems) == [
        ("points.dwell.address", "Input should be less than or equal to 65535"),
        ("points.tool", "string points need 'length' (characters)"),
    ]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    problems, _, _ = broken(
        tmp_path,
        ("tool: {table: holding, address: 7,", "tool: {table: holding, adress: 7,"),
        (
            "trigger: {table: coil, address: 0, type: bool,",
            "trigger: {table: coil, address: 0, type: f32,",
        ),
        ("dwell: {table: holding, address: 8,", "dwell: {table: holdings, address: 8,"),
    )
    assert {p.path for p in problems} == {
        "points.tool.address",
        "points.tool.adress",
        "points.trigger.table",
        "points.dwell.table",
    }


def test_misspelt_default_is_reported_once(tmp_path: Path) -> None:
    problems, _, text = broken(
        tmp_path, ("driver: modbus\n", "driver: modbus\ndefaults: {word_ordr: little}\n")
    )
    assert [(p.path, p.message) for p in problems] == [
        ("defaults.word_ordr", "unknown key (did you mean 'word_order'?)")
    ]
    assert problems[0].line == line_of(text, "word_ordr")


def test_wait_value_of_the_wrong_kind_is_refused_at_load(tmp_path: Path) -> None:
    problems, _, text = broken(
        tmp_path, ("{wait: done, equals: true, timeout: 5}", "{wait: done, equals: 1, timeout: 5}")
    )
    [problem] = problems
    assert problem.path == "handshake[3]" and "use true or false" in problem.message
    assert problem.line == line_of(text, "equals: 1")


def test_profile_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(REFERENCE.read_text(encoding="utf-8").replace("°C", "\xb0C").encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    [problem] = err.value.problems
    assert problem.file == str(path) and "not UTF-8" in problem.message
