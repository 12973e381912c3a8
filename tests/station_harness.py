"""A whole station wired from a real config file, for the cycle tests and the benchmark."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.instructions.codec import TAG_CAPACITY, decode_tag, encode_tag, update_progress
from edge_agent.instructions.model import Step, StepRecord, StepStatus
from edge_agent.instructions.recipe import Recipe
from edge_agent.instructions.signing import KeyRing, generate_keypair, load_private_key
from edge_agent.sim.station import running_station as run_agent
from edge_agent.sim.station import station_config
from edge_agent.station.report import CycleReport
from edge_agent.tag.simulated import SimulatedReader, SimulatedTag

REPO = Path(__file__).resolve().parent.parent
PROFILE = REPO / "firmware_profiles" / "reference-plc.yaml"

DRILL = {"spindle_speed": 1500, "feed_rate": 320.5, "depth": 12.5, "tool": 3, "dwell": 200}
MILL = {"spindle_speed": 2400, "feed_rate": 410.0, "depth": 6.25, "tool": 7, "coolant_temp": 18.5}
PRESS = {"force": 25000, "dwell": 500, "coolant_temp": 21.0}


@dataclass
class Station:
    agent: Agent
    key: Ed25519PrivateKey
    keyring: KeyRing
    tmp: Path
    reports: asyncio.Queue[CycleReport]  # every report the agent produced, in order

    @property
    def reader(self) -> SimulatedReader:
        """The simulated reader the test presents tags to; a configured reader is ``agent.reader``."""
        assert isinstance(self.agent.reader, SimulatedReader), "this station's reader is configured"
        return self.agent.reader

    def tag(
        self,
        steps: list[Step],
        uid: bytes = b"\x04\x11\x22\x33\x44\x55\x66",
        done: int = 0,
        key: Ed25519PrivateKey | None = None,
        part_id: str = "P-1",
    ) -> SimulatedTag:
        """A freshly encoded tag whose first ``done`` steps are marked done by earlier stations."""
        recipe = Recipe.from_steps(
            part_id=part_id, product="bracket", variant="B-long", order="ORD-1", steps=steps
        )
        message = encode_tag(recipe, uid, key or self.key, "mes", TAG_CAPACITY["ntag215"])
        if done:
            contents = decode_tag(message, uid, self.keyring)
            progress = contents.progress
            for i in range(done):
                progress = progress.with_record(
                    i, StepRecord(StepStatus.OK, f"st-{i}", int(time.time())), len(steps)
                )
            message = update_progress(contents, progress)
        return SimulatedTag(uid, message)

    async def cycle(self, tag: SimulatedTag, timeout: float = 10) -> CycleReport:
        self.reader.present(tag)
        report = await asyncio.wait_for(self.reports.get(), timeout)
        self.reader.remove(tag.uid)
        return report


def certified(tmp: Path, text: str, key_id: str = "cert") -> dict[str, str]:
    """``push_profile`` params: the profile's text with a signature by ``tmp/<key_id>.key``."""
    from edge_agent.machine.profile import load_profile
    from edge_agent.machine.profile_signature import sign_profile

    profile = load_profile("pushed profile", text=text)
    signature = sign_profile(
        text.encode(),
        name=profile.name,
        version=profile.version,
        key=load_private_key(tmp / f"{key_id}.key"),
        key_id=key_id,
    )
    return {"yaml": text, "signature": signature.decode()}


def write_config(
    tmp: Path,
    plc_port: int,
    broker_port: int,
    *,
    station: str = "st-20",
    extra: str = "",
    reader: str = "{type: simulated}",
) -> Path:
    _private, public = generate_keypair("mes", tmp)
    _private, certifier = generate_keypair("cert", tmp)
    return station_config(
        tmp / "station.yaml",
        profile=PROFILE,
        machine=f"host: 127.0.0.1, port: {plc_port}, timeout: 0.5, reconnect_max: 0.5",
        broker=f"host: 127.0.0.1, port: {broker_port}, reconnect_min: 0.05, reconnect_max: 0.3",
        trusted_keys={"mes": public},
        station=station,
        reader=reader,
        # profile_keys last: the caller's `extra` keeps its line numbers
        extra=extra + f"profile_keys: {{cert: {json.dumps(str(certifier))}}}\n",
    )


@asynccontextmanager
async def running_station(
    tmp: Path, plc_port: int, broker_port: int, **kw: str
) -> AsyncIterator[Station]:
    """A station from a real config. With ``reader=`` (YAML of the reader section) the agent opens
    that reader itself (nfc, autoid); otherwise ``station.reader`` is a SimulatedReader."""
    path = write_config(tmp, plc_port, broker_port, **kw)
    config = load_config(path)
    simulated = SimulatedReader() if "reader" not in kw else None
    key = load_private_key(tmp / "mes.key")
    async with run_agent(config, reader=simulated) as run:
        keyring = KeyRing({"mes": key.public_key()})
        yield Station(run.agent, key, keyring, tmp, run.reports)
