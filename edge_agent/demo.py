"""``edge-agent demo``: the whole station in one process, on embedded defaults.

An embedded reference PLC (pymodbus server), an embedded MQTT broker (mosquitto, else amqtt), a
simulated reader fed with signed demo parts of several variants, and the agent itself, configured
through a generated config file exactly as ``edge-agent run`` is. Each part arrives with its first
step already done by the previous station, so the agent has to pick its own step from the progress.
The closing summary counts the cycle reports that came back through the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .agent import Agent
from .config import AgentConfig, load_config
from .errors import PartRejected
from .instructions.codec import TAG_CAPACITY, decode_tag, encode_tag, update_progress
from .instructions.model import Step, StepRecord, StepStatus
from .instructions.recipe import Recipe
from .instructions.signing import KeyRing, generate_keypair, load_private_key
from .sim.broker import EmbeddedBroker
from .sim.ntag import NtagImage, NtagSimulator
from .sim.station import RunningStation, running_station, station_config
from .tag.simulated import SimulatedReader, SimulatedTag

STATION = "st-20"
GATEWAY = "demo-gw"


@dataclass(frozen=True)
class DemoOptions:
    parts: int = 20
    machine: str | None = None  # HOST:PORT of an external reference PLC, or an opc.tcp:// URL
    broker: str | None = None  # HOST:PORT of an external broker
    profile: Path | None = None
    rate: float = 0.0  # parts per second, 0 = as fast as the station goes
    nfc: bool = False  # present every part as an NTAG215 through nfcpy's udp driver
    opcua: bool = False  # the reference OPC UA machine instead of the reference PLC
    state_dir: Path | None = None  # the disk outbox; default: a temporary directory
    sparkplug: bool = False  # also a Sparkplug B edge node; print what a host receives


def find_profile(name: str = "reference-plc.yaml") -> Path:
    """The shipped profile: in the source tree, the working directory, or the installed data dir."""
    candidates = [
        Path.cwd() / "firmware_profiles" / name,
        Path(__file__).resolve().parent.parent / "firmware_profiles" / name,
        Path(sys.prefix) / "share" / "edge-agent" / "firmware_profiles" / name,
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"firmware profile {name} not found; give one with --profile")


def demo_steps(i: int) -> tuple[str, str, list[Step]]:
    """Part i's product, variant and routing: st-10 drills, st-20 (us) varies by variant, st-30 presses."""
    k = i % 4
    j = i % 100  # values vary from part to part but stay inside the profile for any --parts
    drill = {
        "spindle_speed": 1000 + 100 * k,
        "feed_rate": 250.5,
        "depth": 5.0 + k,
        "tool": 1 + k,
        "dwell": 100,
    }
    mine: tuple[str, str, str, dict[str, Any]] = [
        (
            "bracket",
            "B-short",
            "drill",
            {
                "spindle_speed": 1200 + 50 * j,
                "feed_rate": 300.0,
                "depth": 12.5,
                "tool": 3,
                "dwell": 200,
            },
        ),
        (
            "bracket",
            "B-long",
            "mill",
            {
                "spindle_speed": 2400,
                "feed_rate": 420.5 + j,
                "depth": 6.25,
                "tool": 7,
                "coolant_temp": 18.5,
            },
        ),
        (
            "housing",
            "H-std",
            "press",
            {"force": 25000 + 1000 * j, "dwell": 500, "coolant_temp": 21.0},
        ),
        (
            "housing",
            "H-xl",
            "drill",
            {"spindle_speed": 900, "feed_rate": 180.0, "depth": 32.0 + k, "tool": 12, "dwell": 400},
        ),
    ][k]
    press = {"force": 40000, "dwell": 300, "coolant_temp": 20.0}
    steps = [
        Step("drill", drill, "st-10"),
        Step(mine[2], mine[3], STATION),
        Step("press", press, "st-30"),
    ]
    return mine[0], mine[1], steps


