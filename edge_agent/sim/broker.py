"""An MQTT broker for the demo and the tests: mosquitto when it is installed, else amqtt.

Both are real brokers on a loopback port; the agent cannot tell them from a plant's broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any


def find_mosquitto() -> str | None:
    """mosquitto's path: on PATH, or in the sbin directories where Debian and Raspberry Pi OS
    install it (not on a non-root user's PATH)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which("mosquitto", path=path)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def wait_listening(host: str, port: int, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        except OSError:
            if loop.time() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s") from None
            await asyncio.sleep(0.02)


class EmbeddedBroker:
    """Start/stop a broker on ``host:port``; ``stop()`` then ``start()`` reuses the same port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, persistent: bool = False) -> None:
        self.host = host
        # Persistent: sessions and queued QoS 1 messages survive a graceful stop()/start(), so a
        # subscriber with a persistent session misses nothing published while it was away.
        self.persistent = persistent
        self.port = port or free_port(host)
        self._mosquitto = find_mosquitto()
        self.kind = "mosquitto" if self._mosquitto else "amqtt"
        self._process: asyncio.subprocess.Process | None = None
        self._amqtt: Any = None
        self._dir = tempfile.TemporaryDirectory(prefix="edge-agent-broker-")
        # Started as root, mosquitto drops to its own user; it must still write its database here.
        os.chmod(self._dir.name, 0o1777)
        self.extra_config = ""  # appended to mosquitto's config (TLS listeners, password files)

    async def start(self) -> None:
        if self.kind == "mosquitto":
            conf = Path(self._dir.name) / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} {self.host}\nallow_anonymous true\n"
                # mosquitto drops QoS 1 messages past 1 000 queued for a slow subscriber; a burst
                # of replayed reports must reach the demo's and the tests' listeners whole.
                "max_queued_messages 0\n"
                + (
                    f"persistence true\npersistence_location {self._dir.name}/\n"
                    if self.persistent
                    else "persistence false\n"
                )
                + f"log_dest stderr\nlog_type error\n{self.extra_config}"
            )
            self._process = await asyncio.create_subprocess_exec(
                self._mosquitto or "mosquitto",
                "-c",
                str(conf),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        else:
            try:
                from amqtt.broker import Broker
            except ImportError as err:
                raise RuntimeError(
                    "no MQTT broker: install mosquitto, or `pip install 'edge-agent[demo]'` for amqtt"
                ) from err
            config = {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
                },
            }
            # amqtt logs every probe connection as an error; the demo's own output is what matters.
            logging.getLogger("amqtt").setLevel(logging.CRITICAL)
            self._amqtt = Broker(config)
            await self._amqtt.start()
        await wait_listening(self.host, self.port)

    async def stop(self) -> None:
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                self._process.terminate()
            await self._process.wait()
            self._process = None
        if self._amqtt is not None:
            await self._amqtt.shutdown()
            self._amqtt = None

    async def kill(self) -> None:
        """Stop without a goodbye: clients see the connection drop."""
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            await self._process.wait()
            self._process = None
        else:
            await self.stop()

    def close(self) -> None:
        self._dir.cleanup()
