"""Run a profile's declared handshake on a machine driver.

The steps are data (see ``machine/profile.py``); this module gives each its meaning. On any failure
the profile's ``on_abort`` steps run, each one attempted even if an earlier one fails, so the
machine is left with its trigger reset.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..errors import MachineError, MachineFault
from ..machine.driver import MachineDriver, RawValue, show_value, values_equal
from ..machine.profile_schema import Operation
from ..machine.steps import (
    CallMethod,
    HandshakeStep,
    ReadError,
    ReadResults,
    ResetPoint,
    SetPoint,
    WaitFor,
    WriteParameters,
    WritePoint,
)

log = structlog.get_logger("handshake")


@dataclass
class HandshakeOutcome:
    results: dict[str, Any] = field(default_factory=dict)
    write_ms: float = 0.0  # parameter write
    machine_ms: float = 0.0  # from trigger to done
    read_ms: float = 0.0
    triggered: bool = False
    counter: Any = None  # the cycle counter after the cycle, when one was asked for


@dataclass(frozen=True)
class IdleRule:
    """What a machine ready for a new cycle looks like, derived from the handshake.

    Every trigger the handshake sets reads false, and no condition it then waits for (before it
    resets that trigger) already holds: were one true, the wait would end at once and report a
    cycle the machine never ran for this part.
    """

    triggers: tuple[str, ...]
    waits: tuple[tuple[str, Any, str], ...]  # (point, value the handshake waits for, its trigger)
    resets_all: bool  # the normal path resets every trigger it sets: idle again afterwards

    @property
    def points(self) -> list[str]:
        return list(dict.fromkeys([*self.triggers, *(w[0] for w in self.waits)]))

    def problems(self, values: Mapping[str, Any]) -> list[str]:
        """Why ``values`` (read from the machine) are not idle, in words; empty when idle."""
        found = [
            f"{t} is already {show_value(values[t])}: the cycle starts by setting it"
            for t in self.triggers
            if not values_equal(values[t], False)
        ]
        for point, expected, trigger in self.waits:
            if values_equal(values[point], expected):
                found.append(
                    f"{point} is already {show_value(expected)}, the value the cycle waits for "
                    f"after setting {trigger}"
                )
        return found


def idle_rule(steps: list[HandshakeStep]) -> IdleRule:
    armed: list[str] = []  # triggers set and not yet reset at this point of the handshake
    triggers: list[str] = []
    waits: list[tuple[str, Any, str]] = []
    for step in steps:
        if isinstance(step, SetPoint):
            armed.append(step.set)
            triggers.append(step.set)
        elif isinstance(step, ResetPoint) and step.reset in armed:
            armed.remove(step.reset)
        elif isinstance(step, WaitFor) and armed:
            waits.append((step.wait, step.equals, armed[-1]))
    return IdleRule(tuple(dict.fromkeys(triggers)), tuple(waits), resets_all=not armed)


async def run_handshake(
    driver: MachineDriver,
    steps: list[HandshakeStep],
    operation: Operation,
    encoded: Mapping[str, RawValue],
    parameters: Mapping[str, Any],
    *,
    counter: str | None = None,
) -> HandshakeOutcome:
    """Run ``steps``.

    ``encoded`` maps point name -> wire value of every parameter, already checked against the
    profile; ``parameters`` maps recipe parameter name -> engineering value (for method calls).
    ``counter``: a cycle counter point, read with the results (in the same request where the
    protocol allows) or, without a ``read_results`` step, at the end.
    """
    out = HandshakeOutcome()
    triggered_at: float | None = None
    for step in steps:
        t0 = time.perf_counter()
        if isinstance(step, WriteParameters):
            await driver.write(encoded)
            out.write_ms += _ms(t0)
        elif isinstance(step, WritePoint):
            value = operation.program if step.value is None else step.value
            await driver.write({step.write: driver.encode(step.write, value)})
            out.write_ms += _ms(t0)
        elif isinstance(step, SetPoint):
            await driver.write({step.set: driver.encode(step.set, True)})
            out.triggered = True
            triggered_at = t0
        elif isinstance(step, ResetPoint):
            await driver.write({step.reset: driver.encode(step.reset, False)})
        elif isinstance(step, WaitFor):
            await driver.wait_until(step.wait, step.equals, step.timeout)
            if triggered_at is not None:  # machine time: from the trigger to the end of the wait
                out.machine_ms = _ms(triggered_at)
                triggered_at = None
        elif isinstance(step, ReadResults):
            wanted = [*operation.results, counter] if counter else operation.results
            if wanted:
                values = await driver.read(wanted)
                out.results.update((name, values[name]) for name in operation.results)
                if counter:
                    out.counter = values[counter]
            out.read_ms += _ms(t0)
        elif isinstance(step, ReadError):
            code = (await driver.read([step.read_error]))[step.read_error]
            if code != step.ok:
                raise MachineFault(
                    f"machine reports error code {code} at point '{step.read_error}'",
                    device=driver.device,
                    code=int(code),
                )
        elif isinstance(step, CallMethod):
            call = getattr(driver, "call", None)
            if call is None:
                raise MachineError(
                    f"driver cannot call methods (step 'call: {step.call}')",
                    device=driver.device,
                    retryable=False,
                )
            outputs = await call(step.call, _args(step, operation, encoded))
            out.results.update(zip(step.results, outputs, strict=False))
    if counter and out.counter is None:
        out.counter = (await driver.read([counter]))[counter]
    if out.machine_ms < 0:
        out.machine_ms = 0.0
    return out


def _args(
    step: CallMethod, operation: Operation, encoded: Mapping[str, RawValue]
) -> list[RawValue]:
    # `args` names recipe parameters; `encoded` is keyed by the point each one is written to.
    missing = [name for name in step.args if name not in operation.parameters]
    if missing:
        raise ValueError(
            f"call {step.call}: no parameter(s) {', '.join(missing)} in this operation"
        )
    return [encoded[operation.parameters[name].point] for name in step.args]


async def run_abort(
    driver: MachineDriver, steps: list[HandshakeStep], operation: Operation
) -> list[str]:
    """Bring the machine to its defined idle state. Returns the problems met (empty: clean)."""
    problems = []
    for step in steps:
        try:
            await asyncio.wait_for(run_handshake(driver, [step], operation, {}, {}), timeout=5)
        except (MachineError, TimeoutError, ValueError) as err:
            problems.append(f"could not {describe(step)}: {err or 'no answer within 5 s'}")
            log.error(
                "abort step failed; check the machine",
                device=driver.device,
                step=step.model_dump(),
                error=str(err),
            )
    return problems


def describe(step: HandshakeStep) -> str:
    """A handshake step in words, for messages: 'reset trigger', 'wait for done to be false'."""
    if isinstance(step, SetPoint):
        return f"set {step.set}"
    if isinstance(step, ResetPoint):
        return f"reset {step.reset}"
    if isinstance(step, WritePoint):
        value = "the program number" if step.value is None else show_value(step.value)
        return f"write {value} to {step.write}"
    if isinstance(step, WaitFor):
        return f"wait for {step.wait} to be {show_value(step.equals)}"
    if isinstance(step, ReadError):
        return f"read the error code {step.read_error}"
    if isinstance(step, CallMethod):
        return f"call {step.call}"
    if isinstance(step, WriteParameters):
        return "write the parameters"
    return "read the results"


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000
