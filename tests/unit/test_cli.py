"""The command line as an operator uses it: real processes, real exit codes, real output."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from edge_agent.sim.broker import EmbeddedBroker
from tests import REPO_ROOT
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import DRILL, PRESS, write_config

REPO = REPO_ROOT


def edge_agent(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        **kw,
    )


def test_help_lists_commands() -> None:
    out = edge_agent("--help")
    assert out.returncode == 0
    for command in ("run", "check-config", "demo", "tag"):
        assert command in out.stdout


def test_check_config_ok_and_invalid(tmp_path: Path) -> None:
    ok = edge_agent("check-config", "-c", "config/station.example.yaml")
    assert ok.returncode == 0, ok.stderr
    assert "valid" in ok.stdout and "reference-plc" in ok.stdout

    bad = tmp_path / "bad.yaml"
    example = (REPO / "config/station.example.yaml").read_text()
    example = example.replace("../firmware_profiles", str(REPO / "firmware_profiles")).replace(
        "keys/", str(REPO / "config/keys") + "/"
    )
    bad.write_text(example.replace("unit_id: 1", "unit_id: 300"))
    out = edge_agent("check-config", "-c", str(bad))
    assert out.returncode == 2
    line = 1 + example.splitlines().index("  unit_id: 1")
    assert f"{bad}:{line}: machine.unit_id: Input should be less than or equal to 255" in out.stderr


def test_demo_runs_all_parts_through_the_broker() -> None:
    out = edge_agent("demo", "--parts", "6")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "6 cycles ok, 0 rejected, 0 failed"
    cycle_lines = [line for line in lines if "-> ok" in line]
    assert len(cycle_lines) == 6
    assert {
        op for op in ("drill", "mill", "press") if any(f" {op} " in line for line in cycle_lines)
    } == {"drill", "mill", "press"}


async def test_run_daemon_end_to_end_and_sigterm(
    tmp_path: Path, reference_plc: object, broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    """`edge-agent run` with a directory reader: drop a tag file, get a report, SIGTERM, offline."""
    from edge_agent.instructions.codec import TAG_CAPACITY, decode_tag, encode_tag, update_progress
    from edge_agent.instructions.model import Step, StepRecord, StepStatus
    from edge_agent.instructions.recipe import Recipe
    from edge_agent.instructions.signing import KeyRing, load_private_key
    from tests.station_harness import Station  # noqa: F401  (documents where the tag helper lives)

    tags = tmp_path / "tags"
    config = write_config(tmp_path, reference_plc.port, broker.port)  # type: ignore[attr-defined]
    text = config.read_text().replace(
        "reader: {type: simulated}",
        f"reader: {{type: simulated, directory: {tags}, poll_interval: 0.05}}",
    )
    config.write_text(text)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edge_agent",
        "run",
        "-c",
        str(config),
        "--log-format",
        "json",
        cwd=REPO,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        await recorder.wait_for("gw-test/status", 1, timeout=15)
        key = load_private_key(tmp_path / "mes.key")
        uid = bytes.fromhex("04A1B2C3D4E5F6")
        steps = [
            Step("drill", DRILL, "st-10"),
            Step("drill", DRILL, "st-20"),
            Step("press", PRESS, "st-30"),
        ]
        message = encode_tag(
            Recipe.from_steps(part_id="P-9", product="p", variant="v", order="o", steps=steps),
            uid,
            key,
            "mes",
            TAG_CAPACITY["ntag215"],
        )
        contents = decode_tag(message, uid, KeyRing({"mes": key.public_key()}))
        message = update_progress(
            contents, contents.progress.with_record(0, StepRecord(StepStatus.OK, "st-10", 0), 3)
        )
        (tags / "04A1B2C3D4E5F6.ndef").write_bytes(message)

        [report] = await recorder.wait_for("gw-test/cycles", 1, timeout=15)
        assert report["status"] == "ok", report["error"]
        # write-back went into the tag file
        written = decode_tag(
            (tags / "04A1B2C3D4E5F6.ndef").read_bytes(), uid, KeyRing({"mes": key.public_key()})
        )
        assert written.progress.done(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()
    statuses = await recorder.wait_for("gw-test/status", 2)
    assert statuses[-1]["state"] == "offline" and statuses[-1]["reason"] == "shutdown"
    assert b'"event": "agent stopped"' in stderr or b'"event":"agent stopped"' in stderr


async def test_demo_against_external_machine_and_broker(
    broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    """`--machine` and `--broker`: the same demo against a PLC in another process and our broker."""
    from edge_agent.sim.broker import free_port, wait_listening

    port = free_port()
    plc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edge_agent.sim.reference_plc",
        "--port",
        str(port),
        stdout=asyncio.subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        await wait_listening("127.0.0.1", port)
        demo = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "edge_agent",
            "demo",
            "--parts",
            "3",
            "--machine",
            f"127.0.0.1:{port}",
            "--broker",
            f"127.0.0.1:{broker.port}",
            "--profile",
            str(REPO / "firmware_profiles" / "reference-plc.yaml"),
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        out, _ = await asyncio.wait_for(demo.communicate(), 60)
    finally:
        plc.terminate()
        await plc.wait()
    assert demo.returncode == 0, out.decode()
    text = out.decode()
    assert (
        f"machine 127.0.0.1:{port} (external)" in text
        and f"broker 127.0.0.1:{broker.port} (external)" in text
    )
    assert text.strip().endswith("3 cycles ok, 0 rejected, 0 failed")
    # An independent subscriber on the external broker saw the same three reports.
    reports = await recorder.wait_for("demo-gw/cycles", 3)
    assert [r["status"] for r in reports] == ["ok", "ok", "ok"]


def test_every_demo_option_readme_advertises_is_installed_by_the_demo_extra() -> None:
    """README's first command installs '.[demo]'; the options it then advertises need these."""
    import tomllib

    readme = (REPO / "README.md").read_text()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    demo = {req.split("==")[0].lower() for req in extras["demo"]}
    needs = {"--nfc": "nfcpy", "--opcua": "asyncua"}  # the library each option imports
    for option, package in needs.items():
        assert f"`{option}`" in readme
        assert package in demo, f"demo {option} needs {package}, not in the demo extra"


def test_demo_without_its_library_says_what_to_install(tmp_path: Path) -> None:
    # An install without the demo extra: asyncua cannot be imported.
    blocker = tmp_path / "asyncua"
    blocker.mkdir()
    (blocker / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'asyncua'\", name='asyncua')\n"
    )
    out = edge_agent(
        "demo", "--opcua", "--parts", "1", env={**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}"}
    )
    assert out.returncode == 1
    assert "needs the Python package 'asyncua'" in out.stderr
    assert "pip install 'edge-agent[demo]'" in out.stderr
    assert "Traceback" not in out.stderr