def demo_opcua_steps(i: int) -> tuple[str, str, list[Step]]:
    """Part i for the reference OPC UA machine (profile reference-opcua): st-20 processes or
    calibrates, with every parameter type the machine has (Double, Int32, Boolean, String)."""
    k = i % 4
    first = Step("process", {"setpoint": 50.0, "count": 1}, "st-10")
    mine = (
        Step("calibrate", {"setpoint": 2.5 + k, "label": f"cal {i + 1}"}, STATION)
        if k == 3
        else Step(
            "process",
            {
                "setpoint": 10.0 + 2.5 * (i % 100),
                "count": 1 + k,
                "coolant": k == 1,
                "label": f"lot {i + 1}",
            },
            STATION,
        )
    )
    variant = ["V-std", "V-cool", "V-long", "V-cal"][k]
    return "valve", variant, [first, mine]


async def _opcua_machine(options: DemoOptions, workdir: Path) -> tuple[Any, str, str]:
    """(embedded simulator or None, the config's machine settings, a label for the banner)."""
    if options.machine:
        return None, f"url: {json.dumps(options.machine)}", f"{options.machine} (external)"
    from .machine.opcua.security import thumbprint
    from .sim.opcua_machine import ReferenceOpcUaMachine

    sim = ReferenceOpcUaMachine(pki=workdir / "server-pki", users={"demo": "demo"})
    url = await sim.start("127.0.0.1", 0)
    security = {
        "policy": "Basic256Sha256",
        "mode": "SignAndEncrypt",
        "pki": str(workdir / "pki"),
        "server_thumbprint": thumbprint(sim.certificate.read_bytes()),
    }
    settings = f"url: {url}, username: demo, password: demo, security: {json.dumps(security)}"
    return (
        sim,
        settings,
        f"{url} (embedded reference OPC UA machine, Basic256Sha256 SignAndEncrypt)",
    )


def demo_uid(i: int) -> bytes:
    return b"\x04" + hashlib.sha256(f"demo-part-{i}".encode()).digest()[:6]


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"edge-agent demo: --{what} must be HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


