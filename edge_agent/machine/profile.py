"""Firmware profiles: one YAML per machine model and firmware version.

A profile is data, not code: the machine's points (where a value lives, its type and scaling, its
safe limits), the operations the machine supports (which recipe parameter goes to which point) and
the handshake as declared steps. Validation runs in three stages and reports every problem:
  1. the generic schema (this module),
  2. each point against its driver's own point model (``registry.driver_module(...).POINT_MODEL``),
  3. whole-profile rules: referenced points exist, limits fit the type, and the safety rules of
     ``rules.py`` (the handshake's meaning, machine memory owned once, limits on the register grid).
Whether a value may be written, and what the machine then holds, is ``Profile.check_value``.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError, ConfigProblem
from ..yamlfile import Lines, add_suggestions, load_yaml, problems_from_validation
from . import registry
from .codec import INT_RANGES as INT_RANGES
from .codec import PointType as PointType
from .rules import HandshakePoints, check_safety, reporter
from .values import Accepted, Refused, check_value

if TYPE_CHECKING:
    from .profile_signature import ProfileSignature


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BasePoint(_Strict):
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


class ParameterSpec(_Strict):
    """A recipe parameter of one operation and the point it is written to."""

    point: str
    min: float | None = None  # narrower than the point's envelope for this operation
    max: float | None = None
    default: float | int | bool | str | None = None  # used when the recipe does not give it


class Operation(_Strict):
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


class WriteParameters(_Strict):
    action: Literal["write_parameters"] = "write_parameters"


class ReadResults(_Strict):
    action: Literal["read_results"] = "read_results"


class WritePoint(_Strict):
    write: str
    value: float | int | bool | str | None = None  # None: the operation's program number


class SetPoint(_Strict):
    set: str


class ResetPoint(_Strict):
    reset: str


class WaitFor(_Strict):
    wait: str
    equals: float | int | bool | str = True
    timeout: float = Field(10.0, gt=0, le=3600)


class ReadError(_Strict):
    read_error: str
    ok: int = 0  # the value that means "no error"


class CallMethod(_Strict):
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


class TelemetryPoint(_Strict):
    """One watched point: reported when it moves by more than ``deadband`` (0: any change)."""

    deadband: float = Field(0.0, ge=0)


class TelemetryGroup(_Strict):
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


def _step_from_yaml(v: Any) -> Any:
    # `- write_parameters` (a bare word) is short for `- {action: write_parameters}`
    return {"action": v} if isinstance(v, str) else v


class ProfileDoc(_Strict):
    """Stage 1: the generic schema. Points stay plain dicts until their driver validates them."""

    profile: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    version: str = Field(min_length=1)
    driver: str
    description: str | None = None
    defaults: dict[str, Any] = {}  # driver-specific defaults merged into every point
    points: dict[str, dict[str, Any]]
    operations: dict[str, Operation] = Field(min_length=1)
    handshake: list[Annotated[HandshakeStep, Field(union_mode="left_to_right")]] = Field(
        min_length=1
    )
    on_abort: list[Annotated[HandshakeStep, Field(union_mode="left_to_right")]] = []
    #: An integer point the machine adds one to per cycle: `ok` then also needs it to advance by one.
    cycle_counter: str | None = None
    telemetry: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]+$")], TelemetryGroup] = {}

    @field_validator("handshake", "on_abort", mode="before")
    @classmethod
    def _bare_words(cls, v: Any) -> Any:
        return [_step_from_yaml(s) for s in v] if isinstance(v, list) else v

    @field_validator("driver")
    @classmethod
    def _known_driver(cls, v: str) -> str:
        if v not in registry.DRIVERS:
            raise ValueError(f"unknown driver '{v}' (known: {', '.join(sorted(registry.DRIVERS))})")
        return v


class Profile:
    """A validated firmware profile, ready for the station cycle."""

    def __init__(self, doc: ProfileDoc, points: dict[str, BasePoint], source: str, digest: str):
        self.name = doc.profile
        self.version = doc.version
        self.driver = doc.driver
        self.description = doc.description
        self.points = points
        self.operations = doc.operations
        self.handshake = doc.handshake
        self.on_abort = doc.on_abort
        self.cycle_counter = doc.cycle_counter
        self.telemetry = doc.telemetry
        self.source = source
        self.content_hash = digest  # "sha256:<hex>" of the file's bytes, reported with every cycle
        self.signature: ProfileSignature | None = None  # set once its signature was verified
        #: What the handshake and on_abort touch; it belongs to the station cycle.
        self.handshake_points = HandshakePoints.of([*doc.handshake, *doc.on_abort])

    def describe(self) -> dict[str, str]:
        """Which envelope judged a part: in every cycle report, the status and profile events."""
        described = {"name": self.name, "version": self.version, "hash": self.content_hash}
        if self.signature is not None:
            described.update(signed_by=self.signature.key_id, signed_at=self.signature.signed_at)
        return described

    def parameter_limits(self, operation: str, parameter: str) -> tuple[float | None, float | None]:
        """The effective [min, max] of a parameter: the operation's, within the point's."""
        spec = self.operations[operation].parameters[parameter]
        point = self.points[spec.point]
        lo = _tighter(point.min, spec.min, max)
        hi = _tighter(point.max, spec.max, min)
        return lo, hi

    def check_value(
        self,
        value: Any,
        *,
        point: str | None = None,
        operation: str | None = None,
        parameter: str | None = None,
    ) -> Accepted | Refused:
        """May ``value`` be written, and what will the machine hold? For a recipe parameter give
        ``operation`` and ``parameter`` (the operation's limits apply, within the point's); for
        a point written directly give ``point``. Raises KeyError for names not in the profile."""
        if operation is not None and parameter is not None:
            name = self.operations[operation].parameters[parameter].point
            lo, hi = self.parameter_limits(operation, parameter)
            return check_value(self.points[name], value, label=parameter, lo=lo, hi=hi)
        if point is None:
            raise TypeError("give point, or operation and parameter")
        p = self.points[point]
        return check_value(p, value, label=point, lo=p.min, hi=p.max)

    def handshake_owner(self, point: str) -> str | None:
        """The handshake point ``point`` is, or shares machine memory with (by address, so an
        alias under another name is caught too); None when the handshake does not touch it."""
        touched = self.handshake_points.all
        if point in touched:
            return point
        cells = self.points[point].cells()
        for name in sorted(touched):
            if name in self.points and cells & self.points[name].cells():
                return name
        return None


def _tighter(a: float | None, b: float | None, pick: Any) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return float(pick(a, b))


def load_profile(path: str | Path, text: str | None = None) -> Profile:
    """Load and validate a firmware profile; raise ConfigError listing every problem."""
    file = str(path)
    try:
        raw = Path(path).read_bytes() if text is None else text.encode()
    except OSError as err:
        raise ConfigError(
            [ConfigProblem(file, None, "", f"cannot read firmware profile: {err.strerror}")]
        ) from err
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            [ConfigProblem(file, None, "", f"not UTF-8 text (byte {err.start})")]
        ) from err
    data, lines = load_yaml(path, source)
    try:
        doc = ProfileDoc.model_validate(data)
    except ValidationError as err:
        found = problems_from_validation(err, file, lines)
        add_suggestions(found, ProfileDoc)  # did you mean, for handshake keys too
        raise ConfigError(found) from err

    problems: list[ConfigProblem] = []
    points = _validate_points(doc, file, lines, problems)
    if not problems:
        _check_references(doc, points, file, lines, problems)
        _check_cycle_counter(doc, points, file, lines, problems)
    if not problems:  # the safety rules need every name to resolve
        check_safety(doc, points, reporter(file, lines, problems))
    if problems:
        raise ConfigError(problems)
    return Profile(doc, points, file, "sha256:" + hashlib.sha256(raw).hexdigest())


def _validate_points(
    doc: ProfileDoc, file: str, lines: Lines, problems: list[ConfigProblem]
) -> dict[str, BasePoint]:
    model: type[BasePoint] = registry.driver_module(doc.driver).POINT_MODEL
    # A misspelt default is one mistake, reported once at `defaults`, not once per point.
    defaults = {k: v for k, v in doc.defaults.items() if k in model.model_fields}
    for key in doc.defaults.keys() - defaults.keys():
        close = difflib.get_close_matches(key, list(model.model_fields), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        problems.append(
            ConfigProblem(
                file, lines.get(("defaults", key)), f"defaults.{key}", "unknown key" + hint
            )
        )
    points: dict[str, BasePoint] = {}
    for name, spec in doc.points.items():
        try:
            points[name] = model.model_validate({**defaults, **spec})
        except ValidationError as err:
            found = problems_from_validation(err, file, lines, ("points", name))
            add_suggestions(found, model, skip=2)
            for problem in found:  # a bad default is one mistake, at `defaults`, not per point
                key = problem.path.split(".")[2] if problem.path.count(".") >= 2 else ""
                if key in defaults and key not in spec:
                    problem = ConfigProblem(
                        file, lines.get(("defaults", key)), f"defaults.{key}", problem.message
                    )
                if problem not in problems:
                    problems.append(problem)
    return points


def _check_references(
    doc: ProfileDoc,
    points: dict[str, BasePoint],
    file: str,
    lines: Lines,
    problems: list[ConfigProblem],
) -> None:
    def problem(path: tuple[str | int, ...], message: str) -> None:
        line = None
        for end in range(len(path), -1, -1):
            if path[:end] in lines:
                line = lines[path[:end]]
                break
        dotted = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in path).replace(
            ".[", "["
        )
        problems.append(ConfigProblem(file, line, dotted, message))

    def known(point: str, path: tuple[str | int, ...], *, write: bool = False) -> bool:
        if point not in points:
            problem(path, f"no point named '{point}' in points")
            return False
        if write and not points[point].writable:
            problem(path, f"point '{point}' is read-only and cannot be written")
            return False
        return True

    for name, point in points.items():
        _check_point_limits(point, lambda m, n=name: problem(("points", n), m))

    for op_name, op in doc.operations.items():
        for param, spec in op.parameters.items():
            path: tuple[str | int, ...] = ("operations", op_name, "parameters", param)
            if not known(spec.point, path, write=True):
                continue
            point = points[spec.point]
            if spec.min is not None and point.min is not None and spec.min < point.min:
                problem(path, f"min {spec.min} is below the point's safe minimum {point.min}")
            if spec.max is not None and point.max is not None and spec.max > point.max:
                problem(path, f"max {spec.max} is above the point's safe maximum {point.max}")
        for i, result in enumerate(op.results):
            known(result, ("operations", op_name, "results", i))

    for section in ("handshake", "on_abort"):
        for i, step in enumerate(getattr(doc, section)):
            path = (section, i)
            if isinstance(step, WritePoint):
                known(step.write, path, write=True)
                if step.value is None and any(op.program is None for op in doc.operations.values()):
                    missing = [n for n, op in doc.operations.items() if op.program is None]
                    problem(
                        path,
                        f"writes the program number, but operations {missing} have no 'program'",
                    )
            elif isinstance(step, SetPoint):
                known(step.set, path, write=True)
            elif isinstance(step, ResetPoint):
                known(step.reset, path, write=True)
            elif isinstance(step, (WaitFor, ReadError)):
                name = step.wait if isinstance(step, WaitFor) else step.read_error
                if known(name, path) and isinstance(step, WaitFor):
                    mismatch = _value_kind_mismatch(points[name].type, step.equals)
                    if mismatch:
                        problem(path, f"equals {step.equals!r}: {mismatch}")
            elif isinstance(step, CallMethod):
                for arg in step.args:  # the handshake is shared: every operation must have it
                    lacking = [n for n, op in doc.operations.items() if arg not in op.parameters]
                    if lacking:
                        problem(path, f"passes parameter '{arg}', which operations {lacking} lack")

    for group_name, group in doc.telemetry.items():
        for point_name in group.points:
            known(point_name, ("telemetry", group_name, "points", point_name))


def _check_cycle_counter(
    doc: ProfileDoc,
    points: dict[str, BasePoint],
    file: str,
    lines: Lines,
    problems: list[ConfigProblem],
) -> None:
    name = doc.cycle_counter
    if name is None:
        return
    message = None
    if name not in points:
        close = difflib.get_close_matches(name, list(points), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        message = f"no point named '{name}' in points{hint}"
    elif points[name].type not in INT_RANGES:
        message = f"point '{name}' is {points[name].type.value}: a cycle counter is an integer"
    elif points[name].scale != 1 or points[name].offset != 0:
        message = f"point '{name}' has a scale or offset: a cycle counter counts whole cycles"
    if message is not None:
        line = lines.get(("cycle_counter",))
        problems.append(ConfigProblem(file, line, "cycle_counter", message))


def _value_kind_mismatch(type_: PointType, value: Any) -> str | None:
    """Why ``value`` can never be read from a point of ``type_`` (a wait would always time out)."""
    if type_ is PointType.BOOL:
        return None if isinstance(value, bool) else "the point is a bool: use true or false"
    if type_ is PointType.STRING:
        return None if isinstance(value, str) else "the point is a string"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"the point is a number ({type_.value})"
    return None


def _check_point_limits(point: BasePoint, problem: Any) -> None:
    if point.min is not None and point.max is not None and point.min > point.max:
        problem(f"min {point.min} is greater than max {point.max}")
    if point.type in INT_RANGES:
        lo, hi = INT_RANGES[point.type]
        eng_lo = sorted((lo * point.scale + point.offset, hi * point.scale + point.offset))
        for label, limit in (("min", point.min), ("max", point.max)):
            if limit is not None and not eng_lo[0] <= limit <= eng_lo[1]:
                problem(
                    f"{label} {limit} cannot be represented by {point.type.value} with scale "
                    f"{point.scale} and offset {point.offset} (range {eng_lo[0]}..{eng_lo[1]})"
                )
    if point.type is PointType.STRING and point.length is None:
        problem("string points need 'length' (characters)")
