"""Live parameter adjustments: a retained, versioned rule set from the line, applied before the limits.

The line publishes (retained) on ``edge/<gateway_id>/adjustments``::

    {"version": "lot-4711/2",
     "rules": [{"parameter": "feed_rate", "scale": 0.9, "material_lot": "L-4711*"},
               {"parameter": "coolant_temp", "add": 5},
               {"operation": "mill", "program": 2}]}

Each rule may be narrowed to an ``operation``, a ``material_lot`` or a ``variant`` (shell-style
patterns) and does exactly one thing: ``scale`` or ``add`` to a numeric parameter, ``set`` a
parameter, or replace the operation's ``program`` number. A set is validated against the active
profile as a whole (parameters and operations exist, numbers are finite, a program number fits its
point and its limits) before it replaces the previous one; an invalid set is refused with every
reason and the previous one stays. An empty retained message clears the set.

Adjusted values then go through the cycle's own checks: the profile's limits remain the certified
envelope, so an adjustment can never take a parameter outside it. Every cycle report names the
version applied and each change made.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Self

import structlog
from pydantic import Field, ValidationError, model_validator

from ..instructions.model import ParamValue, Step
from ..machine.driver import MachineDriver
from ..machine.profile import INT_RANGES, Profile
from ..machine.values import Refused
from ..messages import event
from ..yamlfile import StrictModel

log = structlog.get_logger("adjustments")

Publish = Callable[[str, dict[str, Any], int], object]


class Rule(StrictModel):
    parameter: str | None = None
    operation: str | None = None
    material_lot: str | None = None  # fnmatch pattern on the traveler's material lot
    variant: str | None = None  # fnmatch pattern on the product variant
    scale: float | None = None
    add: float | None = None
    set: float | int | bool | str | None = Field(None, union_mode="left_to_right")
    program: int | None = None

    @model_validator(mode="after")
    def _one_action(self) -> Self:
        actions = [a for a in ("scale", "add", "set", "program") if getattr(self, a) is not None]
        if len(actions) != 1:
            raise ValueError("give exactly one of scale, add, set, program")
        if actions[0] == "program":
            if self.parameter is not None:
                raise ValueError("'program' replaces the operation's program; drop 'parameter'")
        elif self.parameter is None:
            raise ValueError(f"'{actions[0]}' needs the 'parameter' it applies to")
        for name in ("scale", "add"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number")
        return self

    @property
    def action(self) -> Literal["scale", "add", "set", "program"]:
        for a in ("scale", "add", "set"):
            if getattr(self, a) is not None:
                return a
        return "program"

    def matches(self, operation: str, part: Mapping[str, Any]) -> bool:
        if self.operation is not None and self.operation != operation:
            return False
        for key in ("material_lot", "variant"):
            pattern = getattr(self, key)
            if pattern is not None and not fnmatch.fnmatchcase(str(part.get(key) or ""), pattern):
                return False
        return True


class AdjustmentSet(StrictModel):
    version: str = Field(min_length=1, max_length=100)
    rules: list[Rule] = Field(max_length=200)


@dataclass
class Adjustments:
    """The active adjustment set of a station. ``on_message`` is the uplink handler."""

    gateway_id: str
    profile: Profile
    driver: MachineDriver
    publish: Publish
    active: AdjustmentSet | None = None
    refused: list[str] = field(default_factory=list)

    def on_message(self, topic: str, payload: bytes, properties: Any) -> None:
        if not payload.strip():
            if self.active is not None:
                log.info("adjustments cleared", version=self.active.version)
                self._event("adjustments_cleared", version=self.active.version)
            self.active = None
            return
        try:
            candidate = AdjustmentSet.model_validate(json.loads(payload))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            self._refuse(None, [f"not JSON: {err}"])
            return
        except ValidationError as err:
            version = _version_of(payload)
            self._refuse(version, [_where(e) for e in err.errors()])
            return
        problems = self.check(candidate)
        if problems:
            self._refuse(candidate.version, problems)
            return
        self.active = candidate
        log.info("adjustments active", version=candidate.version, rules=len(candidate.rules))
        self._event("adjustments_applied", version=candidate.version, rules=len(candidate.rules))

    def check(self, candidate: AdjustmentSet) -> list[str]:
        """Every reason the set does not fit the active profile (empty: it fits)."""
        problems = []
        ops = self.profile.operations
        program_point = self.profile.handshake_points.program
        for i, rule in enumerate(candidate.rules):
            where = f"rules[{i}]"
            if rule.operation is not None and rule.operation not in ops:
                problems.append(f"{where}: no operation '{rule.operation}' in the profile")
                continue
            scope = [rule.operation] if rule.operation else list(ops)
            if rule.action == "program":
                if program_point is None:
                    problems.append(f"{where}: the profile's handshake writes no program number")
                    continue
                checked = self.profile.check_value(rule.program, point=program_point)
                if isinstance(checked, Refused):
                    problems.append(f"{where}: {checked.message}")
                    continue
                try:
                    self.driver.encode(program_point, checked.value)
                except ValueError as err:
                    problems.append(f"{where}: {err}")
                continue
            users = [o for o in scope if rule.parameter in ops[o].parameters]
            if not users:
                scope_name = f"operation {rule.operation}" if rule.operation else "no operation"
                verb = "has no" if rule.operation else "has a"
                problems.append(f"{where}: {scope_name} {verb} parameter '{rule.parameter}'")
                continue
            for o in users:  # by address: an alias of a handshake register is refused too
                point_name = ops[o].parameters[str(rule.parameter)].point
                owner = self.profile.handshake_owner(point_name)
                if owner is not None:
                    problems.append(
                        f"{where}: {rule.parameter} writes point '{point_name}', which shares "
                        f"memory with handshake point '{owner}'"
                    )
                    break
            if rule.action in ("scale", "add"):
                for o in users:
                    point = self.profile.points[ops[o].parameters[str(rule.parameter)].point]
                    if point.type.value in ("bool", "string"):
                        problems.append(
                            f"{where}: {rule.action} needs a number, {rule.parameter} is "
                            f"{point.type.value}"
                        )
                        break
        return problems

    def apply(
        self, step: Step, part: Mapping[str, Any]
    ) -> tuple[Step, int | None, dict[str, Any] | None]:
        """``step`` with the active set applied, the program number replacing the operation's
        (or None) and the record for the report. The cycle checks the values afterwards."""
        active = self.active
        if active is None:
            return step, None, None
        op = self.profile.operations.get(step.operation)
        if op is None:
            return step, None, {"version": active.version, "changes": []}
        params: dict[str, ParamValue] = dict(step.parameters)
        changes: list[dict[str, Any]] = []
        program: int | None = None
        for i, rule in enumerate(active.rules):
            if not rule.matches(step.operation, part):
                continue
            if rule.action == "program":
                changes.append({"rule": i, "program": rule.program, "was": op.program})
                program = rule.program
                continue
            name = str(rule.parameter)
            spec = op.parameters.get(name)
            if spec is None:
                continue
            was = params.get(name, spec.default)
            if was is None:
                continue  # missing: the cycle rejects the step and names it
            now = _act(rule, was, self.profile.points[spec.point].type in INT_RANGES)
            if now is None:
                continue
            params[name] = now
            changes.append({"rule": i, "parameter": name, "was": was, "now": now})
        record = {"version": active.version, "changes": changes}
        return Step(step.operation, params, step.station), program, record

    def take_over(self, previous: Adjustments) -> None:
        """This station replaces ``previous``: keep its set only if it fits the new profile."""
        self.active, self.refused = previous.active, previous.refused
        if self.active is not None:
            problems = self.check(self.active)
            if problems:
                version, self.active = self.active.version, None
                self._refuse(version, problems)

    def state(self) -> dict[str, Any]:
        active = self.active
        return {
            "version": active.version if active else None,
            "rules": len(active.rules) if active else 0,
            **({"last_refused": self.refused} if self.refused else {}),
        }

    def _refuse(self, version: str | None, problems: list[str]) -> None:
        self.refused = problems
        keep = self.active.version if self.active else None
        log.warning("adjustments refused", version=version, problems=problems, kept=keep)
        self._event("adjustments_refused", version=version, problems=problems, kept=keep)

    def _event(self, name: str, **fields: Any) -> None:
        self.publish("events", event(self.gateway_id, name, **fields), 1)


def _act(rule: Rule, was: ParamValue, integral: bool) -> ParamValue | None:
    if rule.action == "set":
        return rule.set
    if isinstance(was, bool) or not isinstance(was, int | float):
        return None  # a number rule on text: check() refuses it for the profile; be safe anyway
    value = was * rule.scale if rule.scale is not None else was + (rule.add or 0.0)
    value = round(value, 9)  # 320.5 * 0.9 is 288.45000000000005 in binary
    if integral and isinstance(was, int) and float(value).is_integer():
        return int(value)
    return value


def _where(error: Any) -> str:
    loc = ".".join(str(x) for x in error["loc"])
    return f"{loc}: {error['msg']}" if loc else str(error["msg"])


def _version_of(payload: bytes) -> str | None:
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    version = data.get("version") if isinstance(data, dict) else None
    return version if isinstance(version, str) else None
