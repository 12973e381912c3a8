"""What a tag says about its part, once decoded and verified.

Plain frozen data: the codec (``codec.py``) builds these from tag bytes, the station cycle reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

ParamValue = int | float | bool | str


@dataclass(frozen=True)
class Step:
    """One operation of the routing, with the parameters the machine is to be set to."""

    operation: str
    parameters: Mapping[str, ParamValue]
    station: str | None = None  # None: any station whose machine supports the operation


@dataclass(frozen=True)
class Traveler:
    """The signed instructions written once by the MES. Verified before it is constructed."""

    part_id: str
    product: str
    variant: str
    order: str
    steps: tuple[Step, ...]
    key_id: str
    tag_uid: bytes
    material_lot: str | None = None
    issued_at: int | None = None  # unix seconds
    digest: bytes = b""  # SHA-256 of the signed bytes: identifies this exact traveler


class StepStatus(StrEnum):
    OK = "ok"
    FAILED = "failed"


@dataclass(frozen=True)
class StepRecord:
    """What a station wrote onto the tag after working on one step."""

    status: StepStatus
    station: str
    time: int  # unix seconds


@dataclass(frozen=True)
class Progress:
    """Per-step records; ``records[i]`` belongs to ``traveler.steps[i]`` (None: not attempted)."""

    seq: int = 0
    records: tuple[StepRecord | None, ...] = field(default_factory=tuple)

    def done(self, index: int) -> bool:
        record = self.records[index] if index < len(self.records) else None
        return record is not None and record.status is StepStatus.OK

    def next_undone(self, step_count: int) -> int | None:
        for i in range(step_count):
            if not self.done(i):
                return i
        return None

    def with_record(self, index: int, record: StepRecord, step_count: int) -> Progress:
        records = list(self.records) + [None] * (step_count - len(self.records))
        records[index] = record
        return Progress(seq=self.seq + 1, records=tuple(records))
