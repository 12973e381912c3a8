"""The machine before and after a part: reachable, shown idle before a trigger, aborted after.

``ok`` must mean this part's cycle ran: a trigger left high or a done already true would let the
handshake report a cycle the machine never ran for this part. So before a trigger the machine is
shown idle (``station/handshake.py``'s ``IdleRule``), after the abort steps when a new session or
the abort journal (``station/journal.py``) asks for them; and a declared cycle counter must have
advanced by exactly one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import MachineError, MachineFault, PartRejected, Reason
from ..machine.codec import INT_RANGES
from ..machine.driver import MachineDriver
from ..machine.profile import Profile
from ..machine.profile_schema import Operation
from .handshake import IdleRule, idle_rule, run_abort
from .journal import AbortJournal
from .report import CycleReport

ABORTED = "aborted (trigger reset)"


class IdleGuard:
    """One station's machine (``profile`` on ``driver``), between parts."""

    def __init__(self, profile: Profile, driver: MachineDriver, state_dir: Path | None) -> None:
        self.profile, self.driver = profile, driver
        # Marked before a trigger is set, cleared when the machine is idle again; survives a crash.
        self.journal = AbortJournal(state_dir)
        # The driver and session in which the machine was last shown idle: a new session (start,
        # reconnect, a reloaded driver) runs the abort steps before its first part.
        self._verified: tuple[MachineDriver, int] | None = None
        self._rule: IdleRule | None = None

    def take_over(self, previous: IdleGuard) -> None:
        """Go on where the guard of the station this one replaces left off: its abort journal,
        and its proof that the machine is idle, which holds for the same driver and session."""
        self.journal, self._verified = previous.journal, previous._verified

    @property
    def rule(self) -> IdleRule:
        if self._rule is None:
            self._rule = idle_rule(self.profile.handshake)
        return self._rule

    async def reachable(self, uid: str) -> None:
        """Connect now if there is no session, whatever the backoff says: a part is waiting.

        PartRejected(machine_unavailable) when it cannot be reached: the machine is untouched and
        the tag unchanged.
        """
        if self.driver.connected:
            return
        self.driver.attempt_now()
        try:
            await self.driver.connect()
        except MachineError as err:
            raise PartRejected(
                Reason.MACHINE_UNAVAILABLE,
                f"tag {uid}: the machine cannot be reached ({err}); "
                "nothing was sent to it and the tag is unchanged: present the part again "
                "when the machine is back",
            ) from err

    async def abort(self, operation: Operation) -> str:
        """Run the profile's abort steps; the machine state they leave, for the report."""
        problems = await run_abort(self.driver, self.profile.on_abort, operation)
        if problems:
            return "abort failed: " + "; ".join(problems)
        self.journal.clear()
        return ABORTED

    async def make_idle(
        self, operation: Operation, counter: str | None, report: CycleReport
    ) -> Any:
        """Show the machine idle (trigger false, nothing the handshake waits for already true),
        running the abort steps first when a new session or a journalled abort asks for it, or
        when it is not idle. Returns the cycle counter, read in the same request where possible.
        PartRejected(machine_not_idle) when it stays busy; MachineError when it cannot be read.
        """
        driver, rule = self.driver, self.rule
        if not driver.connected:
            await driver.connect()  # first, so that a new session is seen as one
        points = [*rule.points, counter] if counter else rule.points
        aborted: str | None = None
        if self.journal.pending is not None or self._verified != (driver, driver.sessions):
            aborted = report.machine_state = await self.abort(self._owed(operation))
        values = await driver.read(points) if points else {}
        problems = rule.problems(values)
        if problems and aborted is None:
            aborted = report.machine_state = await self.abort(operation)
            values = await driver.read(points)
            problems = rule.problems(values)
        if problems:
            self._verified = None
            report.machine_state = "not idle"
            done = "its abort steps ran" if aborted == ABORTED else aborted
            raise PartRejected(
                Reason.MACHINE_NOT_IDLE,
                f"machine {driver.device} is not idle, so the part was not started ({done}): "
                + "; ".join(problems),
            )
        self._verified = (driver, driver.sessions)
        self.journal.clear()
        report.machine_state = "untouched"  # by this part, so far
        return values.get(counter) if counter else None

    def _owed(self, current: Operation) -> Operation:
        """The operation whose abort is owed: the journal's, when the profile still has it."""
        pending = self.journal.pending
        if pending is None or pending.operation not in self.profile.operations:
            return current
        owed = self.profile.operations[pending.operation]
        return owed.model_copy(update={"program": pending.program})

    def check_counter(self, name: str, before: Any, after: Any) -> None:
        """MachineFault unless the cycle counter ``name`` went from ``before`` up by one."""
        lo, hi = INT_RANGES[self.profile.points[name].type]
        span = hi - lo + 1
        if (after - before) % span == 1:
            return
        expected = lo + (before + 1 - lo) % span
        raise MachineFault(
            f"cycle counter {name} went from {before} to {after} (expected {expected}): the "
            "machine did not count exactly one cycle for this part",
            device=self.driver.device,
        )
