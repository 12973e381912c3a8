"""The OPC UA driver against the reference OPC UA machine running as a separate process.

A second, independent asyncua client plays the part of an observer on the server (it reads what
the driver wrote, with the DataType the server stored).
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto import cert_gen
from cryptography import x509

from edge_agent.errors import MachineError, MachineFault
from edge_agent.machine import opcua
from edge_agent.machine.opcua import MachineMismatch
from edge_agent.machine.opcua.driver import OpcUaDriver
from edge_agent.machine.opcua.security import thumbprint
from edge_agent.machine.profile import load_profile
from edge_agent.sim.opcua_machine import NAMESPACE
from edge_agent.station.handshake import run_handshake
from tests.fixtures_opcua import OPCUA_PROFILE, USER, OpcUaMachineProcess

PARAMS = {"setpoint": 12.5, "count": 3, "coolant": True, "label": "lot 7"}


def make_driver(
    machine: OpcUaMachineProcess, profile: Path = OPCUA_PROFILE, **settings: Any
) -> OpcUaDriver:
    fields = {"url": machine.url, "timeout": 1.0, "reconnect_min": 0.05, "reconnect_max": 0.3}
    driver = opcua.create({**fields, **settings}, load_profile(profile))
    assert isinstance(driver, OpcUaDriver)
    return driver


@pytest.fixture
async def driver(opcua_machine: OpcUaMachineProcess) -> AsyncIterator[OpcUaDriver]:
    d = make_driver(opcua_machine)
    await d.connect()
    yield d
    await d.close()


@pytest.fixture
async def observer(opcua_machine: OpcUaMachineProcess) -> AsyncIterator[Callable[[str], Any]]:
    """Reads a node of the machine by its string id, as the server holds it (a DataValue)."""
    client = Client(opcua_machine.url)
    await client.connect()
    idx = await client.get_namespace_index(NAMESPACE)

    async def read(name: str) -> ua.DataValue:
        return await client.get_node(ua.NodeId(name, idx)).read_data_value()

    read.client = client  # type: ignore[attr-defined]
    read.idx = idx  # type: ignore[attr-defined]
    yield read
    await client.disconnect()


def _encoded(driver: OpcUaDriver, values: dict[str, Any]) -> dict[str, Any]:
    return {name: driver.encode(name, value) for name, value in values.items()}


def _count_requests(driver: OpcUaDriver, service: str) -> list[int]:
    """Count one kind of service request the driver sends (the real request still goes out)."""
    assert driver._client is not None
    uaclient = driver._client.uaclient
    real = getattr(uaclient, service)
    calls: list[int] = []

    async def counted(params: Any) -> Any:
        calls.append(1)
        return await real(params)

    setattr(uaclient, service, counted)
    return calls


async def test_full_handshake_writes_every_parameter_in_one_request_with_the_node_type(
    driver: OpcUaDriver, observer: Any
) -> None:
    profile = driver.profile
    before = (await observer("Cycles")).Value.Value
    writes = _count_requests(driver, "write")

    outcome = await run_handshake(
        driver, profile.handshake, profile.operations["process"], _encoded(driver, PARAMS), PARAMS
    )

    assert outcome.results == {"expected_result": 25.0, "result": 25.0, "cycles": before + 1}
    # write_parameters is one Write; set trigger and reset trigger are one each.
    assert len(writes) == 3
    stored = {n: await observer(n) for n in ("Double", "Int32", "Boolean", "String", "Cycles")}
    assert {n: dv.Value.VariantType for n, dv in stored.items()} == {
        "Double": ua.VariantType.Double,
        "Int32": ua.VariantType.Int32,
        "Boolean": ua.VariantType.Boolean,
        "String": ua.VariantType.String,
        "Cycles": ua.VariantType.UInt32,
    }
    assert [stored[n].Value.Value for n in ("Double", "Int32", "Boolean", "String")] == [
        12.5,
        3,
        True,
        "lot 7",
    ]
    assert (await observer("Done")).Value.Value is False  # trigger reset cleared it


def test_values_that_do_not_fit_the_type_are_refused_before_any_write(
    opcua_machine: OpcUaMachineProcess,
) -> None:
    d = make_driver(opcua_machine)  # not even connected: encoding is pure
    assert d.encode("count", 7).VariantType is ua.VariantType.Int32
    assert d.encode("setpoint", 7).VariantType is ua.VariantType.Double
    with pytest.raises(ValueError, match="count: 2147483648 does not fit i32"):
        d.encode("count", 2**31)
    with pytest.raises(ValueError, match=r"label: .* at most 32"):
        d.encode("label", "x" * 33)
    with pytest.raises(ValueError, match="not a number"):
        d.encode("setpoint", "12")
    with pytest.raises(ValueError, match="not a bool"):
        d.encode("coolant", 2)


async def test_method_call_passes_typed_inputs_and_returns_outputs(driver: OpcUaDriver) -> None:
    call = "nsu=urn:edge-agent:reference-opcua-machine;s=Add"
    # An Int32-encoded value is converted to the method's Double argument, checked on the way.
    assert await driver.call(
        call, [driver.encode("setpoint", 1.25), driver.encode("count", 2)]
    ) == [3.25]


async def test_wait_is_served_by_data_change_notifications_not_polling(
    driver: OpcUaDriver, observer: Any
) -> None:
    await driver.write({"trigger": driver.encode("trigger", False)})
    await driver.wait_until("done", False, 2)
    reads = _count_requests(driver, "read")

    async def machine_finishes_later() -> None:
        await asyncio.sleep(0.3)
        node = observer.client.get_node(ua.NodeId("Trigger", observer.idx))
        await node.write_value(ua.Variant(True, ua.VariantType.Boolean))

    other = asyncio.create_task(machine_finishes_later())
    await driver.wait_until("done", True, 3)
    await other
    # 0.3 s of waiting: polling would have read dozens of times; the notification is enough.
    assert reads == []
    await driver.write({"trigger": driver.encode("trigger", False)})


async def test_wait_times_out_with_the_last_value(driver: OpcUaDriver) -> None:
    await driver.write({"trigger": driver.encode("trigger", False)})
    with pytest.raises(
        MachineFault, match=r"done did not become true within 0.2 s \(last value false\)"
    ):
        await driver.wait_until("done", True, 0.2)


async def test_write_refused_by_the_server_names_point_node_and_status(
    opcua_machine: OpcUaMachineProcess, tmp_path: Path
) -> None:
    # The profile says `result` is writable; online validation would refuse it, so write past it
    # to see the server's own answer reach the error.
    d = make_driver(opcua_machine)
    await d.connect()
    try:
        d._points["result"] = d._points["result"].model_copy(update={"read_only": False})
        with pytest.raises(
            MachineFault, match=r"Write refused for result \(nsu=.*;s=Result\): Bad"
        ):
            await d.write({"result": d.encode("result", 1.0)})
    finally:
        await d.close()


# -- validation against the live server -----------------------------------------------------


def _variant(tmp_path: Path, old: str, new: str) -> Path:
    text = OPCUA_PROFILE.read_text()
    assert old in text
    path = tmp_path / "reference-opcua.yaml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize(
    ("old", "new", "key", "message"),
    [
        (
            "{node: s=Int32, type: i32",
            "{node: s=Int23, type: i32",
            "points.count",
            r"point 'count' \(parameter count of operation process.*\), node nsu=.*;s=Int23: no such node",
        ),
        (
            "{node: s=Int32, type: i32",
            "{node: s=Int32, type: f64",
            "points.count",
            r"DataType is Int32, the profile says f64 \(Double\); the profile should say type: i32",
        ),
        (
            "result: {node: s=Result, type: f64, unit: mm, read_only: true,",
            "result: {node: s=Result, type: f64, unit: mm,",
            None,
            None,  # writable in the profile but only read: fine
        ),
        (
            "done: {path: Machine/Done",
            "done: {path: Machine/Finished",
            "points.done",
            r"node /Objects/Machine/Finished: no node at this browse path",
        ),
        (
            "defaults:\n  namespace: urn:edge-agent:reference-opcua-machine",
            "defaults:\n  namespace: urn:someone-else",
            "points.setpoint",
            r"namespace urn:someone-else is not on the server",
        ),
        (
            "s=Add",
            "s=Subtract",
            "handshake: call",
            r"method nsu=.*;s=Subtract: no such node",
        ),
    ],
    ids=[
        "missing-node",
        "wrong-type",
        "read-only-not-written",
        "missing-path",
        "unknown-namespace",
        "missing-method",
    ],
)
async def test_connect_validates_every_node_of_the_profile(
    opcua_machine: OpcUaMachineProcess,
    tmp_path: Path,
    old: str,
    new: str,
    key: str | None,
    message: str | None,
) -> None:
    d = make_driver(opcua_machine, _variant(tmp_path, old, new))
    try:
        if key is None:
            await d.connect()
            return
        with pytest.raises(MachineMismatch) as err:
            await d.connect()
        assert not err.value.retryable
        (problem,) = [p for p in err.value.problems if p.path.startswith(key)]
        assert problem.file.endswith("reference-opcua.yaml")
        assert "profile reference-opcua 1.0" in problem.message or key.startswith("handshake")
        assert message is not None and re.search(message, problem.message), problem.message
        if key.startswith("points."):
            assert problem.line is not None
        # The station refuses parts instead of failing mid-cycle: nothing can be encoded.
        with pytest.raises(ValueError, match="machine does not match the profile"):
            d.encode("setpoint", 1.0)
    finally:
        await d.close()


async def test_a_write_to_a_node_that_is_read_only_on_the_server_is_caught_at_connect(
    opcua_machine: OpcUaMachineProcess, tmp_path: Path
) -> None:
    # The profile maps a parameter onto the machine-owned Result node.
    path = _variant(tmp_path, "setpoint: {node: s=Double,", "setpoint: {node: s=Result,")
    d = make_driver(opcua_machine, path)
    try:
        with pytest.raises(
            MachineMismatch, match=r"point 'setpoint'.*s=Result: read-only on the server"
        ):
            await d.connect()
    finally:
        await d.close()


# -- security -------------------------------------------------------------------------------


def _trust(machine: OpcUaMachineProcess, pki: Path) -> None:
    (pki / "trusted").mkdir(parents=True, exist_ok=True)
    shutil.copy(machine.certificate, pki / "trusted" / "reference-machine.der")


@pytest.mark.parametrize(
    ("policy", "mode", "user"),
    [
        ("None", "None", False),
        ("None", "None", True),
        ("Basic256Sha256", "Sign", False),
        ("Basic256Sha256", "Sign", True),
        ("Basic256Sha256", "SignAndEncrypt", False),
        ("Basic256Sha256", "SignAndEncrypt", True),
    ],
)
async def test_every_security_mode_and_identity_runs_a_cycle(
    opcua_machine: OpcUaMachineProcess, tmp_path: Path, policy: str, mode: str, user: bool
) -> None:
    pki = tmp_path / "pki"
    _trust(opcua_machine, pki)
    identity: dict[str, Any] = {"username": USER[0], "password": USER[1]} if user else {}
    d = make_driver(
        opcua_machine, security={"policy": policy, "mode": mode, "pki": str(pki)}, **identity
    )
    try:
        await d.connect()
        profile = d.profile
        outcome = await run_handshake(
            d, profile.handshake, profile.operations["process"], _encoded(d, PARAMS), PARAMS
        )
        assert outcome.results["result"] == 25.0
        assert d._client is not None
        if policy != "None":
            # The generated client certificate carries the application URI the client announces.
            cert = x509.load_der_x509_certificate((pki / "own" / "cert.der").read_bytes())
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
                d._client.application_uri
            ]
            assert d._client.security_policy.Mode == getattr(ua.MessageSecurityMode, mode)
    finally:
        await d.close()


async def test_wrong_password_is_a_clear_refusal(opcua_machine: OpcUaMachineProcess) -> None:
    d = make_driver(opcua_machine, username=USER[0], password="wrong")
    try:
        with pytest.raises(
            MachineError, match=r"BadUserAccessDenied.*user operator.*wrong user name or password"
        ) as err:
            await d.connect()
        assert not err.value.retryable
    finally:
        await d.close()


async def test_untrusted_server_certificate_is_named_saved_and_trusted_once_moved(
    opcua_machine: OpcUaMachineProcess, tmp_path: Path
) -> None:
    pki = tmp_path / "pki"
    sha1 = thumbprint(opcua_machine.certificate.read_bytes())
    d = make_driver(
        opcua_machine,
        security={"policy": "Basic256Sha256", "mode": "SignAndEncrypt", "pki": str(pki)},
    )
    try:
        with pytest.raises(MachineError) as err:
            await d.connect()
        text = str(err.value)
        assert "server certificate 'urn:edge-agent:sim:reference-opcua-machine'" in text
        assert f"SHA-1 {sha1}) is not trusted" in text
        assert f"server_thumbprint: {sha1}" in text
        (rejected,) = (pki / "rejected").iterdir()
        assert rejected.read_bytes() == opcua_machine.certificate.read_bytes()
        # The integrator moves it to trusted/: the next attempt (after the backoff) connects.
        (pki / "trusted").mkdir()
        rejected.rename(pki / "trusted" / rejected.name)
        for _ in range(50):
            if d.connected:
                break
            await asyncio.sleep(0.05)
        assert d.connected
    finally:
        await d.close()


async def test_pinned_thumbprint(opcua_machine: OpcUaMachineProcess, tmp_path: Path) -> None:
    sha1 = thumbprint(opcua_machine.certificate.read_bytes())
    security = {"policy": "Basic256Sha256", "mode": "Sign", "pki": str(tmp_path / "pki")}
    good = make_driver(opcua_machine, security={**security, "server_thumbprint": sha1.upper()})
    bad = make_driver(opcua_machine, security={**security, "server_thumbprint": "00" * 20})
    try:
        await good.connect()
        with pytest.raises(MachineError, match=f"thumbprint {sha1}, not the pinned"):
            await bad.connect()
    finally:
        await good.close()
        await bad.close()


async def test_endpoint_selection_explains_what_the_server_offers(
    opcua_machine: OpcUaMachineProcess, tmp_path: Path
) -> None:
    user_cert = tmp_path / "user.der"
    user_cert.write_bytes(b"")
    d = make_driver(
        opcua_machine, user_certificate=str(user_cert), user_private_key=str(tmp_path / "user.pem")
    )
    try:
        with pytest.raises(
            MachineError, match=r"does not accept Certificate identities .*Anonymous, UserName"
        ):
            await d.connect()
    finally:
        await d.close()


async def test_unreachable_server_backs_off(tmp_path: Path) -> None:
    machine = OpcUaMachineProcess(tmp_path)  # never started: nothing listens on its port
    d = make_driver(machine)
    try:
        with pytest.raises(MachineError, match=r"connect: .*(refused|Connect call failed)"):
            await d.connect()
        with pytest.raises(MachineError, match="next attempt in"):
            await d.connect()
    finally:
        await d.close()


async def test_x509_user_identity_and_refused_anonymous(tmp_path: Path) -> None:
    # The user's own certificate (not the gateway's application certificate) is the identity.
    user_key, user_cert = tmp_path / "user-key.pem", tmp_path / "user-cert.der"
    await cert_gen.setup_self_signed_certificate(
        user_key, user_cert, "urn:example:operator-anna", "localhost", [], {}
    )
    machine = OpcUaMachineProcess(
        tmp_path / "server", options=["--no-anonymous", "--user-cert", str(user_cert)]
    )
    machine.start()
    pki = tmp_path / "pki"
    _trust(machine, pki)
    security = {"policy": "Basic256Sha256", "mode": "SignAndEncrypt", "pki": str(pki)}
    x509_user = make_driver(
        machine,
        security=security,
        user_certificate=str(user_cert),
        user_private_key=str(user_key),
    )
    anonymous = make_driver(machine, security=security)
    try:
        await x509_user.connect()
        assert (await x509_user.read(["cycles"]))["cycles"] >= 0
        with pytest.raises(MachineError, match="does not accept Anonymous identities") as err:
            await anonymous.connect()
        assert not err.value.retryable
    finally:
        await x509_user.close()
        await anonymous.close()
        machine.stop()
