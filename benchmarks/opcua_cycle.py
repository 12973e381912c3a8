"""OPC UA cycle latency and connect time, against the reference OPC UA machine in its own process.

    python benchmarks/opcua_cycle.py [--cycles 300] [--connects 20]

One run prints:
  * connect time per security mode (None; Basic256Sha256 Sign; SignAndEncrypt): the driver's whole
    connect (GetEndpoints, certificate trust, secure channel, session, node resolution and
    validation, subscription), median and p99;
  * per security mode, the handshake of the reference profile run by the driver (one Write of four
    parameters, Call Add, set trigger, wait for Done by subscription, Read results, reset trigger,
    wait for Done false);
  * the floor: a bare asyncua client sending the identical service requests and waiting on its own
    subscription with the same publishing interval;
  * the agent's overhead per cycle over that floor (median and p99), and a full station cycle
    (tag event -> cycle report, with verification, tag write-back and MQTT) for scale.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PARAMS: dict[str, Any] = {"setpoint": 12.5, "count": 3, "coolant": True, "label": "lot 7"}
INTERVAL_S = 0.01  # the driver's default publishing interval; --publishing-interval changes it
MODES = [
    ("None", "None", False),
    ("Basic256Sha256", "Sign", True),
    ("Basic256Sha256", "SignAndEncrypt", True),
]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def line(label: str, values: list[float]) -> str:
    return (
        f"{label:<40} median {statistics.median(values):7.3f} ms   p99 {pct(values, 0.99):7.3f} ms"
    )


def settings(machine: Any, pki: Path, policy: str, mode: str, user: bool) -> dict[str, Any]:
    from edge_agent.machine.opcua.security import thumbprint
    from tests.fixtures_opcua import USER

    out: dict[str, Any] = {"url": machine.url, "timeout": 2.0, "publishing_interval": INTERVAL_S}
    if policy != "None":
        out["security"] = {
            "policy": policy,
            "mode": mode,
            "pki": str(pki),
            "server_thumbprint": thumbprint(machine.certificate.read_bytes()),
        }
    if user:
        out["username"], out["password"] = USER
    return out


async def connect_times(machine: Any, pki: Path, n: int) -> dict[str, list[float]]:
    from edge_agent.machine import opcua
    from edge_agent.machine.profile import load_profile
    from tests.fixtures_opcua import OPCUA_PROFILE

    profile = load_profile(OPCUA_PROFILE)
    out = {}
    for policy, mode, user in MODES:
        times = []
        for _ in range(n + 2):
            driver = opcua.create(settings(machine, pki, policy, mode, user), profile)
            t0 = time.perf_counter()
            await driver.connect()
            times.append((time.perf_counter() - t0) * 1000)
            await driver.close()
        out[f"{policy}/{mode}"] = times[2:]  # the first connects generate the certificate
    return out


async def handshake_times(
    machine: Any, pki: Path, cycles: int, policy: str, mode: str, user: bool
) -> list[float]:
    from edge_agent.machine import opcua
    from edge_agent.machine.profile import load_profile
    from edge_agent.station.handshake import run_handshake
    from tests.fixtures_opcua import OPCUA_PROFILE

    profile = load_profile(OPCUA_PROFILE)
    driver = opcua.create(settings(machine, pki, policy, mode, user), profile)
    await driver.connect()
    operation = profile.operations["process"]
    times = []
    for i in range(cycles + 20):
        t0 = time.perf_counter()
        encoded = {name: driver.encode(name, value) for name, value in PARAMS.items()}
        await run_handshake(driver, profile.handshake, operation, encoded, PARAMS)
        if i >= 20:
            times.append((time.perf_counter() - t0) * 1000)
    await driver.close()
    return times


async def floor_times(
    machine: Any, pki: Path, cycles: int, policy: str, mode: str, user: bool
) -> list[float]:
    from asyncua import Client, ua
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    from edge_agent.machine.opcua.security import default_application_uri
    from edge_agent.sim.opcua_machine import NAMESPACE
    from tests.fixtures_opcua import USER

    client = Client(machine.url)
    if policy != "None":  # the certificate the driver generated in the connect phase
        client.application_uri = default_application_uri()
        await client.set_security(
            SecurityPolicyBasic256Sha256,
            certificate=str(pki / "own" / "cert.der"),
            private_key=str(pki / "own" / "key.pem"),
            server_certificate=str(machine.certificate),
            mode=getattr(ua.MessageSecurityMode, mode),
        )
    if user:
        client.set_user(USER[0])
        client.set_password(USER[1])
    await client.connect()
    idx = await client.get_namespace_index(NAMESPACE)
    node = {
        n: ua.NodeId(n, idx)
        for n in (
            "Double",
            "Int32",
            "Boolean",
            "String",
            "Trigger",
            "Result",
            "Cycles",
            "Done",
            "Machine",
            "Add",
        )
    }
    done = asyncio.Event()
    state: dict[str, Any] = {}

    class Handler:
        def datachange_notification(self, n: Any, val: Any, data: Any) -> None:
            state["done"] = val
            done.set()

    sub = await client.create_subscription(INTERVAL_S * 1000, Handler())
    await sub.subscribe_data_change([client.get_node(node["Done"])], sampling_interval=0.0)

    def write(items: list[tuple[str, Any, Any]]) -> Any:
        params = ua.WriteParameters()
        for name, value, vtype in items:
            wv = ua.WriteValue()
            wv.NodeId, wv.AttributeId = node[name], ua.AttributeIds.Value
            wv.Value = ua.DataValue(ua.Variant(value, vtype), StatusCode=None)
            params.NodesToWrite.append(wv)
        return client.uaclient.write(params)

    async def wait(value: bool) -> None:
        while state.get("done") is not value:
            done.clear()
            await done.wait()

    times = []
    for i in range(cycles + 20):
        t0 = time.perf_counter()
        await write(
            [
                ("Double", 12.5, ua.VariantType.Double),
                ("Int32", 3, ua.VariantType.Int32),
                ("Boolean", True, ua.VariantType.Boolean),
                ("String", "lot 7", ua.VariantType.String),
            ]
        )
        call = ua.CallMethodRequest()
        call.ObjectId, call.MethodId = node["Machine"], node["Add"]
        call.InputArguments = [ua.Variant(12.5, ua.VariantType.Double)] * 2
        await client.uaclient.call([call])
        await write([("Trigger", True, ua.VariantType.Boolean)])
        await wait(True)
        params = ua.ReadParameters()
        for name in ("Result", "Cycles"):
            rv = ua.ReadValueId()
            rv.NodeId, rv.AttributeId = node[name], ua.AttributeIds.Value
            params.NodesToRead.append(rv)
        await client.uaclient.read(params)
        await write([("Trigger", False, ua.VariantType.Boolean)])
        await wait(False)
        if i >= 20:
            times.append((time.perf_counter() - t0) * 1000)
    await client.disconnect()
    return times


async def station_times(machine: Any, cycles: int) -> list[float]:
    from edge_agent.instructions.model import Step
    from edge_agent.log import setup_logging
    from edge_agent.sim.broker import EmbeddedBroker
    from tests.fixtures_opcua import machine_yaml, opcua_station

    setup_logging("error", "console")
    broker = EmbeddedBroker()
    await broker.start()
    times = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            machine_section = machine_yaml(machine.url, publishing_interval=INTERVAL_S)
            async with opcua_station(Path(tmp), broker.port, machine_section) as station:
                steps = [
                    Step("process", {"setpoint": 1.0, "count": 1}, "st-10"),
                    Step("process", PARAMS, "st-20"),
                ]
                tags = [
                    station.tag(steps, uid=b"\x04" + i.to_bytes(6, "big"), done=1)
                    for i in range(cycles + 20)
                ]
                for i, tag in enumerate(tags):
                    t0 = time.perf_counter()
                    report = await station.cycle(tag)
                    if report.status != "ok":
                        raise SystemExit(f"cycle {i} not ok: {report.error}")
                    if i >= 20:
                        times.append((time.perf_counter() - t0) * 1000)
    finally:
        await broker.stop()
        broker.close()
    return times


async def main(cycles: int, connects: int) -> None:
    from edge_agent.log import setup_logging
    from tests.fixtures_opcua import OpcUaMachineProcess

    setup_logging("error", "console")
    interval_ms = INTERVAL_S * 1000
    with tempfile.TemporaryDirectory() as tmp:
        machine = OpcUaMachineProcess(Path(tmp) / "server")
        machine.start()
        try:
            pki = Path(tmp) / "client"
            floors: dict[tuple[str, str], list[float]] = {}
            print(
                f"reference OPC UA machine in its own process, loopback; publishing interval {interval_ms:g} ms"
            )
            for label, times in (await connect_times(machine, pki, connects)).items():
                print(line(f"connect {label} ({len(times)}x)", times))
            for policy, mode, user in MODES:
                floor = await floor_times(machine, pki, cycles, policy, mode, user)
                agent = await handshake_times(machine, pki, cycles, policy, mode, user)
                overhead = [t - statistics.median(floor) for t in agent]
                print(f"{policy}/{mode}, {'username' if user else 'anonymous'}")
                print(line("  floor: bare asyncua client", floor))
                print(line("  driver: handshake of the profile", agent))
                print(line("  driver overhead over the floor", overhead))
                floors[policy, mode] = floor
            station = await station_times(machine, cycles)
            print(line("station: tag event -> report (None)", station))
            print(
                line("  overhead over the floor", [t - statistics.median(floor) for t in station])
            )
        finally:
            machine.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--connects", type=int, default=20)
    parser.add_argument(
        "--publishing-interval", type=float, default=INTERVAL_S, help="seconds (default 0.01)"
    )
    ns = parser.parse_args()
    INTERVAL_S = ns.publishing_interval
    asyncio.run(main(ns.cycles, ns.connects))
