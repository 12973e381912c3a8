"""The secured link against a real mosquitto: TLS with certificates made here, a password file,
MQTT 5, failover between brokers, and the failures a plant sees (wrong password, wrong CA).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import shutil
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import pytest_asyncio
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config import load_config
from edge_agent.config_schema import BrokerConfig, TlsConfig
from edge_agent.errors import ConfigError
from edge_agent.sim.broker import EmbeddedBroker, free_port, wait_listening
from edge_agent.uplink.mqtt import MqttUplink
from edge_agent.uplink.outbox_sqlite import SqliteOutbox
from tests import REPO_ROOT

USER, PASSWORD = "line1-st20", "s3cret-for-tests"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class SecureBroker:
    broker: EmbeddedBroker
    tls_port: int
    ca: Path
    other_ca: Path  # a CA that did not sign the broker's certificate
    mtls_port: int  # a listener that requires a client certificate
    client_cert: Path
    client_key: Path

    def config(self, **kw: Any) -> BrokerConfig:
        settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.tls_port,
            "username": USER,
            "password": PASSWORD,
            "tls": TlsConfig(ca_file=self.ca),
            "reconnect_min": 0.05,
            "reconnect_max": 0.3,
            **kw,
        }
        return BrokerConfig(**settings)


def write_material(directory: Path) -> tuple[Path, Path]:
    """CA, server certificate and key, an unrelated CA and a password file, readable by mosquitto."""
    directory.chmod(0o755)  # mosquitto drops to its own user when started as root
    ca_key, ca = make_ca("edge-agent test CA")
    key, cert = make_server_cert(ca_key, ca)
    client_key, client_cert = make_server_cert(ca_key, ca)  # any name: brokers check the chain
    _, other = make_ca("someone else's CA")
    files = {
        "ca.pem": ca.public_bytes(serialization.Encoding.PEM),
        "other-ca.pem": other.public_bytes(serialization.Encoding.PEM),
        "server.pem": cert.public_bytes(serialization.Encoding.PEM),
        "server.key": _pem_key(key),
        "client.pem": client_cert.public_bytes(serialization.Encoding.PEM),
        "client.key": _pem_key(client_key),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
        (directory / name).chmod(0o644)
    passwd = directory / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwd), USER, PASSWORD],
        check=True,
        capture_output=True,
    )
    passwd.chmod(0o644)
    return directory / "ca.pem", directory / "other-ca.pem"


@pytest_asyncio.fixture
async def secure_broker() -> AsyncIterator[SecureBroker]:
    if not shutil.which("mosquitto_passwd"):
        pytest.fail("mosquitto_passwd is not installed (it comes with mosquitto)")
    with tempfile.TemporaryDirectory(prefix="edge-agent-tls-") as tmp:
        directory = Path(tmp)
        ca, other_ca = await asyncio.to_thread(write_material, directory)
        broker = EmbeddedBroker()
        tls_port, mtls_port = free_port(), free_port()
        # Global settings: the plain listener needs the password too (the recorder uses it).
        broker.extra_config = (
            f"allow_anonymous false\npassword_file {directory / 'passwd'}\n"
            f"listener {tls_port} 127.0.0.1\ncafile {ca}\n"
            f"certfile {directory / 'server.pem'}\nkeyfile {directory / 'server.key'}\n"
            f"listener {mtls_port} 127.0.0.1\ncafile {ca}\nrequire_certificate true\n"
            f"certfile {directory / 'server.pem'}\nkeyfile {directory / 'server.key'}\n"
        )
        await broker.start()  # waits for the plain listener; the TLS ones may come a bit later
        for port in (tls_port, mtls_port):
            await wait_listening("127.0.0.1", port)
        yield SecureBroker(
            broker,
            tls_port,
            ca,
            other_ca,
            mtls_port,
            directory / "client.pem",
            directory / "client.key",
        )
        await broker.stop()
        broker.close()


class Recorder:
    """A subscriber that logs in on the plain listener and counts what arrives."""

    def __init__(self, broker: EmbeddedBroker, topic: str) -> None:
        self.messages: list[dict[str, Any]] = []
        self._subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self._client.username_pw_set(USER, PASSWORD)
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self._client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self._client.on_message = lambda c, u, m: self.messages.append(json.loads(m.payload))
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()

    async def ready(self) -> None:
        assert await asyncio.to_thread(self._subscribed.wait, 5)

    async def wait_for(self, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.messages) < count:
            assert loop.time() < deadline, f"{len(self.messages)} of {count} messages"
            await asyncio.sleep(0.01)
        return self.messages

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def unreachable(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == "broker unreachable"]


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_tls_and_password_deliver_every_report(
    secure_broker: SecureBroker, protocol: str
) -> None:
    recorder = Recorder(secure_broker.broker, "edge/gw-tls/cycles")
    await recorder.ready()
    uplink = MqttUplink(secure_broker.config(protocol=protocol), "gw-tls", "edge-agent-gw-tls")
    await uplink.start(lambda: {})
    assert await uplink.wait_connected(5)
    assert uplink._client.socket().version() is not None  # type: ignore[union-attr]
    for n in range(200):
        uplink.publish("cycles", {"n": n})
    assert await uplink.flush(10)
    got = await recorder.wait_for(200)
    assert [m["n"] for m in got] == list(range(200))
    assert [m["seq"] for m in got] == sorted(m["seq"] for m in got)
    await uplink.stop({"state": "offline"})
    recorder.close()


async def fixed_and_restarted(secure: SecureBroker, outbox: Path, count: int) -> None:
    """The operator fixes the setting and restarts the agent: every queued report arrives."""
    recorder = Recorder(secure.broker, "edge/gw-tls/cycles")
    await recorder.ready()
    box = SqliteOutbox(outbox)
    uplink = MqttUplink(secure.config(), "gw-tls", "edge-agent-gw-tls", outbox=box)
    await uplink.start(lambda: {})
    assert await uplink.flush(10)
    await uplink.stop({"state": "offline"})
    box.close()
    assert [m["n"] for m in await recorder.wait_for(count)] == list(range(count))
    recorder.close()


async def test_wrong_password_is_one_clear_line_and_a_capped_backoff(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    box = SqliteOutbox(tmp_path / "outbox.sqlite3")
    uplink = MqttUplink(
        secure_broker.config(password="wrong", reconnect_max=0.2),
        "gw-tls",
        "edge-agent-gw-tls",
        outbox=box,
    )
    with structlog.testing.capture_logs() as logs:
        await uplink.start(lambda: {})
        for n in range(20):
            uplink.publish("cycles", {"n": n})
        await asyncio.sleep(1.5)
        assert not uplink.connected
        assert all(not t.done() for t in uplink._tasks)  # still trying, nothing crashed
        await uplink.stop({"state": "offline"}, timeout=0.1)
    attempts = unreachable(logs)
    warnings = [e for e in attempts if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert "broker refused the connection" in warnings[0]["reason"]
    assert "Not authorized" in warnings[0]["reason"] or "password" in warnings[0]["reason"]
    assert 2 <= len(attempts) <= 1.5 / 0.05  # retried, never faster than reconnect_min
    delays = [e["retry_in_s"] for e in attempts]
    assert all(0.05 <= d <= 0.2 for d in delays) and len(set(delays)) > 1  # capped, jittered
    assert uplink.backlog == 21  # the reports and the offline status wait in the outbox
    box.close()
    await fixed_and_restarted(secure_broker, tmp_path / "outbox.sqlite3", 20)


async def test_wrong_ca_is_one_clear_line_never_a_crash(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    config = secure_broker.config(tls=TlsConfig(ca_file=secure_broker.other_ca))
    box = SqliteOutbox(tmp_path / "outbox.sqlite3")
    uplink = MqttUplink(config, "gw-tls", "edge-agent-gw-tls", outbox=box)
    with structlog.testing.capture_logs() as logs:
        await uplink.start(lambda: {})
        for n in range(20):
            uplink.publish("cycles", {"n": n})
        await asyncio.sleep(1.0)
        assert not uplink.connected
        assert all(not t.done() for t in uplink._tasks)
        await uplink.stop({"state": "offline"}, timeout=0.1)
    attempts = unreachable(logs)
    warnings = [e for e in attempts if e["log_level"] == "warning"]
    assert len(warnings) == 1 and len(attempts) >= 2
    assert warnings[0]["reason"].startswith("TLS: broker certificate rejected")
    assert "certificate" in warnings[0]["reason"]
    box.close()
    await fixed_and_restarted(secure_broker, tmp_path / "outbox.sqlite3", 20)


async def test_client_certificate_when_the_broker_requires_one(
    secure_broker: SecureBroker,
) -> None:
    without = secure_broker.config(port=secure_broker.mtls_port)
    uplink = MqttUplink(without, "gw-tls", "edge-agent-gw-tls")
    with structlog.testing.capture_logs() as logs:
        await uplink.start(lambda: {})
        for _ in range(100):  # the first refusal, however slow the TLS handshake is here
            if unreachable(logs):
                break
            await asyncio.sleep(0.05)
        assert not uplink.connected
        await uplink.stop({"state": "offline"}, timeout=0.1)
    [warning] = [e for e in unreachable(logs) if e["log_level"] == "warning"]
    assert "certificate required" in warning["reason"]  # the broker's TLS alert, in words

    tls = TlsConfig(
        ca_file=secure_broker.ca,
        cert_file=secure_broker.client_cert,
        key_file=secure_broker.client_key,
    )
    uplink = MqttUplink(
        secure_broker.config(port=secure_broker.mtls_port, tls=tls), "gw-tls", "edge-agent-gw-tls"
    )
    await uplink.start(lambda: {})
    assert await uplink.wait_connected(5)
    uplink.publish("cycles", {"n": 0})
    assert await uplink.flush(5)
    await uplink.stop({"state": "offline"})


async def test_hostname_check_can_be_relaxed_only_on_purpose(
    secure_broker: SecureBroker,
) -> None:
    # The certificate names localhost and 127.0.0.1; 127.0.0.1 reached as "127.1" is not named.
    strict = secure_broker.config(host="127.1", tls=TlsConfig(ca_file=secure_broker.ca))
    uplink = MqttUplink(strict, "gw-tls", "edge-agent-gw-tls")
    with structlog.testing.capture_logs() as logs:
        await uplink.start(lambda: {})
        assert not await uplink.wait_connected(0.5)
        await uplink.stop({"state": "offline"}, timeout=0.1)
    assert "certificate" in unreachable(logs)[0]["reason"]

    relaxed = secure_broker.config(
        host="127.1", tls=TlsConfig(ca_file=secure_broker.ca, verify_hostname=False)
    )
    uplink = MqttUplink(relaxed, "gw-tls", "edge-agent-gw-tls")
    await uplink.start(lambda: {})
    assert await uplink.wait_connected(5)
    await uplink.stop({"state": "offline"})


async def test_failover_to_the_next_broker_uri(broker: EmbeddedBroker) -> None:
    dead = free_port()
    config = BrokerConfig(
        uris=[f"mqtt://127.0.0.1:{dead}", f"mqtt://{broker.host}:{broker.port}"],
        protocol="5",
        reconnect_min=0.05,
        reconnect_max=0.2,
    )
    uplink = MqttUplink(config, "gw-fo", "edge-agent-gw-fo")
    with structlog.testing.capture_logs() as logs:
        await uplink.start(lambda: {})
        assert await uplink.wait_connected(5)
        assert uplink.publish("cycles", {"n": 1}) is not None
        assert await uplink.flush(5)
        await uplink.stop({"state": "offline"})
    [failed] = unreachable(logs)
    assert failed["device"] == f"mqtt://127.0.0.1:{dead}"
    assert failed["reason"] == "Connection refused"
    connected = [e for e in logs if e["event"] == "broker link recovered"]
    assert connected[0]["device"] == f"mqtt://{broker.host}:{broker.port}"


def take_over_session(broker: EmbeddedBroker, client_id: str, protocol: str) -> None:
    """Connect with the agent's client id (the broker drops the agent), then leave the session."""
    v5 = protocol == "5"
    imposter = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else False,
    )
    kwargs: dict[str, Any] = {}
    if v5:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 60
        kwargs = {"clean_start": False, "properties": props}
    imposter.connect(broker.host, broker.port, **kwargs)
    imposter.loop_start()
    for _ in range(500):
        if imposter.is_connected():
            break
        threading.Event().wait(0.01)
    imposter.disconnect()
    imposter.loop_stop()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_commands_queued_while_away_arrive_after_reconnect(
    broker: EmbeddedBroker, protocol: str
) -> None:
    """clean_session false: the broker keeps the session, so nothing queued for the agent is lost."""
    config = BrokerConfig(
        host=broker.host, port=broker.port, protocol=protocol, reconnect_min=1.0, reconnect_max=1.0
    )
    uplink = MqttUplink(config, "gw-s", "edge-agent-gw-s")
    got: list[bytes] = []
    uplink.subscribe("cmd/#", lambda topic, payload, props: got.append(payload))
    await uplink.start(lambda: {})
    assert await uplink.wait_connected(5)
    await asyncio.sleep(0.1)  # the SUBACK
    await asyncio.to_thread(take_over_session, broker, "edge-agent-gw-s", protocol)
    sender = mqtt.Client(CallbackAPIVersion.VERSION2)
    sender.connect(broker.host, broker.port)
    sender.loop_start()
    await asyncio.to_thread(
        sender.publish("edge/gw-s/cmd/pause", b"while away", qos=1).wait_for_publish, 5
    )
    sender.loop_stop()
    sender.disconnect()
    assert not uplink.connected  # it was away when the command came (reconnects after 1 s)
    for _ in range(300):
        if got:
            break
        await asyncio.sleep(0.01)
    assert got == [b"while away"]
    await uplink.stop({"state": "offline"})


