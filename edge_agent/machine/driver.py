"""The one interface every machine driver implements; the station cycle knows no other.

A driver is found by the name a firmware profile gives (``driver: modbus``), see ``registry.py``.
Encoding is pure and happens before any I/O, so every value of a step is checked against the
profile (type, scale, limits) before the first byte goes to the machine.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from ..errors import ConfigError, ConfigProblem, MachineFault
from .profile import Profile
from .profile_schema import BasePoint
from .steps import WritePoint
from .values import Accepted, Refused

RawValue = Any  # driver-specific wire form: Modbus register words or bools, an OPC UA Variant, ...


class MachineDriver(ABC):
    """A connection to one machine, addressed through the points of one firmware profile."""

    #: A short human name for logs and errors, e.g. "modbus 10.0.0.5:502 unit 1".
    device: str
    #: Successful connections so far: a change means a new session since the last look.
    sessions: int = 0

    @abstractmethod
    async def connect(self) -> None:
        """Open the connection; raise MachineError when the machine cannot be reached."""

    @abstractmethod
    def attempt_now(self) -> None:
        """Let the next ``connect()`` try at once, whatever its backoff says (a part is waiting)."""

    @abstractmethod
    async def close(self) -> None:
        """Close the connection. Never raises."""

    @property
    @abstractmethod
    def connected(self) -> bool: ...

    @abstractmethod
    def encode(self, point: str, value: Any) -> RawValue:
        """Turn an engineering value into the wire form of ``point``. Pure, no I/O.

        Raises ValueError with a message naming the point when the value does not fit the type.
        """

    @abstractmethod
    def raw_for_report(self, raw: RawValue) -> Any:
        """A JSON-serialisable rendering of an encoded value (e.g. the list of register words)."""

    @abstractmethod
    async def write(self, values: Mapping[str, RawValue]) -> None:
        """Write encoded values in as few requests as the protocol allows."""

    @abstractmethod
    async def read(self, points: Sequence[str]) -> dict[str, Any]:
        """Read points and return engineering values, in as few requests as the protocol allows."""

    @abstractmethod
    async def wait_until(self, point: str, expected: Any, timeout: float) -> None:
        """Return once ``point`` equals ``expected``; raise MachineFault after ``timeout`` s."""


@runtime_checkable
class PushingDriver(Protocol):
    """Optional capability of a driver whose machine pushes changes (OPC UA subscriptions).

    Telemetry asks such a driver to watch a group's points instead of reading them on a timer.
    """

    async def watch(self, points: Sequence[str], interval: float) -> None:
        """Have the machine push changes of ``points``, sampled every ``interval`` s, from now on
        and after every reconnect. Raise MachineError when it cannot be set up now."""

    def latest(self, points: Sequence[str]) -> tuple[dict[str, Any], float] | None:
        """The last pushed values and the newest source time (unix s) among them; None while a
        point has no value yet. Raise MachineError while the connection is down."""

    async def changed(self, timeout: float) -> None:
        """Return at the next pushed change, or after ``timeout`` s."""


Point = TypeVar("Point", bound=BasePoint)


def points_of(profile: Profile, kind: type[Point]) -> dict[str, Point]:
    """The profile's points, each checked to be of the driver's own point model."""
    points: dict[str, Point] = {}
    for name, point in profile.points.items():
        if not isinstance(point, kind):
            raise TypeError(f"point '{name}' of profile {profile.name} is not a {kind.__name__}")
        points[name] = point
    return points


def point_named(points: Mapping[str, Point], name: str, profile: Profile) -> Point:
    """``points[name]``; ValueError naming the profile when it has no point of that name."""
    try:
        return points[name]
    except KeyError:
        raise ValueError(f"{name}: no such point in profile {profile.name}") from None


def check_profile_constants(driver: MachineDriver, profile: Profile) -> None:
    """Encode every value the profile itself supplies (handshake values, program numbers,
    parameter defaults) now, so that a bad one stops the agent at start instead of failing a
    handshake halfway, after the parameters went to the machine. Limits and the register grid
    were checked when the profile was loaded; this adds what only the driver knows (a string's
    bytes in its encoding, a server's data types)."""
    problems: list[ConfigProblem] = []

    def check(path: str, point: str, checked: Accepted | Refused) -> None:
        if isinstance(checked, Refused):
            problems.append(ConfigProblem(profile.source, None, path, checked.message))
            return
        try:
            driver.encode(point, checked.value)
        except ValueError as err:
            problems.append(ConfigProblem(profile.source, None, path, str(err)))

    for section in ("handshake", "on_abort"):
        for i, step in enumerate(getattr(profile, section)):
            if not isinstance(step, WritePoint) or step.write not in profile.points:
                continue
            if step.value is not None:
                check(
                    f"{section}[{i}]", step.write, profile.check_value(step.value, point=step.write)
                )
                continue
            for name, op in profile.operations.items():
                if op.program is not None:
                    checked = profile.check_value(op.program, point=step.write)
                    check(f"operations.{name}.program", step.write, checked)
    for name, op in profile.operations.items():
        for param, spec in op.parameters.items():
            if spec.default is not None:
                checked = profile.check_value(spec.default, operation=name, parameter=param)
                check(f"operations.{name}.parameters.{param}.default", spec.point, checked)
    if problems:
        raise ConfigError(problems)


def values_equal(value: Any, expected: Any) -> bool:
    """Does a value read from the machine equal what a wait expects? Numbers compare with tolerance."""
    if isinstance(value, bool) or isinstance(expected, bool):
        return bool(value == expected)
    if isinstance(value, int | float) and isinstance(expected, int | float):
        return math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-9)
    return bool(value == expected)


def show_value(value: Any) -> str:
    """A value as a profile would write it (true/false, quoted text), for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    return str(value)


class Wait:
    """One ``wait_until``: the value it waits for, the value last seen and the time left.

    Drivers differ in how they learn a new value (Modbus polls, OPC UA is notified); the test of
    a value and the timeout, with its message, are the same for all.
    """

    def __init__(self, device: str, point: str, expected: Any, timeout: float) -> None:
        self.device, self.point, self.expected, self.timeout = device, point, expected, timeout
        self.deadline = time.monotonic() + timeout
        self.last: Any = None

    def met(self, value: Any) -> bool:
        """Is ``value``, just read or notified, the one waited for?"""
        self.last = value
        return values_equal(value, self.expected)

    def remaining(self) -> float:
        """Seconds left; MachineFault naming the point and the last value seen once none are."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise MachineFault(
                f"{self.point} did not become {show_value(self.expected)} within "
                f"{float(self.timeout)} s (last value {show_value(self.last)})",
                device=self.device,
            )
        return left

    def __str__(self) -> str:
        return f"{self.point} to become {show_value(self.expected)}"
