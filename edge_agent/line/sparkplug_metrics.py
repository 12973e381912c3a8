"""Sparkplug B metrics of a station: the catalogue a birth declares, and payload encoding.

The schema is Eclipse Tahu's ``sparkplug_b.proto``; its compiled classes come from the
``sparkplug`` extra (``esio-spb-builder``: the only Sparkplug package that installs beside paho-mqtt
2 on a supported protobuf runtime; its descriptor is byte-identical to the one pysparkplug and
mqtt-spb-wrapper ship). Only the generated ``Payload`` classes are used; topics, lifecycle and
sequence numbers are ``sparkplug.py``'s.

Aliases are given in catalogue order, starting at 1 on the node and at 1 on the device; a profile
change makes a new catalogue, announced by a new DBIRTH.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from esio_spb_builder.core import sparkplug_b_pb2 as pb

from ..machine.profile import PointType, Profile
from ..machine.steps import CallMethod
from ..station.report import CycleReport

log = structlog.get_logger("sparkplug")

DataType = pb.DataType
Payload = pb.Payload

#: Cycle report durations (``durations_ms`` keys) published as ``Cycle/Duration/<key> ms``.
DURATIONS = (
    *("total", "tag_read", "verify", "tag_write"),
    *("machine_write", "machine_cycle", "machine_read"),
)

#: Cycle report fields published as String metrics: metric name -> its value in a report.
CYCLE_TEXT: dict[str, Callable[[CycleReport], str | None]] = {
    "Cycle/ID": lambda r: r.id,
    "Cycle/Status": lambda r: r.status.value,
    "Cycle/Reason": lambda r: r.reason.value if r.reason is not None else None,
    "Cycle/Error": lambda r: r.error,
    "Cycle/Tag UID": lambda r: r.tag_uid,
    "Cycle/Part ID": lambda r: r.part.get("id"),
    "Cycle/Product": lambda r: r.part.get("product"),
    "Cycle/Variant": lambda r: r.part.get("variant"),
    "Cycle/Order": lambda r: r.part.get("order"),
    "Cycle/Material Lot": lambda r: r.part.get("material_lot"),
    "Cycle/Operation": lambda r: r.step["operation"] if r.step is not None else None,
    "Cycle/Machine State": lambda r: r.machine_state,
    "Cycle/Tag Write": lambda r: r.tag_write,
    "Cycle/Profile/Name": lambda r: r.profile.get("name"),
    "Cycle/Profile/Version": lambda r: r.profile.get("version"),
    "Cycle/Profile/Hash": lambda r: r.profile.get("hash"),
}
CYCLE_INT: dict[str, Callable[[CycleReport], int | None]] = {
    "Cycle/Step/Index": lambda r: r.step["index"] if r.step is not None else None,
    "Cycle/Step/Count": lambda r: r.step["count"] if r.step is not None else None,
}

_INT32 = {DataType.Int8, DataType.Int16, DataType.Int32}
_INT32 |= {DataType.UInt8, DataType.UInt16, DataType.UInt32}
_INT64 = {DataType.Int64, DataType.UInt64, DataType.DateTime}
_SIGNED = {DataType.Int8: 8, DataType.Int16: 16, DataType.Int32: 32, DataType.Int64: 64}


@dataclass(frozen=True)
class Metric:
    name: str
    alias: int
    datatype: int
    properties: dict[str, tuple[int, Any]] = field(default_factory=dict)
    #: ``Machine/<point>``: the profile point it shows (and writes, when ``writable``).
    point: str | None = None
    writable: bool = False


class Catalogue:
    """Every metric of one birth, by name and by alias."""

    def __init__(self, metrics: list[tuple[str, int, dict[str, tuple[int, Any]]]]) -> None:
        self.by_name: dict[str, Metric] = {}
        self.by_alias: dict[int, Metric] = {}
        for alias, (name, datatype, props) in enumerate(metrics, start=1):
            self._add(Metric(name, alias, datatype, props))

    def _add(self, metric: Metric) -> None:
        self.by_name[metric.name] = metric
        self.by_alias[metric.alias] = metric

    def mark(self, name: str, *, point: str | None = None, writable: bool = False) -> None:
        m = self.by_name[name]
        self._add(Metric(m.name, m.alias, m.datatype, m.properties, point, writable))

    def find(self, metric: Any) -> Metric | None:
        """The catalogue entry a received metric names (by alias, else by name)."""
        if metric.HasField("alias") and metric.alias in self.by_alias:
            return self.by_alias[metric.alias]
        return self.by_name.get(metric.name) if metric.name else None


NODE_CONTROLS = ("Node Control/Rebirth", "Node Control/Reload", "Node Control/Next Server")


def node_catalogue() -> Catalogue:
    metrics: list[tuple[str, int, dict[str, tuple[int, Any]]]] = [
        ("bdSeq", DataType.UInt64, {}),
        *((name, DataType.Boolean, {}) for name in NODE_CONTROLS),
        ("Node Info/Version", DataType.String, {}),
        ("Node Info/Gateway ID", DataType.String, {}),
    ]
    return Catalogue(metrics)


STATION_STATE = {
    "Station/Accepting Parts": DataType.Boolean,
    "Station/Paused": DataType.Boolean,
    "Station/Cycle Running": DataType.Boolean,
    "Station/Backlog": DataType.UInt64,
}


def point_datatype(type_: PointType, scale: float, offset: float) -> int:
    """A point's engineering value as a Sparkplug type: scaled integers are Doubles."""
    if type_ in (PointType.U16, PointType.I16, PointType.U32, PointType.I32) and (
        scale != 1 or offset != 0
    ):
        return int(DataType.Double)
    return int(
        {
            PointType.U16: DataType.UInt16,
            PointType.I16: DataType.Int16,
            PointType.U32: DataType.UInt32,
            PointType.I32: DataType.Int32,
            PointType.F32: DataType.Float,
            PointType.F64: DataType.Double,
            PointType.BOOL: DataType.Boolean,
            PointType.STRING: DataType.String,
        }[type_]
    )