def _config_file(tmp_path: Path, broker_yaml: str) -> Path:
    profile = REPO_ROOT / "firmware_profiles" / "reference-plc.yaml"
    (tmp_path / "mes.pub").write_bytes(
        (profile.parents[1] / "config/keys/mes-example.pub").read_bytes()
    )
    path = tmp_path / "station.yaml"
    path.write_text(
        "gateway_id: gw-c\nstation: st-20\nreader: {type: simulated}\n"
        f"machine: {{profile: {json.dumps(str(profile))}, host: 127.0.0.1, port: 5020}}\n"
        f"trusted_keys: {{mes: mes.pub}}\nstate_dir: state\n{broker_yaml}"
    )
    return path


def test_config_resolves_tls_files_and_failover_uris(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(make_ca("CA")[1].public_bytes(serialization.Encoding.PEM))
    path = _config_file(
        tmp_path,
        "broker:\n  uris: [mqtts://a.plant:8883, 'mqtts://[::1]']\n  protocol: 5\n"
        "  tls: {ca_file: ca.pem}\n",
    )
    config = load_config(path)
    assert config.broker.endpoints == [("a.plant", 8883), ("::1", 8883)]
    assert config.broker.use_tls and config.broker.protocol == "5"
    assert config.broker.tls is not None and config.broker.tls.ca_file == tmp_path / "ca.pem"
    assert config.state_dir == tmp_path / "state"


def test_config_errors_name_file_line_and_key(tmp_path: Path) -> None:
    path = _config_file(tmp_path, "broker:\n  tls:\n    ca_file: missing-ca.pem\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:9: broker.tls.ca_file: no such file: {tmp_path / 'missing-ca.pem'}" in str(
        err.value
    )

    path = _config_file(tmp_path, "broker:\n  uris: [mqtt://a:1883, mqtts://b:8883]\n")
    with pytest.raises(ConfigError, match=r"station.yaml:8: broker.uris: .*not both"):
        load_config(path)
    path = _config_file(tmp_path, "broker:\n  uris: [tcp://a:1883]\n")
    with pytest.raises(ConfigError, match=r"broker.uris: .*mqtt://HOST\[:PORT\]"):
        load_config(path)
