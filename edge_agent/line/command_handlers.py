"""What each command does to the station: status, read, write, pause, resume, reload, and pushed
or rolled-back profiles. ``line/commands.py`` screens, queues and answers them; this module only
runs them on what ``StationControl`` offers.

Writes go through the same checks as a cycle's parameters (the profile's type, scaling and safe
limits, judged on the value the machine will hold) and are refused while a station cycle holds
the machine; points the handshake drives (trigger, program), and any point sharing their
registers under another name, belong to the cycle and are never written from the line.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..machine.driver import MachineDriver
from ..machine.profile import Profile
from ..machine.profile_signature import ProfileRefused
from ..machine.values import Accepted, Refusal, Refused
from ..messages import iso, jsonable
from .command_params import (
    CommandError,
    NoParams,
    ProfileParams,
    ReadParams,
    WriteParams,
    parse_params,
)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]

#: Seconds a read waits for the station cycle in the machine to end before it reads beside it.
READ_WAIT = 1.0


class StationControl(Protocol):
    """What commands may do to the station (line/control.py's LineControl implements it)."""

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


class CommandHandlers:
    """The commands, each taking its ``params`` and returning its ``result`` or raising
    CommandError (MachineError, ConfigError: the caller turns them into error replies)."""

    def __init__(self, station: StationControl) -> None:
        self.station = station
        #: command name -> handler; ``config.CommandName`` lists the same names
        self.table: dict[str, Handler] = {
            "status": self._status,
            "read": self._read,
            "write": self._write,
            "pause": self._pause,
            "resume": self._resume,
            "reload": self._reload,
            "push_profile": self._push_profile,
            "rollback_profile": self._rollback_profile,
        }

    async def _status(self, params: dict[str, Any]) -> Any:
        parse_params(NoParams, params)
        return self.station.line_status()

    async def _pause(self, params: dict[str, Any]) -> Any:
        parse_params(NoParams, params)
        return self.station.pause()

    async def _resume(self, params: dict[str, Any]) -> Any:
        parse_params(NoParams, params)
        return self.station.resume()

    async def _reload(self, params: dict[str, Any]) -> Any:
        parse_params(NoParams, params)
        return await self.station.reload()

    async def _push_profile(self, params: dict[str, Any]) -> Any:
        p = parse_params(ProfileParams, params)
        # Errors name this origin as their file: "pushed profile:12: points.speed.type: ..."
        try:
            return await self.station.push_profile(
                p.yaml, "pushed profile", signature=p.signature, rollback=p.rollback
            )
        except ProfileRefused as err:
            raise CommandError("profile_refused", f"{err.reason}: {err}") from None

    async def _rollback_profile(self, params: dict[str, Any]) -> Any:
        parse_params(NoParams, params)
        return await self.station.rollback_profile()

    async def _read(self, params: dict[str, Any]) -> Any:
        p = parse_params(ReadParams, params)
        await self._between_cycles()
        profile = self.station.profile
        unknown = [n for n in p.points if n not in profile.points]
        if unknown:
            raise CommandError("unknown_point", _unknown(unknown, profile))
        values = await self.station.driver.read(p.points)
        return {
            "values": {n: jsonable(v) for n, v in values.items()},
            "time": iso(time.time()),
        }

    async def _between_cycles(self) -> None:
        """Wait (at most READ_WAIT) for the station cycle holding the machine to end: a read sent
        into a cycle holds up the cycle's next request by a round trip, one sent as it ends
        overlaps with the next part's tag and checks. A longer cycle is read beside."""
        lock = self.station.machine_lock
        if lock.locked():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(READ_WAIT), lock:
                    pass

    async def _write(self, params: dict[str, Any]) -> Any:
        p = parse_params(WriteParams, params)
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


def _unknown(names: list[str], profile: Profile) -> str:
    return (
        f"no point named {', '.join(repr(n) for n in names)} in profile "
        f"{profile.name} {profile.version}"
    )
