"""The firmware profile's file format, validation stage 1: the generic schema every profile meets.

What every driver's point has (``BasePoint``; each driver adds its addressing), the operations and
their recipe parameters, telemetry groups and the document itself. Points stay plain dicts here
until their driver's point model validates them (stage 2, ``machine/profile.py``); the handshake
is a list of the steps in ``machine/steps.py``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from ..yamlfile import StrictModel
from . import registry
from .codec import PointType
from .steps import Steps, bare_words


class BasePoint(StrictModel):
    """What every driver's point has. Drivers subclass this with their addressing fields.

    Engineering value = raw * scale + offset. ``min``/``max`` are the machine's safe envelope in
    engineering units: a value outside is refused before anything is written.
    """

    type: PointType
    unit: str | None = None
    scale: float = 1.0
    offset: float = 0.0
    min: float | None = None
    max: float | None = None
    length: int | None = Field(None, ge=1, description="string points: characters")
    description: str | None = None

    @field_validator("scale")
    @classmethod
    def _scale_nonzero(cls, v: float) -> float:
        if v == 0 or not math.isfinite(v):
            raise ValueError("scale must be a finite, non-zero number")
        return v

    @property
    def writable(self) -> bool:
        return True

    def cells(self) -> frozenset[tuple[str, int | str]]:
        """The machine memory the point occupies, as (area, address) pairs: two points sharing a
        pair are the same register. Drivers override it; the base point names none."""
        return frozenset()


class ParameterSpec(StrictModel):
    """A recipe parameter of one operation and the point it is written to."""

    point: str
    min: float | None = None  # narrower than the point's envelope for this operation
    max: float | None = None
    default: float | int | bool | str | None = None  # used when the recipe does not give it

    def limits(self, point: BasePoint) -> tuple[float | None, float | None]:
        """The effective [min, max] of the parameter: its own, within ``point``'s envelope."""
        return _tighter(point.min, self.min, max), _tighter(point.max, self.max, min)


def _tighter(a: float | None, b: float | None, pick: Any) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return float(pick(a, b))


class Operation(StrictModel):
    program: int | None = None  # written by the handshake's `write: <program point>` step
    parameters: dict[str, ParameterSpec] = {}
    results: list[str] = []
    description: str | None = None

    @field_validator("parameters", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        # `speed: spindle_speed` is short for `speed: {point: spindle_speed}`
        if isinstance(v, dict):
            return {k: ({"point": p} if isinstance(p, str) else p) for k, p in v.items()}
        return v


class TelemetryPoint(StrictModel):
    """One watched point: reported when it moves by more than ``deadband`` (0: any change)."""

    deadband: float = Field(0.0, ge=0)


class TelemetryGroup(StrictModel):
    """Points watched together every ``interval`` s (read on Modbus, subscribed on OPC UA) and
    reported by exception, one message per read or publish.

    Every ``full_every`` s (and after a gap in the data) the report carries every point.
    ``max_gap`` is how many unused addresses a read may bridge to merge requests (Modbus).
    """

    interval: float = Field(gt=0, le=3600)
    full_every: float = Field(60.0, gt=0, le=86400)
    max_gap: int = Field(8, ge=0, le=120)
    qos: Literal[0, 1] = 1
    points: dict[str, TelemetryPoint] = Field(min_length=1)

    @field_validator("points", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        # `points: [a, b]` is short for `points: {a: {}, b: {}}`; `a: 5` for `a: {deadband: 5}`
        if isinstance(v, list):
            return {name: {} for name in v}
        if isinstance(v, dict):
            return {
                k: ({} if d is None else {"deadband": d} if isinstance(d, int | float) else d)
                for k, d in v.items()
            }
        return v


class ProfileDoc(StrictModel):
    """Stage 1: the generic schema. Points stay plain dicts until their driver validates them."""

    profile: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    version: str = Field(min_length=1)
    driver: str
    description: str | None = None
    defaults: dict[str, Any] = {}  # driver-specific defaults merged into every point
    points: dict[str, dict[str, Any]]
    operations: dict[str, Operation] = Field(min_length=1)
    handshake: Steps = Field(min_length=1)
    on_abort: Steps = []
    #: An integer point the machine adds one to per cycle: `ok` then also needs it to advance by one.
    cycle_counter: str | None = None
    telemetry: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]+$")], TelemetryGroup] = {}

    @field_validator("handshake", "on_abort", mode="before")
    @classmethod
    def _bare_words(cls, v: Any) -> Any:
        return bare_words(v)

    @field_validator("driver")
    @classmethod
    def _known_driver(cls, v: str) -> str:
        if v not in registry.DRIVERS:
            raise ValueError(f"unknown driver '{v}' (known: {', '.join(sorted(registry.DRIVERS))})")
        return v
