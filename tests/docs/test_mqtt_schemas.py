"""docs/mqtt.md publishes a JSON schema per message; what the agent sends must match it.

A small validator for the keywords the docs use (type, required, properties,
additionalProperties, enum, const, items, pattern) keeps the test free of extra dependencies.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from edge_agent.instructions.model import Step
from edge_agent.sim.broker import EmbeddedBroker
from tests import REPO_ROOT
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import DRILL, PRESS, running_station

DOC = REPO_ROOT / "docs" / "mqtt.md"
TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "null": type(None),
}


def schemas() -> dict[str, dict[str, Any]]:
    text = DOC.read_text(encoding="utf-8")
    found = re.findall(r"<!-- schema: (\w+) -->\s*```json\n(.*?)\n```", text, re.S)
    return {name: json.loads(body) for name, body in found}


def problems(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    out: list[str] = []
    if "const" in schema and value != schema["const"]:
        out.append(f"{path}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {value!r} not in {schema['enum']}")
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(
            isinstance(value, TYPES[n])
            and not (n in ("integer", "number") and isinstance(value, bool))
            for n in names
        )
        if not ok:
            out.append(f"{path}: {value!r} is not of type {names}")
            return out
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        out.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                out.append(f"{path}: required key '{key}' is missing")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                out += problems(item, props[key], f"{path}.{key}")
            elif extra is False:
                out.append(f"{path}: key '{key}' is not in the documented schema")
            elif isinstance(extra, dict):
                out += problems(item, extra, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += problems(item, schema["items"], f"{path}[{i}]")
    return out


def test_the_validator_can_fail() -> None:
    schema = schemas()["cycle"]
    assert problems({"schema": "edge-agent/cycle/1"}, schema)  # most keys missing
    assert problems([], schema)


async def test_status_and_cycle_reports_match_the_documented_schemas(
    tmp_path: Path, reference_plc: Any, broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    docs = schemas()
    async with running_station(tmp_path, reference_plc.port, broker.port) as station:
        routing = [
            Step("drill", DRILL, "st-10"),
            Step("drill", DRILL, "st-20"),
            Step("press", PRESS, "st-30"),
        ]
        ok = await station.cycle(station.tag(routing, done=1))
        rejected = await station.cycle(
            station.tag(routing, uid=b"\x04\x01\x02\x03\x04\x05\x07", done=0)
        )
        assert (ok.status, rejected.status) == ("ok", "rejected")
        cycles = await recorder.wait_for("gw-test/cycles", 2)
    statuses = await recorder.wait_for("gw-test/status", 2)
    for report in cycles:
        assert problems(report, docs["cycle"]) == []
    for status in statuses:
        assert problems(status, docs["status"]) == []


def test_the_reason_table_lists_exactly_the_codes_the_agent_can_report() -> None:
    """A report's ``reason`` is typed (``errors.Reason``), so the code can emit no other code;
    the table in docs/mqtt.md must list exactly these, each with its status."""
    from edge_agent.errors import Reason

    text = DOC.read_text(encoding="utf-8")
    table = text[text.index("| reason | status | meaning |") :].split("\n\n", 1)[0]
    documented = dict(re.findall(r"^\| `([a-z_]+)` \| (rejected|failed) \|", table, re.M))
    assert set(documented) == {r.value for r in Reason}
