"""The part-taking loop's sign of life, for the watchdog.

The loop takes tags through ``Heartbeat.events``: the heartbeat knows the task that runs it and
since when the part in hand is being handled. Idle, waiting for the next tag, is alive; a loop
that ended (an exception killed it) or one part held far longer than any cycle can last is not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from ..machine.profile import Profile
from ..machine.steps import WaitFor
from ..tag.reader import ScanEvent


class Heartbeat:
    def __init__(self) -> None:
        self.task: asyncio.Task[object] | None = None  # the task taking parts
        self.busy_since: float | None = None  # monotonic time the part in hand was taken
        self.running = asyncio.Event()  # set once the loop waits for its first tag

    async def events(self, source: AsyncIterator[ScanEvent]) -> AsyncIterator[ScanEvent]:
        self.task = asyncio.current_task()
        self.running.set()
        async for event in source:
            self.busy_since = time.monotonic()
            try:
                yield event
            finally:  # the loop came back for the next tag
                self.busy_since = None

    @property
    def started(self) -> bool:
        return self.task is not None

    def stalled(self, limit: float) -> str | None:
        """Why parts are not being taken, in words; None while the loop is alive."""
        if self.task is None:
            return "the part-taking loop has not started"
        if self.task.done():
            return "the part-taking loop has ended"
        if self.busy_since is not None and (held := time.monotonic() - self.busy_since) > limit:
            return f"one part has been in hand for {held:.0f} s (longest expected {limit:.0f} s)"
        return None


def longest_cycle(profile: Profile, margin: float = 60.0) -> float:
    """How long one part may be in hand: every wait of the handshake and of the abort at its
    timeout, plus ``margin`` for the tag and the machine's own request timeouts."""
    waits = [s.timeout for s in (*profile.handshake, *profile.on_abort) if isinstance(s, WaitFor)]
    return margin + sum(waits)