def device_catalogue(profile: Profile, handshake: frozenset[str]) -> Catalogue:
    """The DBIRTH metrics of the station's machine under ``profile``.

    ``handshake``: points the station cycle drives; they are shown read-only.
    """
    metrics: list[tuple[str, int, dict[str, tuple[int, Any]]]] = []
    points: dict[str, tuple[str, bool]] = {}
    for name, p in profile.points.items():
        props: dict[str, tuple[int, Any]] = {}
        if p.unit:
            props["engUnit"] = (DataType.String, p.unit)
        if p.min is not None:
            props["engLow"] = (DataType.Double, float(p.min))
        if p.max is not None:
            props["engHigh"] = (DataType.Double, float(p.max))
        writable = p.writable and name not in handshake
        props["readOnly"] = (DataType.Boolean, not writable)
        if p.description:
            props["Documentation"] = (DataType.String, p.description)
        metric = f"Machine/{name}"
        metrics.append((metric, point_datatype(p.type, p.scale, p.offset), props))
        points[metric] = (name, writable)
    for group in profile.telemetry:
        metrics.append((f"Telemetry/{group}/Stale", DataType.Boolean, {}))
    metrics += [(name, int(t), {}) for name, t in STATION_STATE.items()]
    metrics += [
        ("Profile/Name", DataType.String, {}),
        ("Profile/Version", DataType.String, {}),
        ("Profile/Hash", DataType.String, {}),
        ("Command/Last Result", DataType.String, {}),
    ]
    metrics += [(name, DataType.String, {}) for name in CYCLE_TEXT]
    metrics += [(name, DataType.Int32, {}) for name in CYCLE_INT]
    metrics += [(f"Cycle/Duration/{k} ms", DataType.Double, {}) for k in DURATIONS]
    written = sorted(
        {s.point for op in profile.operations.values() for s in op.parameters.values()}
    )
    for point in written:
        metrics.append(
            (f"Cycle/Parameters/{point}", _point_type(profile, point), _unit(profile, point))
        )
    results = {r for op in profile.operations.values() for r in op.results}
    for name in sorted(results):
        metrics.append((f"Cycle/Results/{name}", _point_type(profile, name), _unit(profile, name)))
    # Method outputs (OPC UA calls) have no profile type: their JSON text.
    calls = {
        r
        for s in (*profile.handshake, *profile.on_abort)
        if isinstance(s, CallMethod)
        for r in s.results
    }
    metrics += [(f"Cycle/Results/{r}", DataType.String, {}) for r in sorted(calls - results)]
    catalogue = Catalogue(metrics)
    for metric, (point, writable) in points.items():
        catalogue.mark(metric, point=point, writable=writable)
    catalogue.mark("Station/Paused", writable=True)
    return catalogue


def _point_type(profile: Profile, point: str) -> int:
    p = profile.points.get(point)
    return point_datatype(p.type, p.scale, p.offset) if p is not None else int(DataType.String)


