"""The profile's safety rules: each one refuses a profile that breaks it, with the documented message.

Every rule in ``PROFILE_RULES`` and ``VALUE_RULES`` has a case here that breaks a shipped profile in
exactly that way; the message must match the template docs/firmware-profiles.md prints for it.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest

from edge_agent.errors import ConfigError, ConfigProblem
from edge_agent.machine.profile import load_profile
from edge_agent.machine.rules import PROFILE_RULES
from edge_agent.machine.values import VALUE_RULES
from tests import REPO_ROOT

REPO = REPO_ROOT
PROFILES = REPO / "firmware_profiles"
DOC = REPO / "docs" / "firmware-profiles.md"
PLC, OPCUA, ACME = "reference-plc.yaml", "reference-opcua.yaml", "acme-press-x200-fw3.yaml"
RULES = {**PROFILE_RULES, **VALUE_RULES}

DRILL_END = "      dwell: dwell\n    results:\n      [actual_spindle_speed"
COOLANT_MILL = "      coolant_temp: coolant_temp\n    results:\n      [actual_spindle_speed"
CLOSE = "  - read_results\n  - reset: trigger\n  - {wait: done, equals: false, timeout: 2}\n"


def default(param: str, value: str) -> tuple[str, str]:
    """An edit giving the drill's (reference PLC) ``dwell`` or another parameter a default."""
    return DRILL_END, DRILL_END.replace(
        f"{param}: {param}", f"{param}: {{point: {param}, default: {value}}}"
    )


#: rule -> (profile, edits, key path of the problem)
CASES: dict[str, tuple[str, list[tuple[str, str]], str]] = {
    "unknown_point": (PLC, [("{wait: done, equals: true", "{wait: finished, equals: true")], "handshake[3]"),
    "read_only_write": (PLC, [("  - set: trigger\n", "  - set: done\n")], "handshake[2]"),
    "min_above_max": (PLC, [("rpm, min: 0, max: 12000}", "rpm, min: 13000, max: 12000}")], "points.spindle_speed"),
    "limit_unrepresentable": (PLC, [("mm/min, min: 0, max: 5000}", "mm/min, min: 0, max: 7000}")], "points.feed_rate"),
    "string_length": (PLC, [("tool: {table: holding, address: 7, type: u16,", "tool: {table: holding, address: 7, type: string,")], "points.tool"),
    "parameter_min_below_point": (PLC, [(COOLANT_MILL, COOLANT_MILL.replace("coolant_temp: coolant_temp", "coolant_temp: {point: coolant_temp, min: 1}"))], "operations.mill.parameters.coolant_temp"),
    "parameter_max_above_point": (PLC, [(COOLANT_MILL, COOLANT_MILL.replace("coolant_temp: coolant_temp", "coolant_temp: {point: coolant_temp, max: 50}"))], "operations.mill.parameters.coolant_temp"),
    "program_missing": (PLC, [("    program: 3\n", "")], "handshake[1]"),
    "wait_bool": (PLC, [("{wait: done, equals: true, timeout: 5}", "{wait: done, equals: 1, timeout: 5}")], "handshake[3]"),
    "wait_string": (ACME, [("{wait: complete, equals: true, timeout: 30}", "{wait: job_label, equals: 1, timeout: 30}")], "handshake[2]"),
    "wait_number": (PLC, [("{wait: done, equals: true, timeout: 5}", "{wait: cycle_count, equals: true, timeout: 5}")], "handshake[3]"),
    "call_parameter_missing": (OPCUA, [("args: [setpoint, setpoint]", "args: [setpoint, nozzle]")], "handshake[1]"),
    # the register grid (issue: feed_rate u16 scale 0.1 max 4999.95 reached the PLC as 5000.0)
    "limit_off_grid": (PLC, [("mm/min, min: 0, max: 5000}", "mm/min, min: 0, max: 4999.95}")], "points.feed_rate.max"),
    "limit_off_precision": (PLC, [("unit: mm, min: 0, max: 80}", "unit: mm, min: 0, max: 16777217}")], "points.depth.max"),
    # the handshake's meaning
    "set_not_reset": (PLC, [(CLOSE, "  - read_results\n")], "handshake[2]"),
    "set_not_reset_on_abort": (PLC, [("on_abort:\n  - reset: trigger\n", "")], "handshake[2]"),
    "set_without_wait": (PLC, [(CLOSE, "  - reset: trigger\n  - read_results\n"), ("  - {wait: done, equals: true, timeout: 5}\n", "")], "handshake[2]"),
    "read_before_trigger": (PLC, [("  - write_parameters\n", "  - write_parameters\n  - read_results\n")], "handshake[1]"),
    "read_before_wait": (PLC, [("  - set: trigger\n", "  - set: trigger\n  - read_results\n")], "handshake[3]"),
    # machine memory
    "points_overlap": (PLC, [("depth: {table: holding, address: 2,", "depth: {table: holding, address: 1,")], "points.depth"),
    "handshake_alias": (PLC, [("  # Handshake.\n", "  start_alias: {table: coil, address: 0, type: bool}\n")], "points.start_alias"),
    "parameter_on_handshake": (PLC, [(DRILL_END, DRILL_END.replace("dwell: dwell", "dwell: program"))], "operations.drill.parameters.dwell"),
    # values the profile supplies, by the value rules
    "not_bool": (OPCUA, [("coolant: {point: coolant, default: false}\n      label: {point: label, default: \"\"}", "coolant: {point: coolant, default: yes please}\n      label: {point: label, default: \"\"}")], "operations.process.parameters.coolant.default"),
    "not_text": (OPCUA, [("label: {point: label, default: \"\"}", "label: {point: label, default: 5}")], "operations.process.parameters.label.default"),
    "text_too_long": (OPCUA, [("label: {point: label, default: \"\"}", "label: {point: label, default: " + "x" * 40 + "}")], "operations.process.parameters.label.default"),
    "not_number": (PLC, [default("dwell", "long")], "operations.drill.parameters.dwell.default"),
    "not_finite": (PLC, [default("dwell", ".inf")], "operations.drill.parameters.dwell.default"),
    "does_not_fit": (PLC, [("program: {table: holding, address: 9, type: u16, min: 1, max: 3}", "program: {table: holding, address: 9, type: u16}"), ("    program: 3\n", "    program: 70000\n")], "operations.press.program"),
    "below_min": (PLC, [(COOLANT_MILL, COOLANT_MILL.replace("coolant_temp: coolant_temp", "coolant_temp: {point: coolant_temp, default: 4}"))], "operations.mill.parameters.coolant_temp.default"),
    "above_max": (PLC, [("    program: 3\n", "    program: 7\n")], "operations.press.program"),
    "held_below_min": (PLC, [(COOLANT_MILL, COOLANT_MILL.replace("coolant_temp: coolant_temp", "coolant_temp: {point: coolant_temp, default: 4.94}"))], "operations.mill.parameters.coolant_temp.default"),
    "held_above_max": (PLC, [default("dwell", "10000.6")], "operations.drill.parameters.dwell.default"),
}  # fmt: skip


