"""One reconnect supervisor for every link: broker, machine drivers, NFC and AutoID readers.

A ``Link`` holds a connection's state (connecting, connected, waiting, stopped), when the next
attempt may run and what to log. Every link behaves the same way:

- the first retry comes quickly, later ones double up to a cap, and a random factor keeps a plant's
  gateways from retrying in step after a shared outage; a refusal that cannot fix itself soon (a
  wrong password, an untrusted certificate) waits the full cap at once;
- calls in between fail fast with the time left and the last error (``waiting()``), never a busy
  loop; ``attempt_now()`` lets the next attempt run at once (a part is waiting at the station);
- one WARNING when the link is lost or first fails, DEBUG while the outage lasts (a refusal seen
  for the first time is a WARNING again: a person must act), one INFO when it recovers, with how
  long it was down. The device is a field of each line, named once.

A link is driven either on demand (``attempt()``: the caller connects now unless the backoff says
wait) or by ``run()`` / ``run_blocking()``: a loop around a *session* that connects, calls ``up()``
and holds the connection until it is lost, by returning or raising. ``run()`` records what the
session left unrecorded: a failure before ``up()``, a loss after it.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

import structlog

log = structlog.get_logger("link")

_FLAPPING = 1.0  # s: a connection lost sooner than this after it came up counts as a failure

#: Extra fields for a link's log lines (e.g. the broker link's backlog).
Context = Callable[[], dict[str, Any]]


class LinkState(StrEnum):
    CONNECTING = "connecting"  # an attempt is under way
    CONNECTED = "connected"
    WAITING = "waiting"  # down; the next attempt runs when the backoff allows or on demand
    STOPPED = "stopped"


class LinkDown(Exception):
    """A session's failure in words; ``refused``: the peer said no (wait the longest)."""

    def __init__(self, reason: str, *, refused: bool = False) -> None:
        self.reason = reason
        self.refused = refused
        super().__init__(reason)


class LinkWaiting(Exception):
    """No attempt now: the backoff has not expired. The message says for how long and why."""


