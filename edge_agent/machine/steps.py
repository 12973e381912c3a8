"""The handshake a firmware profile declares, as steps, and which points those steps touch.

The profile (``machine/profile.py``) holds the steps, the safety rules (``machine/rules.py``) judge
them, the station (``station/handshake.py``) runs them on a driver. Every step is one small model;
a YAML step validates as the first model it fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field

from ..yamlfile import StrictModel


class WriteParameters(StrictModel):
    action: Literal["write_parameters"] = "write_parameters"


class ReadResults(StrictModel):
    action: Literal["read_results"] = "read_results"


class WritePoint(StrictModel):
    write: str
    value: float | int | bool | str | None = None  # None: the operation's program number


class SetPoint(StrictModel):
    set: str


class ResetPoint(StrictModel):
    reset: str


class WaitFor(StrictModel):
    wait: str
    equals: float | int | bool | str = True
    timeout: float = Field(10.0, gt=0, le=3600)


class ReadError(StrictModel):
    read_error: str
    ok: int = 0  # the value that means "no error"


class CallMethod(StrictModel):
    call: str  # driver-specific method address
    args: list[str] = []  # recipe parameter names passed in order
    results: list[str] = []  # names given to the output arguments in the report


HandshakeStep = (
    WriteParameters
    | ReadResults
    | WritePoint
    | SetPoint
    | ResetPoint
    | WaitFor
    | ReadError
    | CallMethod
)

#: A profile's ``handshake:`` or ``on_abort:`` list, each step the first model it fits.
Steps = list[Annotated[HandshakeStep, Field(union_mode="left_to_right")]]


def bare_words(v: Any) -> Any:
    """``- write_parameters`` (a bare word) is short for ``- {action: write_parameters}``."""
    return [{"action": s} if isinstance(s, str) else s for s in v] if isinstance(v, list) else v


@dataclass(frozen=True)
class HandshakePoints:
    """The points the handshake and ``on_abort`` touch, by what they do with them."""

    set: frozenset[str]
    reset: frozenset[str]
    write: frozenset[str]  # `write:` steps: the program number or a constant
    wait: frozenset[str]
    read: frozenset[str]  # `read_error:` steps
    program: str | None  # the point a `write:` without a value gives the program number

    @classmethod
    def of(cls, steps: Sequence[HandshakeStep]) -> HandshakePoints:
        def named(kind: type[Any], attr: str) -> frozenset[str]:
            return frozenset(getattr(s, attr) for s in steps if isinstance(s, kind))

        program = next(
            (s.write for s in steps if isinstance(s, WritePoint) and s.value is None), None
        )
        return cls(
            set=named(SetPoint, "set"),
            reset=named(ResetPoint, "reset"),
            write=named(WritePoint, "write"),
            wait=named(WaitFor, "wait"),
            read=named(ReadError, "read_error"),
            program=program,
        )

    @property
    def all(self) -> frozenset[str]:
        return self.set | self.reset | self.write | self.wait | self.read

    def role(self, point: str) -> str:
        """What the handshake does with ``point``, for messages: "set", "wait", ..."""
        for role in ("set", "reset", "write", "wait", "read"):
            if point in getattr(self, role):
                return "read_error" if role == "read" else role
        return ""
