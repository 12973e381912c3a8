"""Commands from the line on ``edge/<gateway_id>/cmd/<name>``, answered on ``edge/<gateway_id>/reply/<name>``.

A command is a JSON object ``{"correlation_id": <string or integer>, "params": {...}}``. Every
command gets exactly one reply carrying the same ``correlation_id``: ``ok: true`` with a ``result``, or ``ok: false`` with an ``error``
whose ``code`` is stable. Nothing a sender can put in a message crashes the agent: malformed JSON,
an unknown or disallowed command and invalid parameters are error replies. With MQTT 5 the
correlation data stands in for a missing ``correlation_id``, and a command carrying a response
topic is answered there too (with its correlation data), besides ``reply/<name>``.

Writes go through the same checks as a cycle's parameters (the profile's type, scaling and safe
limits, judged on the value the machine will hold) and are refused while a station cycle holds
the machine; points the handshake drives (trigger, program), and any point sharing their
registers under another name, belong to the cycle and are never written from the line.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Protocol, TypeVar, get_args

import structlog
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from ..config import CommandName
from ..errors import ConfigError, MachineError
from ..machine.driver import MachineDriver
from ..machine.profile import Profile
from ..machine.profile_signature import ProfileRefused
from ..machine.values import Accepted, Refusal, Refused
from ..messages import iso, jsonable

log = structlog.get_logger("commands")

#: Every command the agent knows; ``commands.allowed`` in the config picks from these.
COMMANDS: tuple[str, ...] = get_args(CommandName)

Publish = Callable[[str, dict[str, Any], int], object]
#: (MQTT 5 response topic, reply, correlation data or None) -> queued
Respond = Callable[[str, dict[str, Any], bytes | None], object]


class StationControl(Protocol):
    """What commands may do to the station (the Agent implements it)."""

    @property
    def profile(self) -> Profile: ...

    @property
    def driver(self) -> MachineDriver: ...

    #: Held by a station cycle for its whole run, and by a write command for its write.
    machine_lock: asyncio.Lock

    def line_status(self) -> dict[str, Any]: ...

    def pause(self) -> dict[str, Any]: ...

    def resume(self) -> dict[str, Any]: ...

    async def reload(self) -> dict[str, Any]: ...

    async def push_profile(
        self, text: str, origin: str, *, signature: str | None = None, rollback: bool = False
    ) -> dict[str, Any]: ...

    async def rollback_profile(self) -> dict[str, Any]: ...


class CommandError(Exception):
    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(_Params):
    pass


class ReadParams(_Params):
    points: list[str] = Field(min_length=1, max_length=500)


class ProfileParams(_Params):
    yaml: str = Field(min_length=1, max_length=1_000_000)  # the profile file's text
    signature: str | None = Field(None, max_length=4096)  # its detached .sig file's text
    rollback: bool = False  # return to a profile accepted before, even if its version is older


class WriteParams(_Params):
    values: dict[str, float | int | bool | str] = Field(min_length=1, max_length=123)


M = TypeVar("M", bound=_Params)


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    correlation_id: Annotated[str, Field(min_length=1, max_length=200)] | StrictInt
    params: dict[str, Any] = {}


class Commands:
    """Subscribes to ``cmd/+`` and answers every message on ``reply/<name>``."""

    def __init__(
        self,
        station: StationControl,
        *,
        allowed: frozenset[str],
        publish: Publish,
        respond: Respond | None = None,
    ) -> None:
        self.station = station
        self.allowed = allowed
        self.publish = publish
        self.respond = respond
        self._tasks: set[asyncio.Task[dict[str, Any]]] = set()
        self._handlers: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "status": self._status,
            "read": self._read,
            "write": self._write,
            "pause": self._pause,
            "resume": self._resume,
            "reload": self._reload,
            "push_profile": self._push_profile,
            "rollback_profile": self._rollback_profile,
        }

    def on_message(self, topic: str, payload: bytes, properties: Any) -> None:
        """The uplink's handler (runs on the event loop): answer in a task of its own."""
        name = topic.rsplit("/", 1)[-1]
        task = asyncio.create_task(self.handle(name, payload, properties), name=f"cmd-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait for the commands in flight (bounded), at shutdown."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def handle(self, name: str, payload: bytes, properties: Any = None) -> dict[str, Any]:
        """Run command ``name`` and publish its reply. Never raises (except CancelledError)."""
        reply = await self.execute(name, payload, properties)
        self.publish(f"reply/{name}", reply, 1)
        # MQTT 5 request/response: the requester named where it listens. reply/<name> stays the
        # record every consumer sees; the response topic is for the one who asked.
        response_topic = getattr(properties, "ResponseTopic", None)
        if response_topic and self.respond is not None:
            data = getattr(properties, "CorrelationData", None)
            try:
                self.respond(response_topic, reply, bytes(data) if data is not None else None)
            except ValueError as err:  # a response topic with wildcards: nowhere to send it
                log.warning("command response topic refused", topic=response_topic, error=str(err))
        return reply

    async def execute(self, name: str, payload: bytes, properties: Any = None) -> dict[str, Any]:
        """Run command ``name`` and return its reply (for another API's transport, e.g.
        ThingsBoard RPC). Never raises (except CancelledError)."""
        t0 = time.perf_counter()
        correlation: str | int | None = _correlation_data(properties)
        reply: dict[str, Any] = {"schema": "edge-agent/reply/1", "command": name}
        try:
            try:
                data = json.loads(payload)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CommandError("malformed", f"not JSON: {err}") from None
            if isinstance(data, dict):
                if "correlation_id" not in data and correlation is not None:
                    data = {**data, "correlation_id": correlation}
                if isinstance(data.get("correlation_id"), str | int):
                    correlation = data["correlation_id"]
            try:
                envelope = Envelope.model_validate(data)
            except ValidationError as err:
                raise CommandError("malformed", _first_error(err)) from None
            handler = self._handlers.get(name)
            if handler is None:
                raise CommandError(
                    "unknown_command", f"unknown command '{name}' (known: {', '.join(COMMANDS)})"
                )
            if name not in self.allowed:
                allowed = ", ".join(sorted(self.allowed)) or "none"
                raise CommandError(
                    "not_allowed",
                    f"command '{name}' is not allowed on this gateway (commands.allowed: {allowed})",
                )
            result = await handler(envelope.params)
            reply.update(ok=True, result=result)
        except CommandError as err:
            reply.update(ok=False, error={"code": err.code, "message": str(err)})
        except MachineError as err:
            reply.update(ok=False, error={"code": "machine_error", "message": str(err)})
        except ConfigError as err:  # reload: the files on disk are invalid; nothing changed
            reply.update(ok=False, error={"code": "invalid_config", "message": str(err)})
        except Exception as err:  # a bug in one command must not take the agent down
            log.exception("command failed", command=name)
            reply.update(ok=False, error={"code": "internal", "message": repr(err)})
        reply["correlation_id"] = correlation
        reply["time"] = iso(time.time())
        reply["duration_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        level = log.info if reply["ok"] else log.warning
        level(
            "command",
            command=name,
            correlation_id=correlation,
            ok=reply["ok"],
            error=reply.get("error"),
        )
        return reply

    # ------------------------------------------------------------------ the commands

    async def _status(self, params: dict[str, Any]) -> Any:
        _params(NoParams, params)
        return self.station.line_status()

    async def _pause(self, params: dict[str, Any]) -> Any:
        _params(NoParams, params)
        return self.station.pause()

    async def _resume(self, params: dict[str, Any]) -> Any:
        _params(NoParams, params)
        return self.station.resume()

    async def _reload(self, params: dict[str, Any]) -> Any:
        _params(NoParams, params)
        return await self.station.reload()

    async def _push_profile(self, params: dict[str, Any]) -> Any:
        p = _params(ProfileParams, params)
        # Errors name this origin as their file: "pushed profile:12: points.speed.type: ..."
        try:
            return await self.station.push_profile(
                p.yaml, "pushed profile", signature=p.signature, rollback=p.rollback
            )
        except ProfileRefused as err:
            raise CommandError("profile_refused", f"{err.reason}: {err}") from None

    async def _rollback_profile(self, params: dict[str, Any]) -> Any:
        _params(NoParams, params)
        return await self.station.rollback_profile()

    async def _read(self, params: dict[str, Any]) -> Any:
        p = _params(ReadParams, params)
        profile = self.station.profile
        unknown = [n for n in p.points if n not in profile.points]
        if unknown:
            raise CommandError("unknown_point", _unknown(unknown, profile))
        values = await self.station.driver.read(p.points)
        return {
            "values": {n: jsonable(v) for n, v in values.items()},
            "time": iso(time.time()),
        }

    async def _write(self, params: dict[str, Any]) -> Any:
        p = _params(WriteParams, params)
        profile, driver = self.station.profile, self.station.driver
        unknown = [n for n in p.values if n not in profile.points]
        if unknown:
            raise CommandError("unknown_point", _unknown(unknown, profile))
        problems: list[str] = []
        codes: set[str] = set()
        encoded = {}
        held: dict[str, Accepted] = {}
        for name, value in p.values.items():
            point = profile.points[name]
            if not point.writable:
                codes.add("read_only")
                problems.append(f"{name} is read-only")
                continue
            owner = profile.handshake_owner(name)  # by address: an alias is the same register
            if owner is not None:
                codes.add("cycle_point")
                alias = "" if owner == name else f" shares memory with '{owner}', which"
                problems.append(f"{name}{alias} is driven by the station cycle's handshake")
                continue
            checked = profile.check_value(value, point=name)
            if isinstance(checked, Refused):
                out = checked.reason is Refusal.OUT_OF_LIMITS
                codes.add("out_of_limits" if out else "invalid_value")
                problems.append(checked.message)
                continue
            try:  # the held value: the machine receives exactly what was checked
                encoded[name] = driver.encode(name, checked.value)
            except ValueError as err:
                codes.add("invalid_value")
                problems.append(str(err))
                continue
            held[name] = checked
        if problems:
            code = codes.pop() if len(codes) == 1 else "invalid_value"
            raise CommandError(code, "; ".join(problems) + " (nothing was written)")
        lock = self.station.machine_lock
        if lock.locked():
            raise CommandError("busy", "a station cycle is running; nothing was written")
        async with lock:
            await driver.write(encoded)
        return {
            "written": {
                n: {
                    "value": c.value,
                    **({"requested": c.requested} if c.rounded else {}),
                    "raw": driver.raw_for_report(encoded[n]),
                }
                for n, c in held.items()
            }
        }


def handshake_points(profile: Profile) -> frozenset[str]:
    """Points the handshake touches: they belong to the station cycle."""
    return profile.handshake_points.all


def _params(model: type[M], params: dict[str, Any]) -> M:
    try:
        return model.model_validate(params)
    except ValidationError as err:
        raise CommandError("invalid_params", _first_error(err, "params")) from None


def _first_error(err: ValidationError, prefix: str = "") -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in (prefix, *e["loc"]) if x != "")
        parts.append(f"{where}: {e['msg']}" if where else e["msg"])
    return "; ".join(parts)


def _unknown(names: list[str], profile: Profile) -> str:
    return (
        f"no point named {', '.join(repr(n) for n in names)} in profile "
        f"{profile.name} {profile.version}"
    )


def _correlation_data(properties: Any) -> str | None:
    data = getattr(properties, "CorrelationData", None)
    if isinstance(data, bytes | bytearray):
        return bytes(data).decode("utf-8", "replace")
    return None