def _unit(profile: Profile, point: str) -> dict[str, tuple[int, Any]]:
    p = profile.points.get(point)
    return {"engUnit": (DataType.String, p.unit)} if p is not None and p.unit else {}


def cycle_values(report: CycleReport) -> dict[str, Any]:
    """A cycle report as ``Cycle/`` metric values (None: the report has no such field)."""
    values: dict[str, Any] = {name: text(report) for name, text in CYCLE_TEXT.items()}
    values.update((name, number(report)) for name, number in CYCLE_INT.items())
    for key in DURATIONS:
        values[f"Cycle/Duration/{key} ms"] = report.durations_ms.get(key)
    for parameter in report.parameters:
        values[f"Cycle/Parameters/{parameter.get('point')}"] = parameter.get("value")
    for name, value in report.results.items():
        values[f"Cycle/Results/{name}"] = value
    return values


# ---------------------------------------------------------------------- payload encoding


def now_ms() -> int:
    return int(time.time() * 1000)


def iso_ms(iso_time: Any) -> int:
    """An ISO 8601 time of the agent's messages as Sparkplug's milliseconds (now if unreadable)."""
    try:
        return int(datetime.fromisoformat(str(iso_time)).timestamp() * 1000)
    except ValueError:
        return now_ms()


def set_value(metric: Any, datatype: int, value: Any) -> None:
    """Fill a protobuf metric (or property value) with ``value`` as ``datatype``; a value that
    is not of its declared type is sent null, never held back (a stored cycle would block all
    later ones)."""
    try:
        _set_value(metric, datatype, value)
    except (TypeError, ValueError, OverflowError):
        metric.ClearField("value")
        metric.is_null = True


def _set_value(metric: Any, datatype: int, value: Any) -> None:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        metric.is_null = True
        return
    if datatype in _INT32:
        metric.int_value = int(value) & 0xFFFF_FFFF  # Tahu: signed types as two's complement
    elif datatype in _INT64:
        metric.long_value = int(value) & 0xFFFF_FFFF_FFFF_FFFF
    elif datatype == DataType.Float:
        metric.float_value = float(value)
    elif datatype == DataType.Double:
        metric.double_value = float(value)
    elif datatype == DataType.Boolean:
        metric.boolean_value = bool(value)
    else:
        metric.string_value = value if isinstance(value, str) else json.dumps(value)


def get_value(metric: Any, datatype: int) -> Any:
    """The Python value of a received metric declared as ``datatype`` (None when null)."""
    if metric.is_null:
        return None
    kind = metric.WhichOneof("value")
    if kind is None:
        return None
    value = getattr(metric, kind)
    bits = _SIGNED.get(datatype)
    if bits and kind in ("int_value", "long_value") and value >= 1 << (bits - 1):
        value -= 1 << (32 if kind == "int_value" and bits < 64 else 64)
    return value


def add_metric(
    payload: Any,
    m: Metric,
    value: Any,
    *,
    birth: bool = False,
    timestamp: int | None = None,
    historical: bool = False,
) -> None:
    """Append ``m`` to ``payload``: name, alias and properties in a birth, the alias after it."""
    out = payload.metrics.add()
    if birth:
        out.name = m.name
        for key, (ptype, pvalue) in m.properties.items():
            out.properties.keys.append(key)
            prop = out.properties.values.add()
            prop.type = ptype
            set_value(prop, ptype, pvalue)
    out.alias = m.alias
    out.datatype = m.datatype
    if timestamp is not None:
        out.timestamp = timestamp
    if historical:
        out.is_historical = True
    set_value(out, m.datatype, value)


def load_bd_seq(path: Path | None) -> int:
    """The bdSeq of the last session from ``path``; -1 (the next is 0) without one."""
    if path is None:
        return -1
    try:
        value = int(path.read_text(encoding="ascii").strip())
    except FileNotFoundError:
        return -1
    except (OSError, ValueError) as err:
        log.warning(
            "Sparkplug bdSeq file unreadable: counting again from 0", file=str(path), error=str(err)
        )
        return -1
    return value % 256 if value >= 0 else -1


def save_bd_seq(path: Path | None, value: int) -> None:
    """Write ``value`` to ``path`` atomically (a new file renamed over the old one)."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{value}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        # The session goes ahead: at worst a host sees a repeated bdSeq after the next restart.
        log.error("Sparkplug bdSeq not saved", file=str(path), error=str(err))
