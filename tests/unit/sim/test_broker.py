"""The tests' and the demo's broker is found where Debian installs it, not only on PATH."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.sim.broker import EmbeddedBroker, find_mosquitto
from tests.fixtures_broker import MqttRecorder


@pytest.mark.skipif(not Path("/usr/sbin/mosquitto").exists(), reason="mosquitto not in /usr/sbin")
async def test_mosquitto_in_sbin_is_found_without_it_on_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A non-root user's PATH on Debian and Raspberry Pi OS has no sbin directory.
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin")
    assert find_mosquitto() == "/usr/sbin/mosquitto"
    broker = EmbeddedBroker()
    assert broker.kind == "mosquitto"
    await broker.start()
    try:
        recorder = MqttRecorder(broker.host, broker.port)
        await recorder.ready()  # a real broker answers on the port
        recorder.close()
    finally:
        await broker.stop()
        broker.close()
