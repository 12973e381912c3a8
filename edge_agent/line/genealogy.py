"""A part's genealogy, rebuilt only from what the stations published.

Every cycle report a station sent about the part (``edge/<gateway>/cycles``), in step order, with
the machine the station's retained status named. Nothing here comes from the tag or the MES: a
genealogy that matches the signed traveler proves the stations reported what they did.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any


def _started(report: dict[str, Any]) -> str | None:
    try:
        end = datetime.fromisoformat(report["time"])
    except (KeyError, TypeError, ValueError):
        return None
    total = float((report.get("durations_ms") or {}).get("total", 0.0))
    return (end - timedelta(milliseconds=total)).isoformat(timespec="milliseconds")


def build(part_id: str, reports: list[dict[str, Any]], machines: dict[str, str]) -> dict[str, Any]:
    """The genealogy of ``part_id`` from its reports; ``machines``: gateway id -> machine."""
    mine = [r for r in reports if (r.get("part") or {}).get("id") == part_id]
    mine.sort(key=lambda r: ((r.get("step") or {}).get("index", -1), r.get("time", "")))
    part = dict(mine[-1]["part"]) if mine else {"id": part_id}
    count = next(((r.get("step") or {}).get("count") for r in mine if r.get("step")), None)
    steps = []
    for r in mine:
        step = r.get("step") or {}
        steps.append(
            {
                "index": step.get("index"),
                "operation": step.get("operation"),
                "status": r["status"],
                "reason": r.get("reason"),
                "error": r.get("error"),
                "station": r.get("station"),
                "gateway_id": r.get("gateway_id"),
                "machine": machines.get(r.get("gateway_id", ""), "?"),
                "profile": r.get("profile") or {},
                "parameters": r.get("parameters") or [],
                "results": r.get("results") or {},
                "started": _started(r),
                "finished": r.get("time"),
                "duration_ms": (r.get("durations_ms") or {}).get("total"),
                "key_id": r.get("key_id"),
                "tag_uid": r.get("tag_uid"),
                "tag_write": r.get("tag_write"),
                "report_id": r.get("id"),
            }
        )
    done = {s["index"] for s in steps if s["status"] == "ok"}
    return {
        "part": part,
        "step_count": count,
        "complete": count is not None and done == set(range(count)),
        "steps": steps,
    }


def _value(p: dict[str, Any]) -> str:
    unit = f" {p['unit']}" if p.get("unit") else ""
    return f"{p['name']}={p['value']!r}{unit}"


def format_text(g: dict[str, Any]) -> list[str]:
    """The genealogy for a person: one block per step."""
    part = g["part"]
    if not g["steps"]:
        return [f"part {part['id']}: no station has reported it"]
    lines = [
        f"part {part['id']}  product {part.get('product')}  variant {part.get('variant')}  "
        f"order {part.get('order')}  material lot {part.get('material_lot')}  "
        f"tag {g['steps'][0]['tag_uid']}",
        f"  {sum(s['status'] == 'ok' for s in g['steps'])}/{g['step_count']} steps done"
        + ("" if g["complete"] else "  (INCOMPLETE)"),
    ]
    for s in g["steps"]:
        prof = s["profile"]
        where = f"station {s['station']} (gateway {s['gateway_id']}, machine {s['machine']})"
        head = f"  step {(s['index'] or 0) + 1}/{g['step_count']} {s['operation']}: {s['status']}"
        if s["status"] != "ok":
            head += f" {s['reason']}: {s['error']}"
        lines += [
            f"{head}  {where}",
            f"    profile {prof.get('name')} {prof.get('version')} {prof.get('hash')}",
            f"    started {s['started']}  finished {s['finished']}  ({s['duration_ms']} ms)  "
            f"key {s['key_id']}  tag write {s['tag_write']}",
            "    parameters as written: "
            + (
                ", ".join(
                    f"{_value(p)} (point {p['point']}, raw {p['raw']})" for p in s["parameters"]
                )
                or "none"
            ),
            "    results: " + (", ".join(f"{k}={v!r}" for k, v in s["results"].items()) or "none"),
        ]
    return lines