def refused(tmp_path: Path, profile: str, edits: list[tuple[str, str]]) -> list[ConfigProblem]:
    text = (PROFILES / profile).read_text(encoding="utf-8")
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / profile
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    for problem in err.value.problems:  # file:line: key.path: message, every time
        assert problem.file == str(path) and problem.line is not None
    return err.value.problems


def pattern(template: str) -> re.Pattern[str]:
    """A template's message as a regular expression: each {field} stands for some text."""
    out = ""
    for literal, field, _spec, _conv in string.Formatter().parse(template):
        out += re.escape(literal) + ("(.*)" if field is not None else "")
    return re.compile(out)


def test_every_rule_has_a_case() -> None:
    assert set(CASES) == set(RULES)


@pytest.mark.parametrize("code", sorted(CASES))
def test_rule_refuses_the_profile_with_its_message(tmp_path: Path, code: str) -> None:
    profile, edits, where = CASES[code]
    problems = refused(tmp_path, profile, edits)
    messages = {p.message for p in problems if p.path == where}
    assert any(pattern(RULES[code]).fullmatch(m) for m in messages), (code, problems)


def documented() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Safety rules", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(\w+)` \| `(.+?)` \|", section, re.M))


def test_docs_list_every_rule_with_the_message_it_prints() -> None:
    assert documented() == RULES


# -- what the messages say ----------------------------------------------------------------------


def test_off_grid_limit_names_what_the_machine_would_hold_and_the_nearest_values(
    tmp_path: Path,
) -> None:
    problems = refused(tmp_path, *CASES["limit_off_grid"][:2])
    assert [p.message for p in problems] == [
        "max 4999.95 is not on the register grid of u16 with scale 0.1 and offset 0: the machine "
        "would hold 5000; use 4999.9 or 5000"
    ]


def test_half_way_integer_limit_is_refused(tmp_path: Path) -> None:
    problems = refused(
        tmp_path, PLC, [("type: u16, min: 1, max: 24}", "type: u16, min: 1, max: 24.5}")]
    )
    assert [(p.path, p.message) for p in problems] == [
        (
            "points.tool.max",
            "max 24.5 is not on the register grid of u16: the machine would hold 25; use 24 or 25",
        )
    ]


def test_alias_of_the_trigger_is_refused_by_address(tmp_path: Path) -> None:
    problems = refused(tmp_path, *CASES["handshake_alias"][:2])
    assert [p.message for p in problems] == [
        "shares coil 0 with handshake point 'trigger' (set): only the handshake may write it"
    ]


def test_multi_register_overlap_names_the_shared_registers(tmp_path: Path) -> None:
    # force is a u32 at holding 5..6; a u16 moved onto 6 shares one register with it.
    problems = refused(
        tmp_path,
        PLC,
        [("tool: {table: holding, address: 7,", "tool: {table: holding, address: 6,")],
    )
    assert [(p.path, p.message) for p in problems] == [
        ("points.tool", "shares holding 6 with point 'force': writing one changes the other")
    ]


def test_opcua_nodes_overlap_by_node_id(tmp_path: Path) -> None:
    problems = refused(tmp_path, OPCUA, [("count: {node: s=Int32,", "count: {node: s=Double,")])
    assert [p.message for p in problems] == [
        "shares node nsu=urn:edge-agent:reference-opcua-machine;s=Double with point 'setpoint': "
        "writing one changes the other"
    ]


def test_a_never_reset_trigger_is_refused(tmp_path: Path) -> None:
    problems = refused(tmp_path, *CASES["set_not_reset"][:2])
    assert [p.message for p in problems] == [
        "sets 'trigger' but no later step resets it: add 'reset: trigger' after the wait"
    ]
