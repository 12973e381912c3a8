"""The brokers ``benchmarks/fleet.py`` runs a fleet against, and the faults it injects.

``Mosquitto``: one mosquitto with persistence (sessions and queued QoS 1 messages survive a
graceful restart). ``RabbitCluster``: three RabbitMQ nodes with the MQTT plugin on this machine
(distinct node names, AMQP, distribution and MQTT ports, one Erlang cookie), clustered with
``rabbitmqctl join_cluster``. Debian's ``rabbitmq-server`` is installed with apt-get when absent.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from edge_agent.sim.broker import EmbeddedBroker, wait_listening

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
_next_port = 20000 + os.getpid() % 5000 * 2


def fixed_port() -> int:
    """A free port below the ephemeral range: a node that starts minutes later still gets it
    (a port from the ephemeral range may meanwhile be the source port of an agent's connection)."""
    global _next_port
    while True:
        _next_port += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", _next_port))
            except OSError:
                continue
            return _next_port


Fault = tuple[str, Callable[[], Awaitable[float | None]]]  # name, action -> time the broker is back


class Mosquitto:
    kind = "mosquitto"

    def __init__(self) -> None:
        self.broker = EmbeddedBroker(persistent=True)

    async def start(self) -> None:
        await self.broker.start()

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [(self.broker.host, self.broker.port)]

    @property
    def consumer_endpoint(self) -> tuple[str, int]:
        return self.endpoints[0]

    def faults(self, down: float) -> list[Fault]:
        async def restart() -> float:
            await self.broker.stop()
            await asyncio.sleep(down)
            await self.broker.start()
            return time.time()

        return [("restart mosquitto", restart)]

    async def stop(self) -> None:
        await self.broker.stop()
        self.broker.close()


def ensure_rabbitmq() -> None:
    if (RABBIT_BIN / "rabbitmq-server").exists():
        return
    print("installing rabbitmq-server (apt-get) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "rabbitmq-server"],
        check=True,
        env=env,
        capture_output=True,
    )


class RabbitNode:
    def __init__(self, index: int, base: Path, home: Path) -> None:
        self.name = f"fleet{index}@{socket.gethostname().split('.')[0]}"
        self.mqtt_port = fixed_port()
        self.dir = base / f"node{index}"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{fixed_port()}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_port}\n"
            "mqtt.allow_anonymous = true\nloopback_users = none\n"
            "log.console = false\nlog.file.level = warning\n"
            "mqtt.tcp_listen_options.backlog = 4096\n"
        )
        (self.dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        self.env = {
            **os.environ,
            "HOME": str(home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_DIST_PORT": str(fixed_port()),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
        }
        self.process: asyncio.subprocess.Process | None = None

    async def ctl(self, *args: str, timeout: float = 120) -> str:
        proc = await asyncio.create_subprocess_exec(
            str(RABBIT_BIN / "rabbitmqctl"),
            "-n",
            self.name,
            *args,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {self.name} {' '.join(args)}: {out.decode()}")
        return out.decode()

    async def start(self, wait: bool = True) -> None:
        log = (self.dir / "server.out").open("ab")
        self.process = await asyncio.create_subprocess_exec(
            str(RABBIT_BIN / "rabbitmq-server"),
            env=self.env,
            stdout=log,
            stderr=log,
            stdin=asyncio.subprocess.DEVNULL,
        )
        if wait:
            await self.ready()

    async def ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:  # the CLI cannot reach a node that has not registered with epmd yet
            try:
                await self.ctl("await_startup", timeout=timeout)
                break
            except RuntimeError:
                if self.process is not None and self.process.returncode is not None:
                    raise RuntimeError(
                        f"RabbitMQ node {self.name} exited {self.process.returncode}; "
                        f"see {self.dir / 'log'}"
                    ) from None
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)
        await wait_listening("127.0.0.1", self.mqtt_port, 60)

    async def stop(self) -> None:
        if self.process is None:
            return
        try:
            await self.ctl("stop", timeout=120)
        except (RuntimeError, TimeoutError):
            self.process.kill()
        await self.process.wait()
        self.process = None


class RabbitCluster:
    kind = "rabbitmq"

    def __init__(self, base: Path, nodes: int = 3, mirror: bool = True) -> None:
        self.mirror = mirror
        home = base / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text("EDGEAGENTFLEETBENCHMARK")
        cookie.chmod(0o400)
        self.nodes = [RabbitNode(i + 1, base, home) for i in range(nodes)]

    async def start(self) -> None:
        ensure_rabbitmq()
        first, *others = self.nodes
        await first.start()
        for node in others:
            await node.start()
            await node.ctl("stop_app")
            await node.ctl("join_cluster", first.name)
            await node.ctl("start_app")
            await node.ready()
        if self.mirror:
            # Persistent MQTT sessions are queues; unmirrored, a session whose queue sits on a
            # stopped node cannot subscribe anywhere else and the broker closes the connection.
            await first.ctl(
                *("set_policy", "--apply-to", "queues", "mqtt-sessions", "^mqtt-subscription-"),
                '{"ha-mode": "all", "ha-sync-mode": "automatic"}',
            )

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.mqtt_port) for n in self.nodes]

    @property
    def consumer_endpoint(self) -> tuple[str, int]:
        return self.endpoints[0]  # node 1 is never stopped alone: the consumer's queue lives there

    def faults(self, down: float) -> list[Fault]:
        last = self.nodes[-1]

        async def stop_one() -> None:
            await last.stop()
            return None

        async def restart_one() -> float:
            await last.start()
            return time.time()

        async def restart_all() -> float:
            for node in reversed(self.nodes):
                await node.stop()
            await asyncio.sleep(down)
            for node in self.nodes:  # together: each waits for its peers to come back
                await node.start(wait=False)
            await asyncio.gather(*(node.ready() for node in self.nodes))
            return time.time()

        return [
            (f"stop node {last.name}", stop_one),
            (f"restart node {last.name}", restart_one),
            ("restart the whole cluster", restart_all),
        ]

    async def stop(self) -> None:
        for node in reversed(self.nodes):
            await node.stop()


def have_mosquitto() -> bool:
    return shutil.which("mosquitto") is not None
