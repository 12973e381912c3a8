"""The rules a firmware profile must meet before it may drive a machine (validation stage 3).

Names: every point the operations, the handshake and the telemetry groups name exists (and is
writable where it is written), limits fit the point's type, a ``wait`` can ever see its value, the
cycle counter is a whole-number point. The handshake's meaning: whatever it sets is reset on the
normal path and by ``on_abort``, a ``set`` is followed by a ``wait``, results are read only after
that wait. Machine memory: a writable point never shares a register (Modbus table and address,
each register of a multi-register type) or a node (OPC UA) with another writable point or with any
point the handshake touches, so an alias of the trigger under a new name is refused. Values:
limits lie on the register grid, and the values the profile itself supplies (program numbers,
defaults, constants) pass the value rules.

Every message comes from ``PROFILE_RULES`` (or ``values.VALUE_RULES``); docs/firmware-profiles.md
lists them under "Safety rules" and a test keeps the two equal.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import ConfigProblem
from ..yamlfile import Lines
from .codec import INT_RANGES, PointType
from .profile_schema import BasePoint, Operation, ProfileDoc
from .steps import (
    CallMethod,
    HandshakePoints,
    HandshakeStep,
    ReadError,
    ReadResults,
    ResetPoint,
    SetPoint,
    WaitFor,
    WritePoint,
)
from .values import Refused, check_value, describe_grid, off_grid, show

#: code -> message template. ``check_references`` uses those up to ``call_parameter_missing``,
#: the safety rules the rest.
PROFILE_RULES: dict[str, str] = {
    "unknown_point": "no point named '{point}' in points",
    "read_only_write": "point '{point}' is read-only and cannot be written",
    "min_above_max": "min {min} is greater than max {max}",
    "limit_unrepresentable": (
        "{which} {limit} cannot be represented by {type} with scale {scale} and offset {offset} "
        "(range {lo}..{hi})"
    ),
    "string_length": "string points need 'length' (characters)",
    "parameter_min_below_point": "min {min} is below the point's safe minimum {point_min}",
    "parameter_max_above_point": "max {max} is above the point's safe maximum {point_max}",
    "program_missing": "writes the program number, but operations {missing} have no 'program'",
    "wait_bool": "equals {value}: the point is a bool: use true or false",
    "wait_string": "equals {value}: the point is a string",
    "wait_number": "equals {value}: the point is a number ({type})",
    "call_parameter_missing": "passes parameter '{arg}', which operations {lacking} lack",
    "limit_off_grid": (
        "{which} {limit} is not on the register grid of {grid}: the machine would hold {held}; "
        "use {nearest}"
    ),
    "limit_off_precision": "{which} {limit} cannot be held exactly by {type}: the machine would hold {held}",
    "set_not_reset": "sets '{point}' but no later step resets it: add 'reset: {point}' after the wait",
    "set_not_reset_on_abort": (
        "sets '{point}' but on_abort does not reset it: a failed cycle would leave it set"
    ),
    "set_without_wait": "sets '{point}' but no 'wait' follows before it is reset",
    "read_before_trigger": "{step} comes before 'set: {point}': it would read the last cycle's values",
    "read_before_wait": "{step} comes before a 'wait' for the cycle that 'set: {point}' started",
    "points_overlap": "shares {cells} with point '{other}': writing one changes the other",
    "handshake_alias": (
        "shares {cells} with handshake point '{other}' ({role}): only the handshake may write it"
    ),
    "parameter_on_handshake": (
        "point '{point}' is driven by the handshake ({role}): a recipe cannot write it"
    ),
}

Path = tuple[str | int, ...]
Add = Callable[[Path, str], None]


def rule(code: str, **fields: Any) -> str:
    return PROFILE_RULES[code].format(**fields)


def reporter(file: str, lines: Lines, problems: list[ConfigProblem]) -> Add:
    """``add(path, message)``: a problem at the line of ``path`` (or its nearest parent)."""

    def add(path: Path, message: str) -> None:
        line = None
        for end in range(len(path), -1, -1):
            if path[:end] in lines:
                line = lines[path[:end]]
                break
        dotted = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in path)
        problems.append(ConfigProblem(file, line, dotted.replace(".[", "["), message))

    return add


# -- stage 3, first: every name resolves, limits fit the point's type --------------------------


def check_references(doc: ProfileDoc, points: dict[str, BasePoint], add: Add) -> None:
    """The points the profile names exist (writable where written) and their limits can be held;
    the safety rules below need this first."""
    for name, point in points.items():
        check_limits(point, ("points", name), add)
    for op_name, op in doc.operations.items():
        _check_operation(op_name, op, points, add)
    for section in ("handshake", "on_abort"):
        for i, step in enumerate(getattr(doc, section)):
            _check_step(doc, (section, i), step, points, add)
    for group_name, group in doc.telemetry.items():
        for point_name in group.points:
            _resolves(points, point_name, ("telemetry", group_name, "points", point_name), add)
    check_cycle_counter(doc, points, add)


def _resolves(
    points: dict[str, BasePoint], name: str, path: Path, add: Add, *, write: bool = False
) -> bool:
    if name not in points:
        add(path, rule("unknown_point", point=name))
        return False
    if write and not points[name].writable:
        add(path, rule("read_only_write", point=name))
        return False
    return True


def check_limits(point: BasePoint, path: Path, add: Add) -> None:
    """A point's own [min, max] is ordered and representable by its type and scaling."""
    if point.min is not None and point.max is not None and point.min > point.max:
        add(path, rule("min_above_max", min=point.min, max=point.max))
    if point.type in INT_RANGES:
        lo, hi = INT_RANGES[point.type]
        eng = sorted((lo * point.scale + point.offset, hi * point.scale + point.offset))
        for which, limit in (("min", point.min), ("max", point.max)):
            if limit is not None and not eng[0] <= limit <= eng[1]:
                message = rule(
                    "limit_unrepresentable",
                    which=which,
                    limit=limit,
                    type=point.type.value,
                    scale=point.scale,
                    offset=point.offset,
                    lo=eng[0],
                    hi=eng[1],
                )
                add(path, message)
    if point.type is PointType.STRING and point.length is None:
        add(path, rule("string_length"))


