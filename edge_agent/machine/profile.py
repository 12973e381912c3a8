"""Firmware profiles: one YAML per machine model and firmware version.

A profile is data, not code: the machine's points (where a value lives, its type and scaling, its
safe limits), the operations the machine supports (which recipe parameter goes to which point) and
the handshake as declared steps. Validation runs in three stages and reports every problem:
  1. the generic schema (``profile_schema.py``; the handshake's steps in ``steps.py``),
  2. each point against its driver's own point model (``registry.driver_module(...).POINT_MODEL``),
  3. whole-profile rules (``rules.py``): referenced points exist, limits fit the type, the
     handshake means a machine cycle, machine memory is owned once, limits lie on the register grid.
Whether a value may be written, and what the machine then holds, is ``Profile.check_value``.
"""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..errors import ConfigError, ConfigProblem
from ..yamlfile import Lines, add_suggestions, load_yaml, problems_from_validation
from . import registry
from .codec import INT_RANGES as INT_RANGES
from .codec import PointType as PointType
from .profile_schema import BasePoint, ProfileDoc
from .rules import check_references, check_safety, reporter
from .steps import HandshakePoints
from .values import Accepted, Refused, check_value

if TYPE_CHECKING:
    from .profile_signature import ProfileSignature


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
        return spec.limits(self.points[spec.point])

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
    add = reporter(file, lines, problems)
    if not problems:
        check_references(doc, points, add)
    if not problems:  # the safety rules need every name to resolve
        check_safety(doc, points, add)
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
