"""The cycle report: what one cycle did, the one object every output receives.

The station cycle fills it in; each output (``line/outputs.py``) takes it as it is and chooses its
own topic, retention and encoding: the JSON topics send ``to_json()`` (the cycle schema of
docs/mqtt.md), ThingsBoard and Sparkplug read its attributes, the metrics count it.

A report is encoded up to three times per cycle (held twice ahead of the machine and the tag,
then released), so ``to_json`` encodes the fields that no longer change once the step is verified
(part, step, parameters, profile, ...) once and reuses them while those fields are the same
objects: replace them, never change them in place, once the report has been held.
"""

from __future__ import annotations

import json
import operator
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from json.encoder import encode_basestring
from typing import Any, TypedDict

from ..errors import Reason

SCHEMA = "edge-agent/cycle/1"


def _encoder() -> Callable[[Any], str]:
    """JSON as the uplink writes every other message (``uplink/payload.py``: compact, UTF-8,
    ``str()`` for what JSON has no type for), so the bytes are the same. The C encoder is made
    once here rather than at each call (a third of the time for a small dict)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator: the plain encoder
        return json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode
    chunks = make(None, str, encode_basestring, None, ":", ",", False, False, True)
    return lambda value: "".join(chunks(value, 0))


_json = _encoder()


def _text(value: str | None) -> str:
    return "null" if value is None else encode_basestring(value)


class Status(StrEnum):
    OK = "ok"  # this part's cycle ran
    REJECTED = "rejected"  # the machine was not touched
    FAILED = "failed"  # the machine was touched (or may have been); its abort steps ran


class Part(TypedDict, total=False):
    """The part on the tag; empty when the tag could not be decoded."""

    id: str
    product: str
    variant: str
    order: str
    material_lot: str | None


class StepRef(TypedDict):
    index: int  # 0-based
    count: int
    operation: str


@dataclass(frozen=True)
class IfStopped:
    """What a report held ahead says instead of the cycle's current state (None: as it is), were
    the agent to stop before the cycle's next step (crash, power loss)."""

    status: Status | None = None
    reason: Reason | None = None
    error: str | None = None
    machine_state: str | None = None
    tag_write: str | None = None


_AS_IT_IS = IfStopped()


def _now() -> datetime:
    # Milliseconds, as the report says it: the time read back is the time sent.
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


@dataclass
class CycleReport:
    """Everything the line needs to know about one cycle."""

    gateway_id: str
    station: str
    tag_uid: str
    status: Status = Status.REJECTED
    reason: Reason | None = None  # stable code for rejected/failed (docs/mqtt.md)
    error: str | None = None  # the message for a person
    part: Part = field(default_factory=lambda: Part())
    step: StepRef | None = None
    parameters: list[dict[str, Any]] = field(default_factory=list)  # as written to the machine
    results: dict[str, Any] = field(default_factory=dict)
    durations_ms: dict[str, float] = field(default_factory=dict)
    key_id: str | None = None
    tag_write: str = "skipped"  # ok | skipped | failed: <why>
    # untouched | cycle complete | aborted (trigger reset) | abort failed: ... | not idle
    machine_state: str = "untouched"
    profile: dict[str, str] = field(default_factory=dict)
    adjustments: dict[str, Any] | None = None  # version applied and each change; None: no set
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    time: datetime = field(default_factory=_now)  # UTC, whole milliseconds
    #: The fixed fields as last encoded: (the objects, their JSON pieces).
    _encoded: tuple[tuple[Any, ...], tuple[str, str, str, str]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def epoch_ms(self) -> int:
        """``time`` as Unix milliseconds (ThingsBoard's ``ts``, Sparkplug's timestamps)."""
        return int(self.time.timestamp() * 1000)

    def to_json(self, seq: int | None = None, stopped: IfStopped = _AS_IT_IS) -> bytes:
        """The report on the JSON topics (docs/mqtt.md), with the uplink's ``seq`` when given;
        ``stopped``: what it says while held ahead."""
        head, middle, key, tail = self._fixed()
        s = stopped
        text = (
            f'{head}"status":{_text(s.status or self.status)},'
            f'"reason":{_text(s.reason or self.reason)},"error":{_text(s.error or self.error)},'
            f'{middle}"results":{_json(self.results)},"durations_ms":{_json(self.durations_ms)},'
            f'{key}"tag_write":{_text(s.tag_write or self.tag_write)},'
            f'"machine_state":{_text(s.machine_state or self.machine_state)},{tail}'
            + ("}" if seq is None else f',"seq":{seq}}}')
        )
        return text.encode()

    def as_message(self) -> dict[str, Any]:
        """The report as its JSON readers see it."""
        message: dict[str, Any] = json.loads(self.to_json())
        return message

    def _fixed(self) -> tuple[str, str, str, str]:
        fields = (
            *(self.id, self.gateway_id, self.station, self.tag_uid, self.part, self.step),
            *(self.parameters, self.key_id, self.profile, self.adjustments, self.time),
        )
        if self._encoded is not None and all(map(operator.is_, self._encoded[0], fields)):
            return self._encoded[1]
        pieces = (
            f'{{"id":{_text(self.id)},"schema":"{SCHEMA}","gateway_id":{_text(self.gateway_id)},'
            f'"station":{_text(self.station)},"tag_uid":{_text(self.tag_uid)},',
            f'"part":{_json(self.part)},"step":{_json(self.step)},'
            f'"parameters":{_json(self.parameters)},',
            f'"key_id":{_text(self.key_id)},',
            f'"profile":{_json(self.profile)},"adjustments":{_json(self.adjustments)},'
            f'"time":"{self.time.isoformat(timespec="milliseconds")}"',
        )
        self._encoded = (fields, pieces)
        return pieces
