"""The station cycle: one part, one step, from the tag to the cycle report.

    tag arrives -> read NDEF -> decode + verify signature and UID binding -> pick the next undone
    step and check it is this station's -> check every value against the profile BEFORE any write
    -> write -> handshake -> read results -> write progress onto the tag -> publish the report

Write-ahead: before the machine is touched, the report is committed as it would read if the agent
died then (``interrupted``), and again before the tag is written back (the tag write ``unknown``);
the final report replaces it. So a crash at any instant still leaves a report for every machine
cycle, and a tag never says done without a report behind it. When the report cannot be committed
(outbox unwritable), the part is refused (``not_recording``) with the machine untouched.

Three outcomes, each a report: ``ok``; ``rejected`` (the machine was not touched, e.g. because it
cannot be reached: ``machine_unavailable``); ``failed`` (the
machine was touched and the abort steps ran so it is left with its trigger reset). A report is
published for every tag event that reached the cycle, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ..errors import (
    EdgeAgentError,
    MachineError,
    MachineFault,
    PartRejected,
    Reason,
    TagIOError,
)
from ..instructions.codec import TagContents, decode_tag, update_progress
from ..instructions.model import ParamValue, Step, StepRecord, StepStatus
from ..instructions.signing import KeyRing
from ..machine.driver import MachineDriver, RawValue
from ..machine.profile import Profile
from ..machine.values import Refusal, Refused
from ..messages import jsonable as _jsonable
from ..messages import uid_hex
from ..tag.reader import ScanEvent, TagReader
from .handshake import run_handshake
from .idle import IdleGuard
from .report import CycleReport, IfStopped, Part, Status

log = structlog.get_logger("cycle")

#: Where a report that was not held ahead goes: to every output.
Publish = Callable[[CycleReport], object]
#: The line's live adjustments (``line/adjustments.py``): step, part ->
#: (adjusted step, program number replacing the operation's or None, record for the report).
Adjust = Callable[[Step, Part], tuple[Step, int | None, dict[str, Any] | None]]


@dataclass(frozen=True)
class WriteAhead:
    """Where the cycle commits its report ahead of the machine and the tag (the outbox)."""

    #: Commit the report as it reads with ``IfStopped``, unsent; raises EdgeAgentError when it
    #: cannot be stored.
    hold: Callable[[CycleReport, IfStopped], object]
    #: The final report, replacing the held one.
    release: Callable[[CycleReport], object]


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
        state_dir: Path | None = None,
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
        self.idle = IdleGuard(profile, driver, state_dir)

    def take_over(self, previous: StationCycle) -> None:
        """Go on where ``previous`` (the cycle of the station this one replaces) left off."""
        self.idle.take_over(previous.idle)

    async def run(self, event: ScanEvent) -> CycleReport:
        """One full cycle for the tag of ``event``. Never raises, except CancelledError."""
        started = time.perf_counter()
        report = CycleReport(self.gateway_id, self.station, uid_hex(event.uid))
        report.profile = self.profile.describe()
        self.busy = True
        self._held = False
        try:
            await self._cycle(event, report, started)
        except Exception as err:
            # A defect, not a machine or tag problem: still a report, then the supervisor's turn.
            report.status, report.reason = Status.FAILED, Reason.INTERNAL_ERROR
            report.error = f"unexpected error in the station cycle: {err}"
            if self._held and report.machine_state == "untouched":
                report.machine_state = "unknown: the cycle stopped on an unexpected error"
            raise
        finally:
            self.busy = False
            report.durations_ms["total"] = _ms(started)
            if self._held and self.write_ahead is not None:
                self.write_ahead.release(report)
            else:
                self.publish(report)
            _log_report(report)
        return report

    def _hold(self, report: CycleReport, if_we_die_now: IfStopped) -> bool:
        """Write ahead: commit the report as it must read if the agent dies from here on.

        False when it cannot be committed: the caller then touches neither machine nor tag.
        """
        if self.write_ahead is None:
            return True
        try:
            self.write_ahead.hold(report, if_we_die_now)
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
            report.status, report.reason, report.error = Status.REJECTED, err.reason, str(err)
            return
        except TagIOError as err:
            report.status, report.reason = Status.FAILED, Reason.TAG_READ_FAILED
            report.error = str(err)
            return

        operation = self.profile.operations[step.operation]
        if program is not None:
            operation = operation.model_copy(update={"program": program})
        try:
            await self.idle.reachable(report.tag_uid)
        except PartRejected as err:
            report.status, report.reason, report.error = Status.REJECTED, err.reason, str(err)
            return
        if not self._hold(report, _INTERRUPTED):  # committed before anything is written
            report.reason = Reason.NOT_RECORDING
            report.error = (
                "cycle reports cannot be stored (outbox): part not taken, machine untouched"
            )
            return
        counter = self.profile.cycle_counter
        try:
            # A trigger left high, or a done already true, would let the handshake report a cycle
            # the machine never ran for this part: the machine is shown idle first.
            counted = await self.idle.make_idle(operation, counter, report)
        except PartRejected as err:
            report.status, report.reason, report.error = Status.REJECTED, err.reason, str(err)
            return
        except MachineError as err:
            report.status, report.reason = Status.FAILED, _machine_reason(err)
            report.error = f"could not check that the machine is idle before starting: {err}"
            return
        except asyncio.CancelledError:
            report.status, report.reason = Status.FAILED, Reason.SHUTDOWN
            report.error = (
                "agent stopped before the cycle started; the part's values were not written"
            )
            raise
        try:
            self.idle.journal.mark(step.operation, operation.program)  # durable before the trigger
            outcome = await run_handshake(
                self.driver,
                self.profile.handshake,
                operation,
                encoded,
                dict(step.parameters),
                counter=counter,
            )
            if counter is not None:
                self.idle.check_counter(counter, counted, outcome.counter)
        except (MachineError, ValueError) as err:
            report.status, report.reason = Status.FAILED, _machine_reason(err)
            report.error = str(err)
            report.machine_state = await self.idle.abort(operation)
            await self._write_progress(contents, index, StepStatus.FAILED, report)
            return
        except asyncio.CancelledError:
            # Shutdown reached us mid-handshake: leave the machine idle, report, then stop.
            report.status, report.reason = Status.FAILED, Reason.SHUTDOWN
            report.error = "agent stopped during the cycle"
            abort = asyncio.ensure_future(self.idle.abort(operation))
            while not abort.done():  # a repeated cancel must not cut the abort short
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(abort)
            report.machine_state = abort.result()
            raise
        # Sums of rounded phases (0.123 + 0.456) are not round themselves: 3 decimals, as every phase.
        report.durations_ms.update(
            machine_write=round(outcome.write_ms, 3),
            machine_cycle=round(outcome.machine_ms, 3),
            machine_read=round(outcome.read_ms, 3),
        )
        if self.idle.rule.resets_all:
            self.idle.journal.clear()
        report.results = {k: _jsonable(v) for k, v in outcome.results.items()}
        report.status, report.machine_state = Status.OK, "cycle complete"
        await self._write_progress(contents, index, StepStatus.OK, report)

    async def identify(self, uid: bytes) -> tuple[Part, str]:
        """The part on the tag and the key that signed it: read and verified, nothing written,
        the machine not touched. Raises TagIOError or PartRejected."""
        contents = decode_tag(await self.reader.read_ndef(uid), uid, self.keyring)
        return _part(contents), contents.traveler.key_id

    # ------------------------------------------------------------------ decisions before any write

    def _mine(self, step: Step) -> bool:
        return step.station in (None, self.station) and step.operation in self.profile.operations

    def select_step(self, contents: TagContents) -> int:
        """Index of the step this station runs now, or PartRejected saying why there is none."""
        steps = contents.traveler.steps
        progress = contents.progress
        uid = uid_hex(contents.traveler.tag_uid)
        index = progress.next_undone(len(steps))
        if index is None:
            raise PartRejected(Reason.COMPLETE, f"tag {uid}: all {len(steps)} steps are done")
        step = steps[index]
        if self._mine(step):
            return index
        later = [
            j for j in range(index + 1, len(steps)) if not progress.done(j) and self._mine(steps[j])
        ]
        if later:
            raise PartRejected(
                Reason.OUT_OF_SEQUENCE,
                f"tag {uid}: step {later[0] + 1} ({steps[later[0]].operation}) is for this station, "
                f"but step {index + 1} ({step.operation}) is not done yet",
            )
        if step.station not in (None, self.station):
            raise PartRejected(
                Reason.WRONG_STATION,
                f"tag {uid}: next step {index + 1} ({step.operation}) is for station {step.station}, this is {self.station}",
            )
        raise PartRejected(
            Reason.UNKNOWN_OPERATION,
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
        reasons = {Refusal.INVALID} if unknown else set()
        encoded: dict[str, RawValue] = {}
        listed: list[dict[str, Any]] = []
        for name, spec in operation.parameters.items():
            value: ParamValue | None = step.parameters.get(name, spec.default)
            if value is None:
                problems.append(f"{name} is missing")
                reasons.add(Refusal.INVALID)
                continue
            checked = self.profile.check_value(value, operation=step.operation, parameter=name)
            if isinstance(checked, Refused):
                problems.append(checked.message)
                reasons.add(checked.reason)
                continue
            try:  # the held value, so the machine receives exactly what was checked
                encoded[spec.point] = self.driver.encode(spec.point, checked.value)
            except ValueError as err:
                problems.append(f"{name}: {err}")
                reasons.add(Refusal.INVALID)
                continue
            listed.append(
                {
                    "name": name,
                    "value": checked.value,
                    **({"requested": value} if checked.rounded else {}),
                    "unit": self.profile.points[spec.point].unit,
                    "point": spec.point,
                    "raw": self.driver.raw_for_report(encoded[spec.point]),
                }
            )
        if problems:
            reason = (
                Refusal.OUT_OF_LIMITS if reasons == {Refusal.OUT_OF_LIMITS} else Refusal.INVALID
            )
            raise PartRejected(
                Reason(reason.value),
                f"tag {uid}: step {index + 1} ({step.operation}): " + "; ".join(problems),
            )
        return encoded, listed

    # ------------------------------------------------------------------ after the machine

    async def _write_progress(
        self, contents: TagContents, index: int, status: StepStatus, report: CycleReport
    ) -> None:
        if not self.write_back:
            return
        if not self._hold(report, _TAG_WRITE_UNKNOWN):
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
_INTERRUPTED = IfStopped(
    status=Status.FAILED,
    reason=Reason.INTERRUPTED,
    error="the agent stopped during the cycle (crash or power loss); the machine may have run it",
    machine_state="unknown: the agent stopped during the cycle",
)
#: And before the tag is written back: the cycle's outcome stands, the tag's is not known.
_TAG_WRITE_UNKNOWN = IfStopped(tag_write="unknown: the agent stopped during the tag write-back")


def _machine_reason(err: Exception) -> Reason:
    if isinstance(err, MachineFault):
        return (
            Reason.MACHINE_FAULT
        )  # the machine answered and said no (error code, done never came)
    if isinstance(err, ValueError):
        # A value that passed the profile's rules and still cannot be sent: a defect, not a part's.
        return Reason.INTERNAL_ERROR
    return Reason.MACHINE_ERROR  # connection or protocol


def _part(contents: TagContents) -> Part:
    t = contents.traveler
    return {
        "id": t.part_id,
        "product": t.product,
        "variant": t.variant,
        "order": t.order,
        "material_lot": t.material_lot,
    }


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
    if report.status is Status.OK:
        log.info("cycle ok", **fields, tag_write=report.tag_write)
    elif report.status is Status.REJECTED:
        log.warning("part rejected", **fields, reason=report.reason, error=report.error)
    else:
        log.error(
            "cycle failed",
            **fields,
            reason=report.reason,
            error=report.error,
            machine=report.machine_state,
        )
