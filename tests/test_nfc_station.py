"""A whole station reading parts through nfcpy: the agent builds its nfc reader from the config."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.demo import DemoOptions, run_demo
from edge_agent.instructions.format import decode_tag
from edge_agent.instructions.signing import KeyRing, load_private_key
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.ntag import NtagImage, NtagSimulator
from edge_agent.sim.reference_plc import ReferencePlc as Plc
from edge_agent.tag.nfc import NfcReader
from tests.station_harness import DRILL, Station, write_config


async def test_demo_nfc_writes_progress_back_and_reads_it_back() -> None:
    out = io.StringIO()
    assert await run_demo(DemoOptions(parts=3, nfc=True), out=out) == 0
    lines = out.getvalue().splitlines()
    parts = [line for line in lines if "-> ok" in line]
    assert len(parts) == 3
    for line in parts:
        assert line.endswith("tag ok, read back: progress seq 2, 2/3 steps done"), line
    assert lines[-1] == "3 cycles ok, 0 rejected, 0 failed"


async def test_read_only_tag_cycle_reports_the_failed_write(
    tmp_path: Path, reference_plc: Plc, broker: EmbeddedBroker
) -> None:
    from edge_agent.instructions.model import Step

    with NtagSimulator() as sim:
        path = write_config(tmp_path, reference_plc.port, broker.port)
        path.write_text(
            path.read_text().replace(
                "reader: {type: simulated}",
                f"reader: {{type: nfc, device: '{sim.device}', targets: [106A], poll_interval: 0.02}}",
            )
        )
        agent = Agent(load_config(path))
        assert isinstance(agent.reader, NfcReader)
        key = load_private_key(tmp_path / "mes.key")
        station = Station(agent, None, key, KeyRing({"mes": key.public_key()}), tmp_path)  # type: ignore[arg-type]
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await agent.uplink.wait_connected(5)
            uid = bytes.fromhex("04112233445566")
            message = station.tag([Step("drill", DRILL, "st-20")], uid=uid).message
            tag = NtagImage.blank("NTAG215", uid)
            tag.put_ndef(message)
            tag.make_read_only()
            sim.present(tag)
            report = await asyncio.wait_for(agent.reports.get(), 10)
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
    assert (
        report.status == "ok"
    )  # the machine did the step; the report says the tag was not updated
    assert report.tag_write.startswith("failed: tag 04112233445566 (NTAG215) is read-only")
    assert tag.ndef_message() == message
    assert decode_tag(message, uid, station.keyring).progress.seq == 0