def _check_operation(op_name: str, op: Operation, points: dict[str, BasePoint], add: Add) -> None:
    for param, spec in op.parameters.items():
        path: Path = ("operations", op_name, "parameters", param)
        if not _resolves(points, spec.point, path, add, write=True):
            continue
        point = points[spec.point]
        if spec.min is not None and point.min is not None and spec.min < point.min:
            add(path, rule("parameter_min_below_point", min=spec.min, point_min=point.min))
        if spec.max is not None and point.max is not None and spec.max > point.max:
            add(path, rule("parameter_max_above_point", max=spec.max, point_max=point.max))
    for i, result in enumerate(op.results):
        _resolves(points, result, ("operations", op_name, "results", i), add)


def _check_step(
    doc: ProfileDoc, path: Path, step: HandshakeStep, points: dict[str, BasePoint], add: Add
) -> None:
    if isinstance(step, WritePoint):
        _resolves(points, step.write, path, add, write=True)
        missing = [n for n, op in doc.operations.items() if op.program is None]
        if step.value is None and missing:
            add(path, rule("program_missing", missing=missing))
    elif isinstance(step, SetPoint):
        _resolves(points, step.set, path, add, write=True)
    elif isinstance(step, ResetPoint):
        _resolves(points, step.reset, path, add, write=True)
    elif isinstance(step, ReadError):
        _resolves(points, step.read_error, path, add)
    elif isinstance(step, WaitFor):
        if _resolves(points, step.wait, path, add):
            mismatch = _never_seen(points[step.wait].type, step.equals)
            if mismatch is not None:
                add(path, mismatch)
    elif isinstance(step, CallMethod):
        for arg in step.args:  # the handshake is shared: every operation must have it
            lacking = [n for n, op in doc.operations.items() if arg not in op.parameters]
            if lacking:
                add(path, rule("call_parameter_missing", arg=arg, lacking=lacking))


