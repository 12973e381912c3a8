"""One supervisor for the daemon's long-lived tasks and for what keeps the station from working.

A component (the part-taking loop, the MQTT sender, a telemetry group, ...) runs as a coroutine
started by ``spawn``. When it raises unexpectedly, the traceback is logged once (the same error
again is one WARNING line without it), the component is marked as a problem so the status turns
``degraded`` naming it, and it is started again after a capped backoff. Once it has run for
``settle`` seconds without failing, the problem is cleared. A component that fails more than
``restarts`` times within ``window`` seconds cannot recover by itself: ``fatal`` is set and the
daemon ends with a non-zero exit so systemd starts it afresh.

Conditions that are not crashes (the outbox cannot write) are set and cleared with ``condition``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from .link import Backoff

log = structlog.get_logger("supervisor")

Factory = Callable[[], Coroutine[Any, Any, None]]
#: How a component's owner starts a long-lived task: (name, coroutine factory) -> task.
Spawn = Callable[[str, Factory], "asyncio.Task[None]"]


def plain_spawn(name: str, factory: Factory) -> asyncio.Task[None]:
    """Unsupervised: for components used on their own (tools, tests of one module)."""
    return asyncio.create_task(factory(), name=name)


class Supervisor:
    def __init__(
        self,
        *,
        restarts: int = 5,
        window: float = 60.0,
        settle: float = 1.0,
        backoff: tuple[float, float] = (0.2, 10.0),
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.restarts = restarts
        self.window = window
        self.settle = settle
        self._backoff = backoff
        self.on_change = on_change
        self._problems: dict[str, str] = {}  # component -> what is wrong, in words
        self._logged: dict[str, str] = {}  # component -> the error whose traceback was logged
        self.fatal: str | None = None
        self.failed = asyncio.Event()  # set with ``fatal``

    # ----------------------------------------------------------------- state

    @property
    def healthy(self) -> bool:
        return not self._problems

    def problem(self, component: str) -> str | None:
        return self._problems.get(component)

    def status(self) -> dict[str, Any]:
        """For the retained status: ``health`` ok or degraded, and each problem by component."""
        return {
            "health": "ok" if not self._problems else "degraded",
            "problems": [{"component": c, "error": e} for c, e in sorted(self._problems.items())],
        }

    def condition(self, component: str, error: str | None) -> None:
        """Mark ``component`` as not working (``error``) or working again (None)."""
        if self._problems.get(component) == error:
            return
        if error is None:
            self._problems.pop(component, None)
        else:
            self._problems[component] = error
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # telling the line must not take the supervisor down
                log.exception("status update failed")

    # ----------------------------------------------------------------- tasks

    def spawn(self, name: str, factory: Factory) -> asyncio.Task[None]:
        return asyncio.create_task(self._run(name, factory), name=name)

    async def _run(self, name: str, factory: Factory) -> None:
        backoff = Backoff(*self._backoff)
        failures: deque[float] = deque(maxlen=self.restarts + 1)
        while True:
            task = asyncio.create_task(factory(), name=f"{name}-run")
            try:
                done, _ = await asyncio.wait({task}, timeout=self.settle)
                if not done:
                    backoff.succeeded()
                    if self._problems.get(name) is not None:
                        log.info("component recovered", component=name)
                        self.condition(name, None)
                await task
                return  # ended on its own: a stop
            except asyncio.CancelledError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                if name in self._problems:  # stopped on purpose (reload, shutdown): not a problem
                    self.condition(name, None)
                raise
            except Exception as err:
                error = str(err) or "unexpected error without a message"
                now = time.monotonic()
                failures.append(now)
                if self._logged.get(name) != error:
                    self._logged[name] = error
                    log.exception("component failed; restarting it", component=name, error=error)
                else:
                    log.warning("component failed again", component=name, error=error)
                self.condition(name, error)
                if len(failures) > self.restarts and now - failures[0] <= self.window:
                    self.fatal = (
                        f"{name} failed {len(failures)} times within {self.window:g} s "
                        f"(last error: {error})"
                    )
                    log.critical("component cannot recover; stopping the agent", component=name)
                    self.failed.set()
                    return
                await asyncio.sleep(backoff.failed(error))