class Backoff:
    """Capped exponential backoff with jitter: when the next attempt may run."""

    def __init__(self, minimum: float, maximum: float, *, per_round: int = 1) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.per_round = per_round  # attempts that share a step (one per broker of a list)
        self.failures = 0  # consecutive failed attempts
        self.last_error = ""
        self._retry_at = 0.0  # monotonic time before which no attempt is made

    def remaining(self) -> float:
        """Seconds until the next attempt may run (0: now)."""
        return max(0.0, self._retry_at - time.monotonic())

    def waiting(self) -> str | None:
        """Why no attempt is made now, in words for an error message; None when one may be."""
        wait = self.remaining()
        if wait <= 0:
            return None
        return f"unreachable, next attempt in {wait:.2f} s (last error: {self.last_error})"

    def failed(self, error: str, *, longest: bool = False) -> float:
        """Record a failed attempt; returns the delay before the next one.

        ``longest``: a refusal that cannot fix itself soon waits the full cap at once.
        """
        self.failures += 1
        self.last_error = error
        step = -(-self.failures // self.per_round)
        base = self.maximum if longest else self.minimum * 2 ** min(step - 1, 30)
        return self.delay(min(self.maximum, base * random.uniform(0.8, 1.2)))

    def delay(self, seconds: float) -> float:
        """Make the next attempt wait ``seconds`` from now."""
        self._retry_at = time.monotonic() + seconds
        return seconds

    def succeeded(self) -> int:
        """Record success; returns how many attempts had failed before it."""
        failures, self.failures, self._retry_at = self.failures, 0, 0.0
        return failures


def _words(err: BaseException) -> tuple[str, bool]:
    if isinstance(err, LinkDown):
        return err.reason, err.refused
    detail = getattr(err, "detail", None)  # MachineError: its message without the device
    if isinstance(detail, str):
        return detail, not getattr(err, "retryable", True)
    return str(err) or type(err).__name__, False


class Link:
    """The state, backoff and log lines of one connection to one device."""

    def __init__(
        self,
        name: str,
        device: str,
        minimum: float,
        maximum: float,
        *,
        logger: Any = log,
        context: Context | None = None,
        per_round: int = 1,
        spread: bool = False,
    ) -> None:
        self.name = name  # "broker", "machine", "nfc reader", ...: the start of each log line
        self.device = device  # changes on failover (the broker being tried)
        self.state = LinkState.WAITING
        self.sessions = 0  # successful connections so far
        self.refused = False  # the last failure was the peer saying no
        self.spread = spread  # after a loss, wait a random short time (see ``lost()``)
        self._backoff = Backoff(minimum, maximum, per_round=per_round)
        self._log = logger
        self._context = context or dict
        self._down_since: float | None = None  # monotonic start of the current outage
        self._reported: set[tuple[str, str]] = set()  # (device, reason) logged in this outage
        self._now: asyncio.Event | None = None  # set by attempt_now() to end a pause early
        self._up = (0.0, 0)  # monotonic time of the last up() and the failures before it

    # -- the backoff ------------------------------------------------------------------------

    @property
    def last_error(self) -> str:
        return self._backoff.last_error

    @property
    def failures(self) -> int:
        return self._backoff.failures

    def remaining(self) -> float:
        return self._backoff.remaining()

    def waiting(self) -> str | None:
        """Why an attempt may not run now (words for an error message); None when it may."""
        return self._backoff.waiting()

    def attempt_now(self) -> None:
        """Let the next attempt run at once, whatever the backoff says."""
        self._backoff.delay(0.0)
        if self._now is not None:
            self._now.set()

    async def pause(self) -> None:
        """Return when the next attempt may run: the backoff expired, ``attempt_now()`` or
        ``stop()``."""
        if self._now is None:
            self._now = asyncio.Event()
        self._now.clear()
        while (wait := self.remaining()) > 0 and not self.stopped:
            try:
                await asyncio.wait_for(self._now.wait(), wait)
            except TimeoutError:
                continue
            self._now.clear()

    # -- what happened ----------------------------------------------------------------------

    def up(self, **fields: Any) -> None:
        """A connection is established: INFO "connected", or "recovered" after an outage."""
        failures = self._backoff.succeeded()
        self._up = (time.monotonic(), failures)
        self.state, self.refused = LinkState.CONNECTED, False
        self.sessions += 1
        fields = {"device": self.device, **fields, **self._context()}
        if self._down_since is None:
            self._log.info(f"{self.name} connected", **fields)
        else:
            outage = round(time.monotonic() - self._down_since, 2)
            self._log.info(
                f"{self.name} link recovered", **fields, outage_s=outage, attempts=failures + 1
            )
        self._down_since = None
        self._reported.clear()

    def failed(self, error: str, *, refused: bool = False) -> float:
        """An attempt failed: WARNING the first time in an outage (or a new refusal), DEBUG after."""
        delay = self._backoff.failed(error, longest=refused)
        self.state, self.refused = LinkState.WAITING, refused
        if self._down_since is None:
            self._down_since = time.monotonic()
        key = (self.device, error)
        warn = not self._reported or (refused and key not in self._reported)
        level = self._log.warning if warn else self._log.debug
        self._reported.add(key)
        level(
            f"{self.name} unreachable",
            device=self.device,
            reason=error,
            retry_in_s=round(delay, 2),
            attempt=self._backoff.failures,
            **self._context(),
        )
        return delay

    def lost(self, error: str = "connection lost", *, flapping: bool = False) -> None:
        """An established connection ended: one WARNING. The next attempt may run at once, or
        (``spread``) after a random short wait: a fleet dropped together must not return as one.
        ``flapping``: it was up only a moment; back off from where it was before, no busy loop."""
        self.state = LinkState.WAITING
        self._down_since = time.monotonic()
        self._reported = {(self.device, error)}  # this WARNING is the outage's one
        b = self._backoff
        if flapping:
            b.failures = self._up[1]
            delay = b.failed(error)
        else:
            delay = b.delay(random.uniform(b.minimum, 2 * b.minimum) if self.spread else 0.0)
        self._log.warning(
            f"{self.name} link lost",
            device=self.device,
            reason=error,
            retry_in_s=round(delay, 2),
            **self._context(),
        )

    @property
    def stopped(self) -> bool:
        return self.state is LinkState.STOPPED

    def stop(self) -> None:
        self.state = LinkState.STOPPED
        if self._now is not None:
            self._now.set()

    # -- driving it -------------------------------------------------------------------------

    async def attempt(self, connect: Callable[[], Awaitable[dict[str, Any] | None]]) -> None:
        """Connect now, unless the backoff says wait (``LinkWaiting``); record the outcome.

        ``connect`` may return fields for the "connected" line; its exception is re-raised after
        it is recorded.
        """
        waiting = self.waiting()
        if waiting is not None:
            raise LinkWaiting(waiting)
        self.state = LinkState.CONNECTING
        try:
            fields = await connect()
        except Exception as err:
            reason, refused = _words(err)
            self.failed(reason, refused=refused)
            raise
        self.up(**(fields or {}))

    async def run(self, session: Callable[[], Awaitable[None]]) -> None:
        """Run ``session`` again and again until ``stop()``, pausing as the backoff says.

        The session connects, calls ``up()`` and returns or raises when the connection ends.
        """
        if self.state is LinkState.STOPPED:
            self.state = LinkState.WAITING  # started again after a stop
        while not self.stopped:
            await self.pause()
            if self.stopped:
                return
            self.state = LinkState.CONNECTING
            try:
                await session()
                reason, refused = "connection lost", False
            except Exception as err:
                reason, refused = _words(err)
            self._ended(reason, refused)

    def run_blocking(self, session: Callable[[], None], stop: threading.Event) -> None:
        """``run()`` for a thread that owns a blocking library (nfcpy); ends when ``stop`` is set."""
        self.state = LinkState.WAITING
        while not stop.is_set():
            stop.wait(self.remaining())
            if stop.is_set():
                return
            self.state = LinkState.CONNECTING
            try:
                session()
                reason, refused = "connection lost", False
            except Exception as err:
                reason, refused = _words(err)
            if not stop.is_set():
                self._ended(reason, refused)
        self.state = LinkState.STOPPED

    def _ended(self, reason: str, refused: bool) -> None:
        if self.state is LinkState.CONNECTED:
            # Up and down at once: a peer that accepts and drops, or a bug in the session.
            self.lost(reason, flapping=time.monotonic() - self._up[0] < _FLAPPING)
        elif self.state is LinkState.CONNECTING:
            self.failed(reason, refused=refused)
        # WAITING: the session recorded its own failure (an on-demand attempt); STOPPED: done.
