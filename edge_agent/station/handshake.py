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
from ..machine.driver import MachineDriver, RawValue
from ..machine.profile import (
    CallMethod,
    HandshakeStep,
    Operation,
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


async def run_handshake(
    driver: MachineDriver,
    steps: list[HandshakeStep],
    operation: Operation,
    encoded: Mapping[str, RawValue],
    parameters: Mapping[str, Any],
) -> HandshakeOutcome:
    """Run ``steps``.

    ``encoded`` maps point name -> wire value of every parameter, already checked against the
    profile; ``parameters`` maps recipe parameter name -> engineering value (for method calls).
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
            if operation.results:
                out.results.update(await driver.read(operation.results))
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
            problems.append(f"{type(step).__name__}: {err or 'timed out'}")
            log.error(
                "abort step failed; check the machine",
                device=driver.device,
                step=step.model_dump(),
                error=str(err),
            )
    return problems


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000
