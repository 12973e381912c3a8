"""The reference OPC UA machine as a separate process, and a station wired to it.

The simulator runs as ``python -m edge_agent.sim.opcua_machine`` in its own process, as an external
server would: the driver shares nothing with it but the socket. One process serves every test of a
session (its start costs ≈ 1.5 s); tests that kill it start their own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge_agent.config import load_config
from edge_agent.instructions.signing import KeyRing, generate_keypair, load_private_key
from edge_agent.sim.station import running_station
from edge_agent.tag.simulated import SimulatedReader
from tests.station_harness import REPO, Station

__all__ = [
    "OPCUA_PROFILE",
    "USER",
    "OpcUaMachineProcess",
    "opcua_machine",
    "opcua_station",
]

OPCUA_PROFILE = REPO / "firmware_profiles" / "reference-opcua.yaml"
USER = ("operator", "s3cret")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OpcUaMachineProcess:
    """``python -m edge_agent.sim.opcua_machine`` on a loopback port, with its own PKI folder."""

    pki: Path
    port: int = field(default_factory=free_port)
    done_delay: float = 0.0
    extra_namespaces: int = 0
    options: list[str] = field(default_factory=list)  # more command line options
    process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}/edge-agent"

    @property
    def certificate(self) -> Path:
        return self.pki / "server-cert.der"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edge_agent.sim.opcua_machine",
                "--port",
                str(self.port),
                "--pki",
                str(self.pki),
                "--user",
                ":".join(USER),
                "--done-delay",
                str(self.done_delay),
                "--extra-namespaces",
                str(self.extra_namespaces),
                *self.options,
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # "ready <url> ..." once the endpoint answers
        if not line.startswith("ready"):
            self.stop()
            raise RuntimeError(f"OPC UA simulator did not start: {line!r}")

    def kill(self) -> None:
        """SIGKILL: no goodbye on the socket, as when a machine loses power."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(5)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None


@pytest.fixture(scope="session")
def opcua_machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpcUaMachineProcess]:
    """One simulator for the session: every endpoint (None, Sign, SignAndEncrypt), anonymous and
    ``USER``. Tests must not rely on its counters' absolute values."""
    machine = OpcUaMachineProcess(tmp_path_factory.mktemp("opcua-server-pki"))
    machine.start()
    yield machine
    machine.stop()


def machine_yaml(url: str, **settings: object) -> str:
    """The ``machine:`` section (flow style) for the reference OPC UA profile."""
    fields = {"profile": str(OPCUA_PROFILE), "url": url, "timeout": 1.0, "reconnect_min": 0.05}
    fields.update({"reconnect_max": 0.5, **settings})
    return json.dumps(fields)


@asynccontextmanager
async def opcua_station(
    tmp: Path, broker_port: int, machine: str, *, station: str = "st-20"
) -> AsyncIterator[Station]:
    """A whole station (simulated reader, real agent, real broker) on an OPC UA machine."""
    _private, public = generate_keypair("mes", tmp)
    path = tmp / "station.yaml"
    path.write_text(
        f"gateway_id: gw-test\nstation: {station}\nreader: {{type: simulated}}\n"
        f"machine: {machine}\n"
        f"broker: {{host: 127.0.0.1, port: {broker_port}, reconnect_min: 0.05, reconnect_max: 0.3}}\n"
        f"trusted_keys: {{mes: {json.dumps(str(public))}}}\n"
    )
    config = load_config(path)
    reader = SimulatedReader()
    key = load_private_key(tmp / "mes.key")
    async with running_station(config, reader=reader) as run:
        keyring = KeyRing({"mes": key.public_key()})
        yield Station(run.agent, key, keyring, tmp, run.reports)
