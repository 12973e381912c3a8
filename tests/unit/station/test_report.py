"""The cycle report's JSON: the uplink's encoding of the documented fields, whatever was cached."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from edge_agent.errors import Reason
from edge_agent.station.report import CycleReport, IfStopped, Status
from edge_agent.uplink.payload import dumps
from tests.docs.test_mqtt_schemas import problems, schemas


def report() -> CycleReport:
    r = CycleReport("gw-ü", "st-20", "04A1B2C3D4E5F6")
    r.profile = {"name": "reference-plc", "version": "1.0", "hash": "sha256:" + "ab" * 32}
    r.key_id = "mes"
    r.part = {
        "id": "P-1",
        "product": "bracket",
        "variant": "B",
        "order": "O-1",
        "material_lot": None,
    }
    r.step = {"index": 1, "count": 3, "operation": "drill"}
    r.parameters = [
        {"name": "feed_rate", "value": 320.5, "requested": 320.49, "unit": "mm/min"}
        | {"point": "feed_rate", "raw": [3205]},
        {"name": "tool", "value": 3, "unit": None, "point": "tool", "raw": [3]},
    ]
    r.durations_ms = {"tag_read": 0.123, "verify": 1.5}
    return r


def expected(r: CycleReport, **changed: Any) -> dict[str, Any]:
    """The report as the uplink would encode it field by field, in the wire's order."""
    fields = {
        "id": r.id,
        "schema": "edge-agent/cycle/1",
        "gateway_id": r.gateway_id,
        "station": r.station,
        "tag_uid": r.tag_uid,
        "status": r.status.value,
        "reason": r.reason.value if r.reason else None,
        "error": r.error,
        "part": r.part,
        "step": r.step,
        "parameters": r.parameters,
        "results": r.results,
        "durations_ms": r.durations_ms,
        "key_id": r.key_id,
        "tag_write": r.tag_write,
        "machine_state": r.machine_state,
        "profile": r.profile,
        "adjustments": r.adjustments,
        "time": r.time.isoformat(timespec="milliseconds"),
    }
    return fields | changed


def test_the_json_is_the_uplinks_encoding_of_every_field_with_seq_last() -> None:
    r = report()
    assert r.to_json() == dumps(expected(r))
    assert r.to_json(seq=42) == dumps(expected(r, seq=42))
    assert r.as_message() == json.loads(dumps(expected(r)))
    assert problems(r.as_message(), schemas()["cycle"]) == []


def test_a_held_version_says_what_it_is_told_and_the_report_stays_as_it_is() -> None:
    r = report()
    r.status, r.machine_state = Status.OK, "cycle complete"
    stopped = IfStopped(Status.FAILED, Reason.INTERRUPTED, "stopped", "unknown: stopped")
    held = r.to_json(stopped=stopped)
    assert held == dumps(
        expected(
            r,
            status="failed",
            reason="interrupted",
            error="stopped",
            machine_state="unknown: stopped",
        )
    )
    assert r.to_json(stopped=IfStopped(tag_write="unknown: x")) == dumps(
        expected(r, tag_write="unknown: x")
    )
    assert r.to_json() == dumps(expected(r))


def test_fields_replaced_after_a_hold_are_what_the_next_encoding_says() -> None:
    # The fixed fields are encoded once and reused: replacing any of them must still show.
    r = report()
    r.to_json(stopped=IfStopped(tag_write="unknown"))
    r.parameters = [{"name": "tool", "value": 4, "unit": None, "point": "tool", "raw": [4]}]
    r.adjustments = {"version": "a-1", "changes": []}
    r.key_id, r.error, r.results = "other", "went wrong", {"count": 7}
    r.durations_ms["total"] = 9.25  # in place: the outcome fields are encoded every time
    r.time = datetime.fromisoformat("2026-12-01T10:00:00.123+00:00")
    assert r.to_json(seq=1) == dumps(expected(r, seq=1))
    assert r.epoch_ms == 1796119200123


def test_time_is_whole_milliseconds_so_its_epoch_is_the_time_on_the_wire() -> None:
    r = report()
    assert r.time.microsecond % 1000 == 0
    sent = datetime.fromisoformat(r.as_message()["time"])
    assert sent == r.time and r.epoch_ms == int(sent.timestamp() * 1000)