def _never_seen(type_: PointType, value: Any) -> str | None:
    """Why ``value`` can never be read from a point of ``type_`` (a wait would always time out)."""
    if type_ is PointType.BOOL:
        return None if isinstance(value, bool) else rule("wait_bool", value=repr(value))
    if type_ is PointType.STRING:
        return None if isinstance(value, str) else rule("wait_string", value=repr(value))
    if isinstance(value, bool) or not isinstance(value, int | float):
        return rule("wait_number", value=repr(value), type=type_.value)
    return None


def check_cycle_counter(doc: ProfileDoc, points: dict[str, BasePoint], add: Add) -> None:
    """The cycle counter is an integer point counting whole cycles."""
    name = doc.cycle_counter
    if name is None:
        return
    if name not in points:
        close = difflib.get_close_matches(name, list(points), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        add(("cycle_counter",), f"no point named '{name}' in points{hint}")
    elif points[name].type not in INT_RANGES:
        add(
            ("cycle_counter",),
            f"point '{name}' is {points[name].type.value}: a cycle counter is an integer",
        )
    elif points[name].scale != 1 or points[name].offset != 0:
        add(
            ("cycle_counter",),
            f"point '{name}' has a scale or offset: a cycle counter counts whole cycles",
        )


# -- stage 3 rules on a schema-valid profile whose names all resolve -----------------------------


def check_safety(doc: ProfileDoc, points: dict[str, BasePoint], add: Add) -> None:
    """Every safety rule below, each problem through ``add``."""
    roles = HandshakePoints.of([*doc.handshake, *doc.on_abort])
    check_grid(doc, points, add)
    check_constants(doc, points, roles.program, add)
    check_handshake(doc, add)
    check_memory(doc, points, roles, add)


def check_grid(doc: ProfileDoc, points: dict[str, BasePoint], add: Add) -> None:
    """Limits are values the machine can hold: what is checked is what is written."""

    def one(path: Path, point: Any, which: str, limit: float | None) -> None:
        if limit is None:
            return
        found = off_grid(point, limit)
        if found is None:
            return
        held, nearest = found
        if point.type in INT_RANGES:
            message = rule(
                "limit_off_grid",
                which=which,
                limit=show(limit),
                grid=describe_grid(point),
                held=show(held),
                nearest=" or ".join(show(v) for v in nearest),
            )
        else:
            message = rule(
                "limit_off_precision",
                which=which,
                limit=show(limit),
                type=point.type.value,
                held=show(held),
            )
        add(path, message)

    for name, point in points.items():
        for which in ("min", "max"):
            one(("points", name, which), point, which, getattr(point, which))
    for op_name, op in doc.operations.items():
        for param, spec in op.parameters.items():
            if spec.point in points:
                for which in ("min", "max"):
                    path = ("operations", op_name, "parameters", param, which)
                    one(path, points[spec.point], which, getattr(spec, which))


def check_constants(
    doc: ProfileDoc, points: dict[str, BasePoint], program: str | None, add: Add
) -> None:
    """Program numbers, parameter defaults and handshake constants pass the value rules now,
    not halfway through a cycle."""

    def refused(point: Any, value: Any, label: str, lo: Any, hi: Any) -> str | None:
        checked = check_value(point, value, label=label, lo=lo, hi=hi)
        return checked.message if isinstance(checked, Refused) else None

    if program in points:
        point = points[program]
        for op_name, op in doc.operations.items():
            if op.program is not None:
                why = refused(point, op.program, "program", point.min, point.max)
                if why:
                    add(("operations", op_name, "program"), why)
    for section in ("handshake", "on_abort"):
        for i, step in enumerate(getattr(doc, section)):
            if isinstance(step, WritePoint) and step.value is not None and step.write in points:
                point = points[step.write]
                why = refused(point, step.value, step.write, point.min, point.max)
                if why:
                    add((section, i, "value"), why)
    for op_name, op in doc.operations.items():
        for param, spec in op.parameters.items():
            if spec.default is None or spec.point not in points:
                continue
            point = points[spec.point]
            why = refused(point, spec.default, param, *spec.limits(point))
            if why:
                add(("operations", op_name, "parameters", param, "default"), why)


def check_handshake(doc: ProfileDoc, add: Add) -> None:
    """A trigger goes up, the machine is waited for, results are read, the trigger comes down;
    on_abort brings it down too."""
    steps = doc.handshake
    sets = {i: s.set for i, s in enumerate(steps) if isinstance(s, SetPoint)}
    waits = [i for i, s in enumerate(steps) if isinstance(s, WaitFor)]
    _check_resets(doc, sets, waits, add)
    if sets:
        _check_reads(steps, sets, waits, add)


def _check_resets(doc: ProfileDoc, sets: dict[int, str], waits: list[int], add: Add) -> None:
    steps = doc.handshake
    aborts = {s.reset for s in doc.on_abort if isinstance(s, ResetPoint)}
    resets = {i: s.reset for i, s in enumerate(steps) if isinstance(s, ResetPoint)}
    for i, point in sets.items():
        reset_at = min((j for j, p in resets.items() if j > i and p == point), default=len(steps))
        if reset_at == len(steps):
            add(("handshake", i), rule("set_not_reset", point=point))
        if not any(i < w < reset_at for w in waits):
            add(("handshake", i), rule("set_without_wait", point=point))
        if point not in aborts:
            add(("handshake", i), rule("set_not_reset_on_abort", point=point))


def _check_reads(
    steps: list[HandshakeStep], sets: dict[int, str], waits: list[int], add: Add
) -> None:
    first = min(sets)
    for j, step in enumerate(steps):
        if isinstance(step, ReadResults):
            label = "read_results"
        elif isinstance(step, ReadError) and j > first:
            label = f"read_error: {step.read_error}"
        else:
            continue
        before = [i for i in sets if i < j]
        if not before:
            add(("handshake", j), rule("read_before_trigger", step=label, point=sets[first]))
        elif not any(max(before) < w < j for w in waits):
            add(("handshake", j), rule("read_before_wait", step=label, point=sets[max(before)]))


def check_memory(
    doc: ProfileDoc, points: dict[str, BasePoint], roles: HandshakePoints, add: Add
) -> None:
    """No two writable points share machine memory, and none shares it with a handshake point."""
    handshake = roles.all
    names = list(points)
    for i, a in enumerate(names):
        cells_a = points[a].cells()
        for b in names[:i]:
            shared = cells_a & points[b].cells()
            if not shared:
                continue
            wa, wb = points[a].writable, points[b].writable
            where = describe_cells(shared)
            if wa and b in handshake:
                add(("points", a), _alias(where, b, roles))
            elif wb and a in handshake:
                add(("points", b), _alias(where, a, roles))
            elif wa and wb:
                add(("points", a), rule("points_overlap", cells=where, other=b))
    for op_name, op in doc.operations.items():
        for param, spec in op.parameters.items():
            if spec.point in handshake:
                path = ("operations", op_name, "parameters", param)
                add(
                    path,
                    rule("parameter_on_handshake", point=spec.point, role=roles.role(spec.point)),
                )


def _alias(where: str, other: str, roles: HandshakePoints) -> str:
    return rule("handshake_alias", cells=where, other=other, role=roles.role(other))


def describe_cells(cells: Iterable[tuple[str, int | str]]) -> str:
    """{("holding", 2), ("holding", 3)} -> "holding 2..3"; a node -> "node nsu=...;s=X"."""
    by_area: dict[str, list[int | str]] = {}
    for area, address in cells:
        by_area.setdefault(area, []).append(address)
    parts = []
    for area, addresses in sorted(by_area.items()):
        ordered = sorted(addresses, key=str) if area == "node" else sorted(addresses)
        first, last = ordered[0], ordered[-1]
        parts.append(f"{area} {first}" if first == last else f"{area} {first}..{last}")
    return ", ".join(parts)
