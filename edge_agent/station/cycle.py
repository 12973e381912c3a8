"""The station cycle: one part, one step, from the tag to the cycle report.

    tag arrives -> read NDEF -> decode + verify signature and UID binding -> pick the next undone
    step and check it is this station's -> check every value against the profile BEFORE any write
    -> write -> handshake -> read results -> write progress onto the tag -> publish the report

Write-ahead: before the machine is touched, the report is committed as it would read if the agent
died then (``interrupted``), and again before the tag is written back (the tag write ``unknown``);
the final report replaces it. So a crash at any instant still leaves a report for every machine
cycle, and a tag never says done without a report behind it. When the report cannot be committed
(outbox unwritable), the part is refused (``not_recording``) with the machine untouched.

Three outcomes, each a report: ``ok``; ``rejected`` (the machine was not touched); ``failed`` (the
machine was touched and the abort steps ran so it is left with its trigger reset). A report is
published for every tag event that reached the cycle, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from ..errors import EdgeAgentError, MachineError, MachineFault, PartRejected, TagIOError
from ..instructions.format import TagContents, decode_tag, update_progress
from ..instructions.model import ParamValue, Step, StepRecord, StepStatus
from ..instructions.signing import KeyRing
from ..machine.driver import MachineDriver, RawValue
from ..machine.profile import Operation, PointType, Profile
from ..tag.reader import ScanEvent, TagReader
from .handshake import run_abort, run_handshake

log = structlog.get_logger("cycle")

Publish = Callable[[dict[str, Any]], object]
#: The line's live adjustments (``line/adjustments.py``): step, part ->
#: (adjusted step, program number replacing the operation's or None, record for the report).
Adjust = Callable[[Step, dict[str, Any]], tuple[Step, int | None, dict[str, Any] | None]]


@dataclass(frozen=True)
class WriteAhead:
    """Where the cycle commits its report ahead of the machine and the tag (the outbox)."""

    #: Commit the report as given, unsent; raises EdgeAgentError when it cannot be stored.
    hold: Callable[[dict[str, Any]], object]
    #: The final report, replacing the held one.
    release: Callable[[dict[str, Any]], object]


@dataclass
class CycleReport:
    """Everything the line needs to know about one cycle. Serialised by ``as_message()``."""

    gateway_id: str
    station: str
    tag_uid: str
    status: str = "rejected"  # ok | rejected | failed
    reason: str | None = None  # stable code for rejected/failed
    error: str | None = None  # the message for a person
    part: dict[str, Any] = field(default_factory=dict)
    step: dict[str, Any] | None = None
    parameters: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    durations_ms: dict[str, float] = field(default_factory=dict)
    key_id: str | None = None
    tag_write: str = "skipped"  # ok | skipped | failed: <why>
    machine_state: str = (
        "untouched"  # untouched | cycle complete | aborted (trigger reset) | abort failed: ...
    )
    profile: dict[str, str] = field(default_factory=dict)
    adjustments: dict[str, Any] | None = None  # version applied and each change; None: no set
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds"))

    def as_message(self) -> dict[str, Any]:
        return {"schema": "edge-agent/cycle/1", **self.__dict__}


class StationCycle:
    """Runs cycles one at a time for one station (one reader, one machine)."""

    def __init__(
        self,
        *,
        gateway_id: str,
        station: str,
        profile: Profile,
        driver: MachineDriver,
        keyring: KeyRing,
        reader: TagReader,
        publish: Publish,
        write_back: bool = True,
        adjust: Adjust | None = None,
        write_ahead: WriteAhead | None = None,
    ) -> None:
        self.gateway_id = gateway_id
        self.station = station
        self.profile = profile
        self.driver = driver
        self.keyring = keyring
        self.reader = reader
        self.publish = publish
        self.write_back = write_back
        self.adjust = adjust
        self.write_ahead = write_ahead
        self._held = False  # this cycle's report is committed ahead: the final one replaces it
        self.busy = False
        # Set when the abort steps could not run (machine unreachable): retried before the next cycle.
        self._abort_pending: Operation | None = None

    async def run(self, event: ScanEvent) -> CycleReport:
        """One full cycle for the tag of ``event``. Never raises, except CancelledError."""
        started = time.perf_counter()
        report = CycleReport(self.gateway_id, self.station, event.uid.hex().upper())
        report.profile = {
            "name": self.profile.name,
            "version": self.profile.version,
            "hash": self.profile.content_hash,
        }
        self.busy = True
        self._held = False
        try:
            await self._cycle(event, report, started)
        except Exception as err:
            # A defect, not a machine or tag problem: still a report, then the supervisor's turn.
            report.status, report.reason = "failed", "internal_error"
            report.error = f"unexpected error in the station cycle: {err}"
            if self._held and report.machine_state == "untouched":
                report.machine_state = "unknown: the cycle stopped on an unexpected error"
            raise
        finally:
            self.busy = False
            report.durations_ms["total"] = _ms(started)
            message = report.as_message()
            if self._held and self.write_ahead is not None:
                self.write_ahead.release(message)
            else:
                self.publish(message)
            _log_report(report)
        return report

    def _hold(self, report: CycleReport, **if_we_die_now: Any) -> bool:
        """Write ahead: commit the report as it must read if the agent dies from here on.

        False when it cannot be committed: the caller then touches neither machine nor tag.
        """
        if self.write_ahead is None:
            return True
        try:
            self.write_ahead.hold({**report.as_message(), **if_we_die_now})
        except EdgeAgentError as err:
            log.error("report cannot be recorded ahead", tag=report.tag_uid, error=str(err))
            return False
        self._held = True
        return True

    async def _cycle(self, event: ScanEvent, report: CycleReport, started: float) -> None:
        uid = event.uid
        contents: TagContents | None = None
        index = -1
        program: int | None = None
        try:
            t0 = time.perf_counter()
            message = await self.reader.read_ndef(uid)
            report.durations_ms["tag_read"] = _ms(t0)

            t0 = time.perf_counter()
            contents = decode_tag(message, uid, self.keyring)
            traveler = contents.traveler
            report.key_id = traveler.key_id
            report.part = _part(contents)
            index = self.select_step(contents)
            step = traveler.steps[index]
            report.step = {
                "index": index,
                "count": len(traveler.steps),
                "operation": step.operation,
            }
            if self.adjust is not None:
                # Before the limit check: the profile's limits stay the certified envelope.
                step, program, report.adjustments = self.adjust(step, report.part)
            encoded, report.parameters = self.prepare(step, report.tag_uid, index)
            report.durations_ms["verify"] = _ms(t0)
        except PartRejected as err:
            report.status, report.reason, report.error = "rejected", err.reason, str(err)
            return
        except TagIOError as err:
            report.status, report.reason, report.error = "failed", "tag_read_failed", str(err)
            return

        operation = self.profile.operations[step.operation]
        if program is not None:
            operation = operation.model_copy(update={"program": program})
        if not self._hold(report, **_INTERRUPTED):
            report.reason = "not_recording"
            report.error = (
                "cycle reports cannot be stored (outbox): part not taken, machine untouched"
            )
            return
        if self._abort_pending is not None:
            # The last failure could not reset the machine (it was unreachable). Do that first:
            # a trigger left high would swallow this cycle's rising edge.
            state = await self._abort(self._abort_pending)
            if state.startswith("abort failed"):
                report.status, report.reason = "failed", "machine_error"
                report.error = f"machine not brought back to idle after the last failure: {state}"
                report.machine_state = state
                return
        try:
            outcome = await run_handshake(
                self.driver, self.profile.handshake, operation, encoded, dict(step.parameters)
            )
        except (MachineError, ValueError) as err:
            report.status, report.reason, report.error = "failed", _machine_reason(err), str(err)
            report.machine_state = await self._abort(operation)
            await self._write_progress(contents, index, StepStatus.FAILED, report)
            return
        except asyncio.CancelledError:
            # Shutdown reached us mid-handshake: leave the machine idle, report, then stop.
            report.status, report.reason, report.error = (
                "failed",
                "shutdown",
                "agent stopped during the cycle",
            )
            abort = asyncio.ensure_future(self._abort(operation))
            while not abort.done():  # a repeated cancel must not cut the abort short
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(abort)
            report.machine_state = abort.result()
            raise
        report.durations_ms.update(
            machine_write=outcome.write_ms,
            machine_cycle=outcome.machine_ms,
            machine_read=outcome.read_ms,
        )
        report.results = {k: _jsonable(v) for k, v in outcome.results.items()}
        report.status, report.machine_state = "ok", "cycle complete"
        await self._write_progress(contents, index, StepStatus.OK, report)

    # ------------------------------------------------------------------ decisions before any write

    def _mine(self, step: Step) -> bool:
        return step.station in (None, self.station) and step.operation in self.profile.operations

    def select_step(self, contents: TagContents) -> int:
        """Index of the step this station runs now, or PartRejected saying why there is none."""
        steps = contents.traveler.steps
        progress = contents.progress
        uid = contents.traveler.tag_uid.hex().upper()
        index = progress.next_undone(len(steps))
        if index is None:
            raise PartRejected("complete", f"tag {uid}: all {len(steps)} steps are done")
        step = steps[index]
        if self._mine(step):
            return index
        later = [
            j for j in range(index + 1, len(steps)) if not progress.done(j) and self._mine(steps[j])
        ]
        if later:
            raise PartRejected(
                "out_of_sequence",
                f"tag {uid}: step {later[0] + 1} ({steps[later[0]].operation}) is for this station, "
                f"but step {index + 1} ({step.operation}) is not done yet",
            )
        if step.station not in (None, self.station):
            raise PartRejected(
                "wrong_station",
                f"tag {uid}: next step {index + 1} ({step.operation}) is for station {step.station}, this is {self.station}",
            )
        raise PartRejected(
            "unknown_operation",
            f"tag {uid}: step {index + 1} asks for operation '{step.operation}', which profile "
            f"{self.profile.name} {self.profile.version} does not support "
            f"(supported: {', '.join(sorted(self.profile.operations))})",
        )

    def prepare(
        self, step: Step, uid: str, index: int
    ) -> tuple[dict[str, RawValue], list[dict[str, Any]]]:
        """Check every parameter against the profile and encode it. Nothing is written here.

        Every problem is collected, so the rejection names them all at once.
        """
        operation = self.profile.operations[step.operation]
        problems: list[str] = []
        unknown = sorted(set(step.parameters) - set(operation.parameters))
        if unknown:
            problems.append(
                f"unknown parameter(s) {', '.join(unknown)} for operation {step.operation}"
            )
        encoded: dict[str, RawValue] = {}
        listed: list[dict[str, Any]] = []
        for name, spec in operation.parameters.items():
            value = step.parameters.get(name, spec.default)
            if value is None:
                problems.append(f"{name} is missing")
                continue
            point = self.profile.points[spec.point]
            problem = _check_value(
                name,
                value,
                point.type,
                *self.profile.parameter_limits(step.operation, name),
                point.unit,
            )
            if problem is None:
                try:
                    encoded[spec.point] = self.driver.encode(spec.point, value)
                except ValueError as err:
                    problem = f"{name}: {err}"
            if problem is not None:
                problems.append(problem)
                continue
            listed.append(
                {
                    "name": name,
                    "value": value,
                    "unit": point.unit,
                    "point": spec.point,
                    "raw": self.driver.raw_for_report(encoded[spec.point]),
                }
            )
        if problems:
            reason = (
                "out_of_limits"
                if not unknown and all("outside" in p for p in problems)
                else "invalid_parameters"
            )
            raise PartRejected(
                reason, f"tag {uid}: step {index + 1} ({step.operation}): " + "; ".join(problems)
            )
        return encoded, listed

    # ------------------------------------------------------------------ after the machine

    async def _abort(self, operation: Operation) -> str:
        problems = await run_abort(self.driver, self.profile.on_abort, operation)
        self._abort_pending = operation if problems else None
        return "aborted (trigger reset)" if not problems else "abort failed: " + "; ".join(problems)

    async def _write_progress(
        self, contents: TagContents, index: int, status: StepStatus, report: CycleReport
    ) -> None:
        if not self.write_back:
            return
        if not self._hold(report, tag_write="unknown: the agent stopped during the tag write-back"):
            report.tag_write = "failed: not written, the report could not be stored first"
            return
        t0 = time.perf_counter()
        record = StepRecord(status, self.station, int(time.time()))
        progress = contents.progress.with_record(index, record, len(contents.traveler.steps))
        try:
            message = update_progress(contents, progress)
            await self.reader.write_ndef(
                contents.traveler.tag_uid, message, previous=contents.message
            )
            report.tag_write = "ok"
        except (TagIOError, ValueError) as err:
            # The result is not lost: it is in this report. The tag just does not show it yet.
            report.tag_write = f"failed: {err}"
        except Exception as err:  # e.g. PermissionError from a reader: this part, not the station
            log.exception("tag write-back failed unexpectedly", tag=report.tag_uid)
            report.tag_write = f"failed: {err}"
        report.durations_ms["tag_write"] = _ms(t0)


#: The report as committed before the machine is touched: what stands if the agent dies mid-cycle.
_INTERRUPTED: dict[str, Any] = {
    "status": "failed",
    "reason": "interrupted",
    "error": "the agent stopped during the cycle (crash or power loss); the machine may have run it",
    "machine_state": "unknown: the agent stopped during the cycle",
}


def _check_value(
    name: str,
    value: ParamValue,
    type_: PointType,
    lo: float | None,
    hi: float | None,
    unit: str | None,
) -> str | None:
    if type_ is PointType.BOOL:
        return None if isinstance(value, bool) else f"{name}={value!r} must be true or false"
    if type_ is PointType.STRING:
        return None if isinstance(value, str) else f"{name}={value!r} must be text"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{name}={value!r} must be a number"
    if not math.isfinite(value):
        return f"{name}={value} is not a finite number"
    if (
        type_ not in (PointType.F32, PointType.F64)
        and isinstance(value, float)
        and not value.is_integer()
        and False
    ):
        return None
    u = f" {unit}" if unit else ""
    if lo is not None and value < lo:
        return f"{name}={value}{u} is outside the safe range: below minimum {lo:g}{u}"
    if hi is not None and value > hi:
        return f"{name}={value}{u} is outside the safe range: above maximum {hi:g}{u}"
    return None


def _machine_reason(err: Exception) -> str:
    if isinstance(err, MachineFault):
        return "machine_fault"  # the machine answered and said no (error code, done never came)
    if isinstance(err, ValueError):
        return "encoding_error"
    return "machine_error"  # connection or protocol


def _part(contents: TagContents) -> dict[str, Any]:
    t = contents.traveler
    return {
        "id": t.part_id,
        "product": t.product,
        "variant": t.variant,
        "order": t.order,
        "material_lot": t.material_lot,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.hex()
    return value


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


def _log_report(report: CycleReport) -> None:
    fields = {
        "tag": report.tag_uid,
        "part": report.part.get("id"),
        "step": report.step
        and f"{report.step['index'] + 1}/{report.step['count']} {report.step['operation']}",
        "ms": report.durations_ms.get("total"),
    }
    if report.status == "ok":
        log.info("cycle ok", **fields, tag_write=report.tag_write)
    elif report.status == "rejected":
        log.warning("part rejected", **fields, reason=report.reason, error=report.error)
    else:
        log.error(
            "cycle failed",
            **fields,
            reason=report.reason,
            error=report.error,
            machine=report.machine_state,
        )
