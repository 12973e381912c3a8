"""A whole line: ``edge-agent demo --line`` against mosquitto, watched by ``edge-agent line watch``.

Four agent processes, their machines, the conveyor and an independent line view in another
process. Every genealogy the views rebuilt from the stations' reports is checked against the
signed travelers the parts carried.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edge_agent.instructions.codec import decode_tag
from edge_agent.instructions.model import Traveler
from edge_agent.instructions.signing import KeyRing, load_public_key
from edge_agent.line.watch import LineView
from edge_agent.machine.profile import Profile, load_profile
from edge_agent.sim.broker import EmbeddedBroker
from tests import REPO_ROOT

PROFILES = REPO_ROOT / "firmware_profiles"
PARTS = 30


def _travelers(record: Path) -> dict[str, Traveler]:
    keyring = KeyRing({"demo": load_public_key(record / "demo.pub")})
    out = {}
    for path in sorted((record / "travelers").glob("*.ndef")):
        part_id, uid = path.stem.split("_")
        out[part_id] = decode_tag(path.read_bytes(), bytes.fromhex(uid), keyring).traveler
    return out


def _check_genealogy(t: Traveler, g: dict[str, Any], profiles: dict[str, Profile]) -> None:
    assert g["complete"], f"{t.part_id} incomplete: {g}"
    part = g["part"]
    assert (part["product"], part["variant"], part["order"], part["material_lot"]) == (
        t.product,
        t.variant,
        t.order,
        t.material_lot,
    )
    assert g["step_count"] == len(t.steps)
    # Each step ran exactly once, and nothing else was reported about the part.
    assert [s["index"] for s in g["steps"]] == list(range(len(t.steps))), t.part_id
    for step, s in zip(t.steps, g["steps"], strict=True):
        where = f"{t.part_id} step {s['index'] + 1}"
        assert s["status"] == "ok" and s["operation"] == step.operation, where
        assert s["key_id"] == t.key_id and s["tag_uid"] == t.tag_uid.hex().upper(), where
        profile = profiles[s["profile"]["name"]]
        assert s["profile"]["hash"] == profile.content_hash, where
        assert s["profile"]["version"] == profile.version, where
        # At a station able to do it: the one named, else one whose profile has the operation.
        assert step.station in (None, s["station"]), where
        assert step.operation in profile.operations, where
        # The machine got exactly the values the traveler carried; anything else is a default.
        written = {p["name"]: p["value"] for p in s["parameters"]}
        for name, value in step.parameters.items():
            assert written[name] == value and type(written[name]) is type(value), (where, name)
        spec = profile.operations[step.operation].parameters
        for name in set(written) - set(step.parameters):
            assert written[name] == spec[name].default, (where, name)
        assert s["machine"].startswith(("modbus ", "opcua ")), where
        assert s["started"] <= s["finished"], where


async def test_line_demo_every_part_every_step_matches_its_traveler(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    record = tmp_path / "record"
    address = f"{broker.host}:{broker.port}"
    watch_json = tmp_path / "watch.json"
    watch = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "edge_agent", "line", "watch", "--broker", address),
        *("--until-done", "--part", "P-00001", "--json", str(watch_json)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await asyncio.sleep(1.5)  # the watch subscribes before the first part is issued
        demo = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "edge_agent", "demo", "--line", "--parts", str(PARTS)),
            *("--broker", address, "--record", str(record)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        demo_out, _ = await asyncio.wait_for(demo.communicate(), 150)
        text = demo_out.decode()
        assert demo.returncode == 0, text
        assert "line demo: ok" in text
        watch_out, _ = await asyncio.wait_for(watch.communicate(), 30)
    finally:
        if watch.returncode is None:
            watch.kill()
            await watch.wait()
    assert watch.returncode == 0
    lines = watch_out.decode().splitlines()

    travelers = _travelers(record)
    assert len(travelers) == PARTS
    steps = sum(len(t.steps) for t in travelers.values())
    # No two variants alike; at least one step with no station; a part through three stations.
    assert len({t.variant for t in travelers.values()}) == PARTS
    assert any(s.station is None for t in travelers.values() for s in t.steps)
    routes = json.loads((record / "routes.json").read_text())
    assert max(len(set(r)) for r in routes.values()) >= 3

    # The independent view (a pipe: plain lines) saw every cycle and every part finish.
    cycles = [line for line in lines if line.startswith("cycle ")]
    assert len(cycles) == steps and all(re.search(r" ok [\d.]+ ms$", c) for c in cycles)
    assert len([line for line in lines if line.startswith("finished P-")]) == PARTS
    assert f"summary: {PARTS}/{PARTS} parts finished every step, 0 failed, {steps} cycle" in (
        watch_out.decode()
    )
    assert "part P-00001 " in watch_out.decode()

    profiles = {p.name: p for p in (load_profile(f) for f in PROFILES.glob("*.yaml"))}
    for name in ("genealogy.json", None):
        path = record / name if name else watch_json
        genealogies = json.loads(path.read_text())
        assert set(genealogies) == set(travelers)
        for part_id, t in travelers.items():
            _check_genealogy(t, genealogies[part_id], profiles)
            assert [s["station"] for s in genealogies[part_id]["steps"]] == routes[part_id]
    # Stations worked in parallel: the two reference PLCs both took unnamed steps.
    stations = {s["station"] for g in genealogies.values() for s in g["steps"]}
    assert stations == {"st-10", "st-20", "st-30", "st-40"}


def test_view_drops_a_redelivered_report_and_frees_the_station() -> None:
    view = LineView()
    view.handle(
        "edge/gw-1/status",
        json.dumps({"state": "online", "gateway_id": "gw-1", "station": "st-1"}).encode(),
    )
    view.handle(
        "line/l1/conveyor",
        json.dumps({"event": "presented", "part": "P-1", "station": "st-1"}).encode(),
    )
    assert view.stations["gw-1"].busy_with == "P-1"
    report = {
        "id": "r1",
        "status": "ok",
        "gateway_id": "gw-1",
        "station": "st-1",
        "part": {"id": "P-1", "order": "O-1"},
        "step": {"index": 0, "count": 1, "operation": "drill"},
        "durations_ms": {"total": 3.5},
    }
    for _ in range(2):
        view.handle("edge/gw-1/cycles", json.dumps(report).encode())
    st = view.stations["gw-1"]
    assert (st.jobs_done, st.busy_with, st.last_cycle_ms, view.duplicates) == (1, None, 3.5, 1)
    assert view.parts["P-1"].finished
    assert view.take_lines() == [
        "cycle st-1 P-1 step 1/1 drill ok 3.5 ms",
        "finished P-1 1/1 steps",
    ]


@pytest.mark.parametrize("args", [["--line", "--opcua"], ["--line", "--machine", "h:1"]])
def test_line_demo_refuses_single_station_options(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent", "demo", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--line runs its own machines" in done.stderr
