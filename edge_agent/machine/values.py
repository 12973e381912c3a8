"""Is a value acceptable for a point, and what exactly will the machine hold? The one rule.

A value is judged by what the machine will hold, not by what was asked: the number after scale,
offset and rounding to the register grid, decoded back to engineering units. That held value is
compared with the limits, written to the machine and reported. The station cycle, ``write``
commands, adjustments and the profile validator (program numbers, defaults, handshake constants)
all ask ``check_value``; none of them compares a value with a limit itself.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from . import codec
from .codec import INT_RANGES, PointType

if TYPE_CHECKING:
    from .profile_schema import BasePoint


class Refusal(StrEnum):
    """Why a value was refused; the stable codes of cycle reports."""

    OUT_OF_LIMITS = "out_of_limits"  # a well-formed value the machine must not receive
    INVALID = "invalid_parameters"  # not a value of the point's kind at all


#: Every message a refusal can carry ({label} is the parameter or point name). docs/firmware-profiles.md
#: lists them under "Safety rules"; a test keeps the two equal.
VALUE_RULES: dict[str, str] = {
    "not_bool": "{label}={value!r} must be true or false",
    "not_text": "{label}={value!r} must be text",
    "text_too_long": "{label}={value!r} is {size} characters long, the point holds at most {length}",
    "not_number": "{label}={value!r} must be a number",
    "not_finite": "{label}={value} is not a finite number",
    "does_not_fit": "{label}: {value} does not fit {type} (representable range {lo}..{hi})",
    "below_min": "{label}={value}{unit} is outside the safe range: below minimum {min}{unit}",
    "above_max": "{label}={value}{unit} is outside the safe range: above maximum {max}{unit}",
    "held_below_min": (
        "{label}={value}{unit} is written as {held}{unit}, outside the safe range: "
        "below minimum {min}{unit}"
    ),
    "held_above_max": (
        "{label}={value}{unit} is written as {held}{unit}, outside the safe range: "
        "above maximum {max}{unit}"
    ),
}


@dataclass(frozen=True)
class Accepted:
    """The value may go to the machine; ``value`` is what the machine will hold."""

    value: codec.Value  # engineering value after scale, offset and rounding, decoded back
    raw: codec.Value  # the machine's own number (register integer, float32), bool or text
    requested: Any  # as it was given

    @property
    def rounded(self) -> bool:
        """The machine holds another value than the one asked for (the register grid)."""
        return bool(self.value != self.requested)


@dataclass(frozen=True)
class Refused:
    """The value must not go to the machine, and why, in words."""

    reason: Refusal
    message: str
    rule: str  # key of VALUE_RULES


def check_value(
    point: BasePoint, value: Any, *, label: str, lo: float | None, hi: float | None
) -> Accepted | Refused:
    """Whether ``value`` may be written to ``point`` within [lo, hi], and what the machine holds."""
    if point.type is PointType.BOOL:
        if isinstance(value, bool):
            return Accepted(value, value, value)
        return _refuse(Refusal.INVALID, "not_bool", label=label, value=value)
    if point.type is PointType.STRING:
        if not isinstance(value, str):
            return _refuse(Refusal.INVALID, "not_text", label=label, value=value)
        if point.length is not None and len(value) > point.length:
            return _refuse(
                Refusal.INVALID,
                "text_too_long",
                label=label,
                value=value,
                size=len(value),
                length=point.length,
            )
        return Accepted(value, value, value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _refuse(Refusal.INVALID, "not_number", label=label, value=value)
    if not math.isfinite(value):
        return _refuse(Refusal.INVALID, "not_finite", label=label, value=value)
    unit = f" {point.unit}" if point.unit else ""
    fmt = grid(point)
    try:
        raw, held = codec.hold(fmt, value, label)
    except ValueError:
        outside = _outside(value, value, lo, hi, label=label, unit=unit)
        if outside is not None:
            return outside
        rep_lo, rep_hi = fmt.representable()
        return _refuse(
            Refusal.INVALID,
            "does_not_fit",
            label=label,
            value=value,
            type=describe_grid(point),
            lo=show(rep_lo),
            hi=show(rep_hi),
        )
    outside = _outside(value, held, lo, hi, label=label, unit=unit)
    return outside if outside is not None else Accepted(held, raw, value)


def off_grid(point: BasePoint, limit: float) -> tuple[float | int, list[float | int]] | None:
    """When ``limit`` is not a value the point can hold: (what it would hold, the nearest values
    it can hold; empty for floats). None when it is on the grid or cannot be held at all."""
    if point.type not in INT_RANGES and point.type not in (PointType.F32, PointType.F64):
        return None
    fmt = grid(point)
    try:
        raw, held = codec.hold(fmt, limit, "limit")
    except ValueError:
        return None  # not representable: its own rule says so
    if held == limit:
        return None
    if point.type not in INT_RANGES:
        return held, []
    lo, hi = INT_RANGES[point.type]
    steps = [r for r in (int(raw) - 1, int(raw), int(raw) + 1) if lo <= r <= hi]
    values = sorted(codec.to_engineering(fmt, r) for r in steps)
    below = [v for v in values if v < limit][-1:]
    above = [v for v in values if v > limit][:1]
    return held, below + above


def grid(point: BasePoint) -> codec.Format:
    """The point's value grid: type, scale and offset (the register layout does not matter)."""
    return _grid(point.type, point.scale, point.offset)


@functools.lru_cache(maxsize=1024)
def _grid(type_: PointType, scale: float, offset: float) -> codec.Format:
    return codec.Format(type=type_, scale=scale, offset=offset)


def describe_grid(point: BasePoint) -> str:
    if point.scale == 1.0 and point.offset == 0.0:
        return point.type.value
    return f"{point.type.value} with scale {show(point.scale)} and offset {show(point.offset)}"


def show(x: float | int) -> str:
    """A number as a person writes it: 12000, not 12000.0 or 1.2e+04."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return repr(x) if isinstance(x, float) else str(x)


def _outside(
    value: float | int,
    held: float | int,
    lo: float | None,
    hi: float | None,
    *,
    label: str,
    unit: str,
) -> Refused | None:
    same = held == value
    if lo is not None and held < lo:
        rule = "below_min" if same else "held_below_min"
        return _refuse(
            Refusal.OUT_OF_LIMITS,
            rule,
            label=label,
            value=value,
            held=show(held),
            min=show(lo),
            unit=unit,
        )
    if hi is not None and held > hi:
        rule = "above_max" if same else "held_above_max"
        return _refuse(
            Refusal.OUT_OF_LIMITS,
            rule,
            label=label,
            value=value,
            held=show(held),
            max=show(hi),
            unit=unit,
        )
    return None


def _refuse(reason: Refusal, rule: str, **fields: Any) -> Refused:
    return Refused(reason, VALUE_RULES[rule].format(**fields), rule)