class _Subscriber:
    """Counts the cycle reports that come back through the broker."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        self.reports: dict[str, dict[str, Any]] = {}
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"edge-agent-demo-listener-{time.time_ns()}"
        )
        self.interrupted = False  # lost the broker: reports sent meanwhile were not seen here
        self._closing = False
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self._client.on_disconnect = lambda *_: setattr(
            self, "interrupted", self.interrupted or not self._closing
        )
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(1, 2)
        self._client.connect_async(host, port)
        self._client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with contextlib.suppress(ValueError):
            report = json.loads(msg.payload)
            self.reports[report["id"]] = report  # the id makes redelivered duplicates harmless

    def close(self) -> None:
        self._closing = True
        self._client.disconnect()  # wakes paho's thread at once; loop_stop() alone waits up to 1 s
        self._client.loop_stop()


def _read_back(tag: NtagImage, uid: bytes, keyring: KeyRing) -> str:
    """What the part's tag says now, decoded from the simulated tag's memory after it left."""
    message = tag.ndef_message()
    if message is None:
        return "read back: no NDEF message"
    try:
        progress = decode_tag(message, uid, keyring).progress
    except PartRejected as err:
        return f"read back: {err.reason}"
    done = sum(1 for r in progress.records if r is not None and r.status is StepStatus.OK)
    return f"read back: progress seq {progress.seq}, {done}/{len(progress.records)} steps done"


def format_report(n: int, report: dict[str, Any]) -> str:
    part = report.get("part") or {}
    step = report.get("step")
    head = f"{n:>4}  {part.get('id', '?'):<10} {part.get('variant', ''):<8}"
    where = (
        f"step {step['index'] + 1}/{step['count']} {step['operation']:<6}"
        if step
        else "step -/-" + " " * 7
    )
    ms = report["durations_ms"].get("total", 0.0)
    if report["status"] != "ok":
        return f"{head} {where} {report['status'].upper()} {report['reason']}: {report['error']}  [{ms:.1f} ms]"
    params = " ".join(
        f"{p['name']}={p['value']}{(' ' + p['unit']) if p.get('unit') else ''}"
        for p in report["parameters"]
    )
    cycles = report["results"].get("cycle_count", report["results"].get("cycles"))
    return f"{head} {where} {params} -> ok, cycle #{cycles}  [{ms:.1f} ms]"


def _sparkplug_view(host: str, port: int) -> Any:
    from .line.sparkplug_view import SparkplugView  # protobuf is loaded only when used

    view = SparkplugView(host, port)
    view.wait_ready()
    return view


async def _drain(agent: Agent, out: Any) -> bool:
    """Wait until the broker has acknowledged every report, however long it is away."""
    while not await agent.uplink.flush(timeout=5):
        print(
            f"waiting for the broker: {agent.uplink.backlog} messages in the outbox, "
            f"oldest {agent.uplink.oldest_age:.0f} s",
            file=out,
        )
    return True


async def _feed(
    options: DemoOptions,
    station: RunningStation,
    reader: SimulatedReader | None,
    ntag: NtagSimulator | None,
    private_path: Path,
    out: Any,
    view: Any = None,
) -> tuple[bool, int]:
    """Present each demo part, print its report; (all acknowledged by the broker, ok count)."""
    key = load_private_key(private_path)
    keyring = KeyRing({"demo": key.public_key()})
    started = time.perf_counter()
    ok = 0  # as the agent produced them; the listener counts what came through the broker
    for i in range(options.parts):
        if options.rate > 0:
            await asyncio.sleep(max(0.0, started + i / options.rate - time.perf_counter()))
        product, variant, steps = (demo_opcua_steps if options.opcua else demo_steps)(i)
        recipe = Recipe.from_steps(
            part_id=f"P-{i + 1:05d}",
            product=product,
            variant=variant,
            order=f"ORD-{4700 + i // 5}",
            steps=steps,
        )
        uid = demo_uid(i)
        message = encode_tag(recipe, uid, key, "demo", TAG_CAPACITY["ntag215"])
        contents = decode_tag(message, uid, keyring)  # the previous station's write-back
        done = contents.progress.with_record(
            0, StepRecord(StepStatus.OK, "st-10", int(time.time())), len(steps)
        )
        message = update_progress(contents, done)
        if ntag is None:
            assert reader is not None
            reader.present(SimulatedTag(uid, message))
        else:
            tag = NtagImage.blank("NTAG215", uid)
            tag.put_ndef(message)
            ntag.present(tag)
        report = await station.next_report(60)
        ok += report.status == "ok"
        line = format_report(i + 1, report.as_message())
        if ntag is None:
            assert reader is not None
            reader.remove(uid)
        else:
            ntag.remove()
            line += f"  tag {report.tag_write}, {_read_back(tag, uid, keyring)}"
        print(line, file=out)
        if view is not None:  # --sparkplug: what a Sparkplug host received for this part
            await asyncio.sleep(0.05)  # the host's copies trail the cycle slightly
            for seen in view.take():
                print(seen, file=out)

    return await _drain(station.agent, out), ok


async def _start_machine(
    options: DemoOptions, workdir: Path, stack: contextlib.AsyncExitStack
) -> tuple[str, str]:
    """(the config's machine settings, a label for the banner): --machine, else an embedded one."""
    if options.opcua:
        sim, fields, label = await _opcua_machine(options, workdir)
        if sim is not None:
            stack.push_async_callback(sim.stop)
        return fields, label
    if options.machine:
        host, port = parse_hostport(options.machine, "machine")
        return f"host: {host}, port: {port}", f"{host}:{port} (external)"
    from .sim.reference_plc import ReferencePlc

    plc = ReferencePlc()
    stack.push_async_callback(plc.stop)
    host, port = await plc.start("127.0.0.1", 0)
    return f"host: {host}, port: {port}", f"{host}:{port} (embedded reference PLC)"


async def _start_broker(
    options: DemoOptions, stack: contextlib.AsyncExitStack
) -> tuple[str, int, str]:
    """(host, port, what it is): --broker, else an embedded one."""
    if options.broker:
        return (*parse_hostport(options.broker, "broker"), "external")
    broker = EmbeddedBroker()
    stack.callback(broker.close)
    stack.push_async_callback(broker.stop)
    await broker.start()
    return broker.host, broker.port, f"{broker.kind}, embedded"


def _start_reader(
    options: DemoOptions, stack: contextlib.AsyncExitStack
) -> tuple[str, NtagSimulator | None]:
    """The config's ``reader:``: simulated, or with --nfc nfcpy on a simulated NTAG (returned)."""
    if not options.nfc:
        return "{type: simulated}", None
    ntag = NtagSimulator()
    stack.callback(ntag.stop)
    return f"{{type: nfc, device: '{ntag.start()}', targets: [106A], poll_interval: 0.02}}", ntag


def _write_config(
    options: DemoOptions, workdir: Path, *, reader: str, machine: str, broker: tuple[str, int]
) -> tuple[AgentConfig, Path]:
    """The station's config file, written and loaded as ``edge-agent run`` would; and the private
    key that signs the demo parts."""
    private_path, public_path = generate_keypair("demo", workdir)
    default_profile = "reference-opcua.yaml" if options.opcua else "reference-plc.yaml"
    profile = options.profile.resolve() if options.profile else find_profile(default_profile)
    config_path = station_config(
        workdir / "demo.yaml",
        gateway_id=GATEWAY,
        station=STATION,
        reader=reader,
        profile=profile,
        machine=machine,
        broker=f"host: {broker[0]}, port: {broker[1]}, reconnect_min: 0.2, reconnect_max: 5",
        trusted_keys={"demo": public_path},
        state_dir=(options.state_dir or workdir / "state").resolve(),
        extra="sparkplug: {enabled: true, group_id: demo}\n" if options.sparkplug else "",
    )
    return load_config(config_path), private_path


def _summary(
    options: DemoOptions, listener: _Subscriber, delivered: bool, ok: int, out: Any
) -> int:
    """Print what came back through the broker; the exit code."""
    received = list(listener.reports.values())
    counts = {s: sum(1 for r in received if r["status"] == s) for s in ("ok", "rejected", "failed")}
    missing = options.parts - len(received)
    summary = f"{counts['ok']} cycles ok, {counts['rejected']} rejected, {counts['failed']} failed"
    # A listener that lost the broker cannot see what was delivered while it was away; the
    # broker's acknowledgement of every report (an empty outbox) is then the proof.
    excused = missing and delivered and listener.interrupted and ok == options.parts
    if excused:
        summary = f"{ok} cycles ok, all acknowledged by the broker ({len(received)} seen by a listener that was disconnected for a while)"
    elif missing or not delivered:
        summary += f" ({missing} reports not received through the broker)"
    print(summary, file=out)
    return 0 if excused or (counts["ok"] == options.parts and not missing) else 1


async def run_demo(options: DemoOptions, out: Any = sys.stdout) -> int:
    # Whatever happens, what was started is stopped, the last first; the directory goes last.
    async with contextlib.AsyncExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edge-agent-demo-")))
        machine, machine_label = await _start_machine(options, workdir, stack)
        broker_host, broker_port, broker_kind = await _start_broker(options, stack)
        reader_yaml, ntag = _start_reader(options, stack)
        config, private_path = _write_config(
            options, workdir, reader=reader_yaml, machine=machine, broker=(broker_host, broker_port)
        )
        print(
            f"edge-agent demo: {options.parts} parts, station {STATION}, machine {machine_label}"
            f", broker {broker_host}:{broker_port} ({broker_kind}), profile {config.profile.name}"
            f" {config.profile.version}",
            file=out,
        )
        reader = None if options.nfc else SimulatedReader()
        listener = _Subscriber(
            broker_host, broker_port, f"{config.broker.topic_prefix}/{GATEWAY}/cycles"
        )
        view = _sparkplug_view(broker_host, broker_port) if options.sparkplug else None
        # --nfc: the config's nfc reader, from the registry
        async with running_station(config, reader=reader) as station:
            delivered, ok = await _feed(options, station, reader, ntag, private_path, out, view)
            for _ in range(200):  # the listener's copies trail the broker's PUBACKs slightly
                if len(listener.reports) >= options.parts:
                    break
                await asyncio.sleep(0.01)
        listener.close()
        if view is not None:
            await asyncio.sleep(0.2)
            for seen in view.take():  # down to the NDEATH of the clean stop
                print(seen, file=out)
            view.close()
        return _summary(options, listener, delivered, ok, out)
