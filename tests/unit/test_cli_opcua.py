"""``edge-agent demo --opcua`` and ``check-config --online`` as an operator runs them."""

from __future__ import annotations

import json
from pathlib import Path

from tests.fixtures_opcua import OPCUA_PROFILE, OpcUaMachineProcess
from tests.unit.test_cli import REPO, edge_agent


def test_demo_opcua_runs_every_part_against_the_embedded_machine() -> None:
    out = edge_agent("demo", "--opcua", "--parts", "10")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert "embedded reference OPC UA machine, Basic256Sha256 SignAndEncrypt" in lines[0]
    assert lines[-1] == "10 cycles ok, 0 rejected, 0 failed"
    assert sum("-> ok, cycle #" in line for line in lines) == 10


def test_demo_against_an_external_opcua_server(opcua_machine: OpcUaMachineProcess) -> None:
    out = edge_agent(
        "demo", "--machine", opcua_machine.url, "--profile", str(OPCUA_PROFILE), "--parts", "3"
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert f"machine {opcua_machine.url} (external)" in lines[0]
    assert lines[-1] == "3 cycles ok, 0 rejected, 0 failed"


def _config(tmp_path: Path, url: str, profile: Path = OPCUA_PROFILE) -> Path:
    path = tmp_path / "station.yaml"
    path.write_text(
        "gateway_id: gw-1\nstation: st-20\nreader: {type: simulated}\n"
        f"machine: {{profile: {json.dumps(str(profile))}, url: {url}, timeout: 1}}\n"
        f"trusted_keys: {{mes: {json.dumps(str(REPO / 'config/keys/mes-example.pub'))}}}\n"
    )
    return path


def test_check_config_online(opcua_machine: OpcUaMachineProcess, tmp_path: Path) -> None:
    offline = edge_agent("check-config", "-c", str(_config(tmp_path, opcua_machine.url)))
    assert offline.returncode == 0, offline.stderr

    ok = edge_agent("check-config", "--online", "-c", str(_config(tmp_path, opcua_machine.url)))
    assert ok.returncode == 0, ok.stderr
    assert f"opcua {opcua_machine.url}: online; all 9 points of reference-opcua" in ok.stdout

    text = OPCUA_PROFILE.read_text()
    broken = tmp_path / "reference-opcua.yaml"
    broken.write_text(
        text.replace("{node: s=Int32, type: i32", "{node: s=Int32, type: f64").replace(
            "{node: s=String,", "{node: s=Label,"
        )
    )
    bad = edge_agent(
        "check-config", "--online", "-c", str(_config(tmp_path, opcua_machine.url, broken))
    )
    assert bad.returncode == 2
    assert "the machine does not match the profile (2 problems)" in bad.stderr
    lines = broken.read_text().splitlines()
    count_line = 1 + next(i for i, line in enumerate(lines) if line.strip().startswith("count:"))
    assert (
        f"{broken}:{count_line}: points.count: profile reference-opcua 1.0, point 'count'"
        in bad.stderr
    )
    assert "DataType is Int32, the profile says f64" in bad.stderr
    assert "point 'label' (parameter label of operation process" in bad.stderr
    assert "s=Label: no such node on the server (BadNodeIdUnknown)" in bad.stderr

    nobody = OpcUaMachineProcess(tmp_path)  # nothing listens there
    down = edge_agent("check-config", "--online", "-c", str(_config(tmp_path, nobody.url)))
    assert down.returncode == 1
    assert "machine unreachable" in down.stderr and "connect" in down.stderr
