"""Commands from the line on ``edge/<gateway_id>/cmd/<name>``, answered on ``edge/<gateway_id>/reply/<name>``.

A command is a JSON object ``{"correlation_id": <string or integer>, "params": {...}}``. Every
command gets exactly one reply carrying the same ``correlation_id``: ``ok: true`` with a ``result``, or ``ok: false`` with an ``error``
whose ``code`` is stable. Nothing a sender can put in a message crashes the agent or holds up a
cycle: oversized, deeply nested or malformed payloads, unknown or disallowed commands and invalid
parameters are error replies (intake.py screens them), a repeated ``correlation_id`` is answered
from memory, and what passes waits in a bounded queue for one worker. With MQTT 5 the
correlation data stands in for a missing ``correlation_id``, and a command carrying a response
topic within ``commands.response_topics`` is answered there too (with its correlation data),
besides ``reply/<name>``.

What each command does is in ``line/command_handlers.py``, what its message must look like in
``line/command_params.py``; this module is the way from a message to its one reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_args

import structlog
from pydantic import ValidationError

from ..config_schema import CommandName, CommandsConfig
from ..errors import ConfigError, MachineError
from ..messages import iso
from .command_handlers import CommandHandlers, StationControl, handshake_points
from .command_params import CommandError, Envelope, first_error
from .intake import (
    ReplyCache,
    leading_correlation_id,
    lone_surrogate,
    nesting_exceeds,
    response_topic_allowed,
)

__all__ = ["COMMANDS", "CommandError", "Commands", "StationControl", "handshake_points"]

log = structlog.get_logger("commands")

#: Every command the agent knows; ``commands.allowed`` in the config picks from these.
COMMANDS: tuple[str, ...] = get_args(CommandName)

Publish = Callable[[str, dict[str, Any], int], object]
#: (MQTT 5 response topic, reply, correlation data or None) -> queued
Respond = Callable[[str, dict[str, Any], bytes | None], object]

#: Commands that change nothing: logged at DEBUG when they succeed.
_READ_ONLY = frozenset({"status", "read"})
#: Commands that wait for the cycle in the machine (they swap the profile between cycles).
_WAIT_FOR_CYCLE = frozenset({"reload", "push_profile", "rollback_profile"})
#: While a cycle runs, commands are taken at most one per this many seconds: each costs the
#: event loop ~0.3 ms (receive, run, reply), and the cycle's own awaits must not queue behind them.
_PACE = 0.005


@dataclass
class _Request:
    """One command on its way: what is known of it so far."""

    name: str
    t0: float
    correlation: str | int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    response_topic: str | None = None  # MQTT 5: answered there too (within response_topics)
    correlation_data: bytes | None = None
    #: execute(): the reply goes to this future instead of reply/<name>
    answer: asyncio.Future[dict[str, Any]] | None = None

    @property
    def key(self) -> tuple[str, str | int]:
        assert self.correlation is not None
        return (self.name, self.correlation)


class Commands:
    """Subscribes to ``cmd/+`` and answers every message on ``reply/<name>``.

    Messages are screened as they arrive (size, nesting, JSON, response topic, command known and
    allowed, duplicate id) and refusals answered at once. What passes waits in a bounded queue
    for one worker, so commands never pile up in front of a station cycle: the worker runs them
    one at a time (a write takes the machine only between cycles), and reload and profile
    changes, which wait for the cycle in the machine, run beside it one at a time.
    """

    def __init__(
        self,
        station: StationControl,
        *,
        allowed: frozenset[str],
        publish: Publish,
        respond: Respond | None = None,
        config: CommandsConfig | None = None,
        own_replies: str = "edge/+/reply/#",
    ) -> None:
        self.station = station
        self.allowed = allowed
        self.publish = publish
        self.respond = respond
        self._own_replies = own_replies  # the default response topic filter
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._slow: asyncio.Task[None] | None = None  # reload / push / rollback in progress
        self._refused_busy = 0  # refused because the queue was full, since the last log line
        self._busy_logged_at = -60.0
        self.configure(config or CommandsConfig())
        self._handlers = CommandHandlers(station).table

    def configure(self, config: CommandsConfig) -> None:
        """Take the ``commands:`` section (at start and on reload)."""
        self.config = config
        self.allowed = frozenset(config.allowed)
        self._response_topics = (
            config.response_topics if config.response_topics is not None else [self._own_replies]
        )
        old = getattr(self, "_replies", None)
        if old is None or (old.window, old.size) != (config.dedup_window, config.dedup_size):
            self._replies = ReplyCache(config.dedup_window, config.dedup_size)

    # ------------------------------------------------------------------ intake

    def on_message(self, topic: str, payload: bytes, properties: Any) -> None:
        """The uplink's handler (runs on the event loop): screen, then queue or answer at once.

        Retained messages never reach here: the uplink drops them on ``cmd/+`` (a retained
        command would run again at every reconnect).
        """
        request = self._screen(topic.rsplit("/", 1)[-1], payload, properties)
        if request is not None:
            self._enqueue(request)

    async def execute(self, name: str, payload: bytes, properties: Any = None) -> dict[str, Any]:
        """Run command ``name`` through the same screen and queue and return its reply (for
        another API's transport, e.g. ThingsBoard RPC). Never raises (except CancelledError)."""
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        request = self._screen(name, payload, properties, answer)
        if request is not None:
            self._enqueue(request)
        return await answer

    def _screen(
        self,
        name: str,
        payload: bytes,
        properties: Any,
        answer: asyncio.Future[dict[str, Any]] | None = None,
    ) -> _Request | None:
        """The checks that cost nothing to the machine. None when already answered."""
        request = _Request(name, time.perf_counter(), _correlation_data(properties), answer=answer)
        full = self._queue.qsize() >= self.config.queue
        if full and self._refused_early(request, payload, properties):
            return None
        try:
            self._parse(request, payload)
            topic = getattr(properties, "ResponseTopic", None)
            if topic:
                if not response_topic_allowed(topic, self._response_topics):
                    raise CommandError(
                        "not_allowed",
                        f"response topic '{topic}' is outside commands.response_topics "
                        f"({', '.join(self._response_topics)}); nothing was done",
                    )
                request.response_topic = topic
                data = getattr(properties, "CorrelationData", None)
                request.correlation_data = bytes(data) if data is not None else None
            if name not in self._handlers:
                raise CommandError(
                    "unknown_command", f"unknown command '{name}' (known: {', '.join(COMMANDS)})"
                )
            if name not in self.allowed:
                allowed = ", ".join(sorted(self.allowed)) or "none"
                raise CommandError(
                    "not_allowed",
                    f"command '{name}' is not allowed on this gateway (commands.allowed: {allowed})",
                )
        except CommandError as err:
            self._send(request, self._reply(request, error=err))
            return None
        return None if self._answered_before(request) else request

    def _refused_early(self, request: _Request, payload: bytes, properties: Any) -> bool:
        """The queue is full: answer ``busy`` without parsing, the id read off the payload's start
        (a flood must cost little per message). False when the message needs the full screen:
        another answer than busy may be due (unknown, not allowed, too large, a response topic
        to check) or its id is not where a quick look finds it."""
        name = request.name
        if name not in self._handlers or name not in self.allowed:
            return False
        if len(payload) > self.config.max_payload or getattr(properties, "ResponseTopic", None):
            return False
        correlation = leading_correlation_id(payload)
        if correlation is None:
            return False
        request.correlation = correlation
        self._ensure_worker()  # a full queue with no worker would answer busy for ever
        if not self._answered_before(request):
            self._busy(request)
        return True

    def _answered_before(self, request: _Request) -> bool:
        seen = self._replies.lookup(request.key)
        if seen is None:
            return False
        # The same command again (a retry, a redelivery): it ran or runs once; same answer.
        log.info(
            "command repeated: answered from memory",
            command=request.name,
            correlation_id=request.correlation,
        )
        if seen.reply is not None:
            self._send(request, {**seen.reply, "repeated": True})
        else:
            seen.again = True
        return True

    def _parse(self, request: _Request, payload: bytes) -> None:
        limit = self.config.max_payload
        if len(payload) > limit:
            raise CommandError(
                "too_large", f"{len(payload)} bytes, more than commands.max_payload ({limit})"
            )
        if nesting_exceeds(payload, self.config.max_depth):
            raise CommandError(
                "malformed",
                f"nested more than commands.max_depth ({self.config.max_depth}) levels deep",
            )
        try:
            data = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CommandError("malformed", f"not JSON: {err}") from None
        except RecursionError:  # unbalanced brackets deep enough to get past the scan
            raise CommandError("malformed", "not JSON: nested too deep") from None
        if isinstance(data, dict):
            if "correlation_id" not in data and request.correlation is not None:
                data = {**data, "correlation_id": request.correlation}
            correlation = data.get("correlation_id")
            if isinstance(correlation, int) or (
                isinstance(correlation, str) and not lone_surrogate(payload, correlation)
            ):
                request.correlation = correlation
        if lone_surrogate(payload, data):
            raise CommandError(
                "malformed", "not Unicode text: a \\u escape names half a surrogate pair"
            )
        try:
            envelope = Envelope.model_validate(data)
        except ValidationError as err:
            raise CommandError("malformed", first_error(err)) from None
        request.correlation, request.params = envelope.correlation_id, envelope.params

    def _enqueue(self, request: _Request) -> None:
        self._ensure_worker()
        if self._queue.qsize() >= self.config.queue:
            self._busy(request)
            return
        self._replies.start(request.key)
        self._queue.put_nowait(request)

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            if self._worker is not None and not self._worker.cancelled():
                log.error(
                    "command worker ended; restarting it", error=str(self._worker.exception())
                )
            self._worker = asyncio.create_task(self._work(), name="commands")

    def _busy(self, request: _Request) -> None:
        # A flood: each refusal must cost little; one log line a minute, not one each.
        self._refused_busy += 1
        now = time.monotonic()
        if now - self._busy_logged_at >= 60:
            log.warning(
                "command queue full: refusing commands",
                queue=self.config.queue,
                refused=self._refused_busy,
            )
            self._busy_logged_at, self._refused_busy = now, 0
        error = CommandError(
            "busy", f"{self.config.queue} commands are waiting (commands.queue); not queued"
        )
        self._send(request, self._reply(request, error=error, quiet=True))

    async def drain(self, timeout: float = 5.0) -> None:
        """Answer the commands queued or running (bounded), at shutdown."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)
        for task in (self._worker, self._slow):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # ------------------------------------------------------------------ running

    async def _work(self) -> None:
        while True:
            request = await self._queue.get()
            if request.name not in _WAIT_FOR_CYCLE:
                try:
                    await self._run(request)
                finally:
                    self._queue.task_done()
            elif self._slow is not None and not self._slow.done():
                busy = CommandError(
                    "busy", "a reload or profile change is still in progress; nothing was done"
                )
                self._finish(request, self._reply(request, error=busy))
                self._queue.task_done()
            else:
                # These wait for the cycle in the machine: beside the queue, one at a time.
                self._slow = asyncio.create_task(self._run(request), name=f"cmd-{request.name}")
                self._slow.add_done_callback(lambda _: self._queue.task_done())
            if self.station.machine_lock.locked():
                # A cycle holds the machine: leave the event loop to it, one command per pace.
                await asyncio.sleep(_PACE)

    async def _run(self, request: _Request) -> None:
        try:
            result = await self._handlers[request.name](request.params)
            reply = self._reply(request, result=result)
        except CommandError as err:
            reply = self._reply(request, error=err)
        except MachineError as err:
            reply = self._reply(request, error=CommandError("machine_error", str(err)))
        except ConfigError as err:  # reload: the files on disk are invalid; nothing changed
            reply = self._reply(request, error=CommandError("invalid_config", str(err)))
        except Exception:  # a bug in one command must not take the agent down
            log.exception("command failed", command=request.name)
            message = "the command failed unexpectedly; the gateway's log has the details"
            reply = self._reply(request, error=CommandError("internal", message))
        self._finish(request, reply)

    def _finish(self, request: _Request, reply: dict[str, Any]) -> None:
        # Remembered unless nothing was done (busy): a retry with the same id must then run.
        nothing_done = not reply["ok"] and reply["error"]["code"] == "busy"
        again = self._replies.finish(request.key, None if nothing_done else reply)
        self._send(request, reply)
        if again and not nothing_done:
            self._send(request, {**reply, "repeated": True})

    def _reply(
        self,
        request: _Request,
        *,
        result: Any = None,
        error: CommandError | None = None,
        quiet: bool = False,
    ) -> dict[str, Any]:
        reply: dict[str, Any] = {"schema": "edge-agent/reply/1", "command": request.name}
        if error is None:
            reply.update(ok=True, result=result)
        else:
            reply.update(ok=False, error={"code": error.code, "message": str(error)})
        reply["correlation_id"] = request.correlation
        reply["time"] = iso(time.time())
        reply["duration_ms"] = round((time.perf_counter() - request.t0) * 1000, 3)
        if quiet:
            return reply
        # Commands that change nothing (status, read) are routine: a line may poll with them.
        level = log.debug if request.name in _READ_ONLY else log.info
        if not reply["ok"]:
            level = log.warning
        level(
            "command",
            command=request.name,
            correlation_id=request.correlation,
            ok=reply["ok"],
            error=reply.get("error"),
        )
        return reply

    def _send(self, request: _Request, reply: dict[str, Any]) -> None:
        """Publish ``reply`` on reply/<name> (and the MQTT 5 response topic), or hand it to
        execute()'s caller. Nothing here may raise into the worker or paho's callback."""
        if request.answer is not None:
            if not request.answer.done():
                request.answer.set_result(reply)
            return
        try:
            self.publish(f"reply/{request.name}", reply, 1)
            # MQTT 5 request/response: reply/<name> stays the record every consumer sees; the
            # response topic is for the one who asked.
            if request.response_topic and self.respond is not None:
                self.respond(request.response_topic, reply, request.correlation_data)
        except Exception:
            log.exception("command reply not queued", command=request.name)


def _correlation_data(properties: Any) -> str | None:
    data = getattr(properties, "CorrelationData", None)
    if isinstance(data, bytes | bytearray):
        return bytes(data).decode("utf-8", "replace")
    return None
