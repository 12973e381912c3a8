"""Write-ahead: the real daemon SIGKILLed at each phase of a cycle still reports every machine cycle.

The reference PLC runs in the test and kills the daemon from its request hook the moment the
parameters are written, the trigger goes high, or the trigger is reset after done; the tag
write-back is caught by watching the tag file. After each kill the daemon is started again on the
same state directory (the tag still on the reader). Every machine cycle the PLC counted must have
a report. (Whether a re-run after a kill with the trigger left high is reported truly is the
handshake's idle check, tested with the handshake.)
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

from edge_agent.instructions.signing import KeyRing, load_private_key
from edge_agent.sim.broker import EmbeddedBroker
from edge_agent.sim.reference_plc import TRIGGER, ReferencePlc
from tests.docs.test_mqtt_schemas import problems, schemas
from tests.fixtures_broker import MqttRecorder
from tests.station_harness import write_config
from tests.system.test_daemon_kill import events, start_daemon, tag_message, until

PHASES = ("parameters", "trigger", "done", "tag")


async def started(log: Path, times: int) -> None:
    await until(lambda: len(events(log, "agent started")) >= times, 20, "the daemon to start")


def settled(recorder: MqttRecorder, uid: str) -> bool:
    return any(
        r["tag_uid"] == uid
        and ((r["status"] == "ok" and r["tag_write"] == "ok") or r["reason"] == "complete")
        for r in recorder.json("gw-test/cycles")
    )


def killer(phase: str, pid: int) -> Any:
    """A PLC request hook that SIGKILLs ``pid`` at ``phase`` (once)."""
    armed = [True]

    def hook(fc: int, address: int, count: int, values: list[Any] | None) -> None:
        if not armed[0] or values is None:
            return
        hit = (
            (phase == "parameters" and fc == 16)
            or (phase == "trigger" and fc in (5, 15) and address == TRIGGER and values[0])
            or (phase == "done" and fc in (5, 15) and address == TRIGGER and not values[0])
        )
        if hit:
            armed[0] = False
            os.kill(pid, signal.SIGKILL)

    return hook


async def test_sigkill_at_every_phase_of_a_cycle_loses_no_report(
    tmp_path: Path, reference_plc: ReferencePlc, broker: EmbeddedBroker, recorder: MqttRecorder
) -> None:
    tags, state, log = tmp_path / "tags", tmp_path / "state", tmp_path / "daemon.log"
    config = write_config(tmp_path, reference_plc.port, broker.port)
    reader = f"{{type: simulated, directory: {json.dumps(str(tags))}, poll_interval: 0.02}}"
    text = config.read_text().replace("reader: {type: simulated}", f"reader: {reader}")
    config.write_text(
        text + f"state_dir: {json.dumps(str(state))}\ntelemetry: {{enabled: false}}\n"
    )
    key = load_private_key(tmp_path / "mes.key")
    keyring = KeyRing({"mes": key.public_key()})
    tags.mkdir()
    uids = {phase: f"04DEAD{n:08X}" for n, phase in enumerate(PHASES)}
    daemon = start_daemon(config, log)
    try:
        for n, phase in enumerate(PHASES):
            await started(log, n + 1)
            reference_plc.on_request = killer(phase, daemon.pid)
            path = tags / f"{uids[phase]}.ndef"
            message = tag_message(key, keyring, bytes.fromhex(uids[phase]), n)
            part = path.with_suffix(".part")
            part.write_bytes(message)
            part.rename(path)
            if phase == "tag":
                while path.read_bytes() == message and daemon.poll() is None:  # noqa: ASYNC110
                    await asyncio.sleep(0.0005)
                daemon.send_signal(signal.SIGKILL)  # right after the tag write-back
            await asyncio.to_thread(daemon.wait, 20)
            assert daemon.returncode == -signal.SIGKILL
            reference_plc.on_request = None
            daemon = start_daemon(config, log)
            # The tag is still on the reader: the restarted daemon takes it again (or finds it
            # done) before the next phase is armed.
            uid = uids[phase]
            await until(lambda: settled(recorder, uid), 20, f"the re-run after {phase}")  # noqa: B023
        await started(log, len(PHASES) + 1)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            await asyncio.to_thread(daemon.wait, 20)
    assert daemon.returncode == 0, log.read_text()[-3000:]

    reports = {r["id"]: r for r in recorder.json("gw-test/cycles")}.values()
    # Each restart finds the earlier tags still on the reader, done: "complete", machine untouched.
    by_uid = {
        phase: [
            (r["status"], r["reason"])
            for r in reports
            if r["tag_uid"] == uid and r["reason"] != "complete"
        ]
        for phase, uid in uids.items()
    }
    # Killed before the tag was written: the held report ("interrupted"), then the re-run.
    for phase in ("parameters", "trigger", "done"):
        assert by_uid[phase] == [("failed", "interrupted"), ("ok", None)], (phase, by_uid)
    # Killed after the write-back: the report held before it, and the tag now says done.
    assert by_uid["tag"] == [("ok", None)], by_uid
    tag_ok = next(r for r in reports if r["tag_uid"] == uids["tag"] and r["status"] == "ok")
    assert tag_ok["tag_write"] in ("ok", "unknown: the agent stopped during the tag write-back")

    # The PLC counted a cycle for every rising edge of the trigger; each has a report that does
    # not deny it (an interrupted parameter write counts as "may have run").
    ran = [r for r in reports if r["machine_state"] != "untouched"]
    for report in reports:  # the held versions as sent are documented reports too
        assert problems(report, schemas()["cycle"]) == []
    assert len(ran) >= reference_plc.cycles >= 4
    assert len(ran) == 7
