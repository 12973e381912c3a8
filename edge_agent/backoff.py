"""When a link may try again: capped exponential backoff with jitter, one instance per link.

Every reconnecting link behaves the same way: the first retry comes quickly, later ones double
up to a cap, and a random factor keeps a plant's gateways from retrying in step after a shared
outage. Calls in between fail fast with the time left and the last error, never a busy loop.
"""

from __future__ import annotations

import random
import time


class Backoff:
    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum = minimum
        self.maximum = maximum
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

        ``longest``: a refusal that cannot fix itself soon (wrong password, untrusted
        certificate) waits the full cap at once.
        """
        self.failures += 1
        self.last_error = error
        base = self.maximum if longest else self.minimum * 2 ** min(self.failures - 1, 30)
        delay = min(self.maximum, base * random.uniform(0.8, 1.2))
        self._retry_at = time.monotonic() + delay
        return delay

    def succeeded(self) -> int:
        """Record success; returns how many attempts had failed before it."""
        failures, self.failures, self._retry_at = self.failures, 0, 0.0
        return failures
