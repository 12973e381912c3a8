"""The real daemon (`edge-agent run`) as a Sparkplug edge node, SIGKILLed.

The broker publishes the NDEATH will with the bdSeq of the NBIRTH; cycles run while the broker is
away survive a SIGKILL in the disk store and arrive after the next birth, flagged historical, with
their own timestamps. Payloads are decoded with Tahu's compiled schema only.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from esio_spb_builder.core.sparkplug_b_pb2 import Payload

from edge_agent.instructions.signing import KeyRing, load_private_key
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import ReferencePlc
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import write_config
from tests.system.test_daemon_kill import events, start_daemon, tag_message, until
from tests.unit.test_cli import edge_agent

SP = "sparkplug: {enabled: true, group_id: plant}\n"


def decoded(recorder: MqttRecorder, kind: str) -> list[Any]:
    return [Payload.FromString(p) for t, p, _ in list(recorder.messages) if t.split("/")[2] == kind]


def metrics(payload: Any) -> dict[str, Any]:
    return {m.name: m for m in payload.metrics}


def daemon_config(tmp_path: Path, plc: ReferencePlc, broker: EmbeddedBroker) -> Path:
    tags, state = tmp_path / "tags", tmp_path / "state"
    tags.mkdir(exist_ok=True)
    config = write_config(tmp_path, plc.port, broker.port, extra=SP)
    text = config.read_text().replace(
        "reader: {type: simulated}",
        f"reader: {{type: simulated, directory: {json.dumps(str(tags))}, poll_interval: 0.05}}",
    )
    config.write_text(text + f"state_dir: {json.dumps(str(state))}\n")
    return config


async def test_sigkill_publishes_the_ndeath_with_the_births_bdseq(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker
) -> None:
    recorder = MqttRecorder(broker.host, broker.port, "spBv1.0/#")
    await recorder.ready()
    daemon = start_daemon(daemon_config(tmp_path, reference_plc, broker), tmp_path / "d.log")
    try:
        await until(lambda: decoded(recorder, "DBIRTH"), 20, "the births")
        (nbirth,) = decoded(recorder, "NBIRTH")
        os.kill(daemon.pid, signal.SIGKILL)
        await until(lambda: decoded(recorder, "NDEATH"), 20, "the will")
        (ndeath,) = decoded(recorder, "NDEATH")
        assert metrics(ndeath)["bdSeq"].long_value == metrics(nbirth)["bdSeq"].long_value
    finally:
        if daemon.poll() is None:
            daemon.kill()
        await asyncio.to_thread(daemon.wait)
        recorder.close()


async def test_bdseq_grows_across_a_restart_and_the_will_carries_the_current_one(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker
) -> None:
    # A host pairs NDEATH with NBIRTH by bdSeq: had it restarted at 0 with the process, the old
    # session's will could be taken for the death of the new one.
    config = daemon_config(tmp_path, reference_plc, broker)
    recorder = MqttRecorder(broker.host, broker.port, "spBv1.0/#")
    await recorder.ready()
    daemon = start_daemon(config, tmp_path / "d.log")
    try:
        await until(lambda: decoded(recorder, "DBIRTH"), 20, "the first births")
        daemon.send_signal(signal.SIGTERM)  # a clean stop: its own NDEATH, then a new process
        await asyncio.to_thread(daemon.wait)
        daemon = start_daemon(config, tmp_path / "d.log")
        await until(lambda: len(decoded(recorder, "DBIRTH")) == 2, 20, "the births again")
        first, second = (metrics(p)["bdSeq"].long_value for p in decoded(recorder, "NBIRTH"))
        assert second == (first + 1) % 256
        os.kill(daemon.pid, signal.SIGKILL)
        await until(lambda: len(decoded(recorder, "NDEATH")) == 2, 20, "the will")
        deaths = [metrics(p)["bdSeq"].long_value for p in decoded(recorder, "NDEATH")]
        assert deaths == [first, second]
    finally:
        if daemon.poll() is None:
            daemon.kill()
        await asyncio.to_thread(daemon.wait)
        recorder.close()


async def test_cycles_while_the_broker_is_away_survive_a_sigkill(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker
) -> None:
    config = daemon_config(tmp_path, reference_plc, broker)
    log = tmp_path / "d.log"
    await broker.stop()
    daemon = start_daemon(config, log)
    try:
        key = load_private_key(tmp_path / "mes.key")
        keyring = KeyRing({"mes": key.public_key()})
        uids = [f"04C0FFEE{n:06X}" for n in range(3)]
        for n, uid in enumerate(uids):
            part = tmp_path / "tags" / f"{uid}.part"
            part.write_bytes(tag_message(key, keyring, bytes.fromhex(uid), n))
            part.rename(tmp_path / "tags" / f"{uid}.ndef")
        await until(lambda: len(events(log, "cycle ok")) == 3, 30, "every cycle")
        for uid in uids:  # the parts move on: a restarted daemon must not see them again
            (tmp_path / "tags" / f"{uid}.ndef").unlink()
        os.kill(daemon.pid, signal.SIGKILL)
        await asyncio.to_thread(daemon.wait)

        restarted_ms = int(time.time() * 1000)
        await broker.start()
        recorder = MqttRecorder(broker.host, broker.port, "spBv1.0/#")
        await recorder.ready()
        daemon = start_daemon(config, log)

        def cycles() -> list[Any]:
            births = decoded(recorder, "DBIRTH")
            if not births:
                return []
            alias = metrics(births[-1])["Cycle/Part ID"].alias
            return [m for p in decoded(recorder, "DDATA") for m in p.metrics if m.alias == alias]

        await until(lambda: len(cycles()) == 3, 30, "the held cycles")
        parts = cycles()
        assert [m.string_value for m in parts] == ["P-00000", "P-00001", "P-00002"]
        assert all(m.is_historical for m in parts)
        # Each with the time of its cycle, before the restart, not the time it was sent.
        assert all(0 < m.timestamp < restarted_ms for m in parts)
        assert parts[0].timestamp <= parts[1].timestamp <= parts[2].timestamp
        assert decoded(recorder, "NBIRTH")[0].seq == 0
        recorder.close()
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        await asyncio.to_thread(daemon.wait)


def test_demo_shows_what_a_sparkplug_host_receives() -> None:
    out = edge_agent("demo", "--parts", "3", "--sparkplug")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "3 cycles ok, 0 rejected, 0 failed"
    kinds = [line.split()[1] for line in lines if line.startswith("  spB ")]
    assert kinds[:2] == ["NBIRTH", "DBIRTH"] and kinds[-1] == "NDEATH"
    cycles = [line for line in lines if "Cycle/Status=ok" in line]
    assert len(cycles) == 3 and "Cycle/Part ID=P-00003" in cycles[-1]
