"""Sparkplug B 3.0 edge node: the station as a node (the gateway) with one device (its machine).

On the uplink's MQTT connection, in the ``spBv1.0`` namespace (docs/sparkplug.md):

- NDEATH is the connection's last will, with a ``bdSeq`` that grows with every session; NBIRTH
  (``seq`` 0, the same ``bdSeq``, the node controls) follows each CONNACK, then DBIRTH declaring
  every metric the device will publish, with aliases, datatypes, units and limits;
- DDATA: telemetry as the agent reports it (by exception, the machine's timestamps), every cycle
  under ``Cycle/`` stamped with the cycle's time, station state when it changes; ``seq`` 0-255
  wraps across every message of the session;
- DDEATH when the machine stops answering (telemetry stale), DBIRTH when it answers again;
- NCMD ``Node Control/Rebirth``, ``Reload`` and ``Next Server`` (NDEATH, then the next broker of
  ``broker.uris``); DCMD writes to the machine's points
  through the agent's ``write`` command (its checks, its refusals), ``Station/Paused`` through
  ``pause``/``resume``; every outcome in ``Command/Last Result`` (``sparkplug_commands.py``);
- with a primary host: nothing is born before ``spBv1.0/STATE/<host>`` says online.

Sparkplug messages carry a per-session ``seq``, so they are encoded when they leave and handed
straight to the connection. Cycles must never be lost: each is kept in a store of its own (on
disk with ``state_dir``) until it has been handed over while the node and device are born; a
cycle that waited goes out flagged ``is_historical`` with its own timestamp.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Protocol

import structlog

from ..config_schema import SparkplugConfig
from ..machine.profile import Profile
from ..station.report import CycleReport
from ..uplink.mqtt import ConnectHook, MessageHandler, WillFn
from ..uplink.outbox import Keep, Outbox
from .commands import Commands, handshake_points
from .sparkplug_commands import HostCommands
from .sparkplug_metrics import (
    Catalogue,
    Payload,
    add_metric,
    cycle_values,
    device_catalogue,
    iso_ms,
    load_bd_seq,
    node_catalogue,
    now_ms,
    save_bd_seq,
)

log = structlog.get_logger("sparkplug")

NAMESPACE = "spBv1.0"
STORE_TOPIC = "sparkplug/cycles"


class Link(Protocol):
    """What this module needs of the uplink (``MqttUplink``)."""

    @property
    def connected(self) -> bool: ...

    def publish_now(
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False
    ) -> bool: ...

    def subscribe_absolute(self, topic: str, handler: MessageHandler, *, qos: int = 1) -> str: ...

    def on_connect(self, hook: ConnectHook) -> None: ...

    def set_will(self, will: WillFn) -> None: ...

    def next_server(self) -> None: ...


class Station(Protocol):
    @property
    def profile(self) -> Profile: ...

    def line_status(self) -> dict[str, Any]: ...


class SparkplugNode:
    """``start()`` before the uplink connects; ``mirror()`` each agent message, ``cycle()`` each
    cycle report; ``stop()``."""

    def __init__(
        self,
        config: SparkplugConfig,
        *,
        gateway_id: str,
        station_id: str,
        version: str,
        link: Link,
        station: Station,
        commands: Commands,
        store: Outbox,
        bd_seq_file: Path | None = None,
    ) -> None:
        self.config = config
        self.gateway_id, self.version = gateway_id, version
        self.node_id = config.edge_node_id or gateway_id
        self.device_id = config.device_id or station_id
        self.link, self.station, self.commands, self.store = link, station, commands, store
        # The bdSeq of the last session (-1: none yet); with state_dir it outlives the process,
        # so a host never pairs an old NDEATH with a new NBIRTH.
        self.bd_seq_file = bd_seq_file
        self.bd_seq = load_bd_seq(bd_seq_file)
        self.seq = 0
        self.born = False  # NBIRTH sent on this session
        self.device_born = False
        self.stale: set[str] = set()  # telemetry groups whose reads fail: the machine is away
        self.host_online = config.primary_host_id is None
        self._host_time = 0  # timestamp of the last STATE message taken
        self.node = node_catalogue()
        self._profile_hash = ""
        self.values: dict[str, Any] = {}  # device metric -> latest value, for births
        self.times: dict[str, int] = {}  # device metric -> its timestamp (ms)
        self.device = self._catalogue()
        self.host = HostCommands(self, commands)
        self._watch: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ topics and messages

    def topic(self, kind: str, device: bool = False) -> str:
        base = f"{NAMESPACE}/{self.config.group_id}/{kind}/{self.node_id}"
        return f"{base}/{self.device_id}" if device else base

    def _payload(self, seq: bool = True) -> Any:
        payload = Payload()
        payload.timestamp = now_ms()
        if seq:
            self.seq = (self.seq + 1) % 256
            payload.seq = self.seq
        return payload

    def _send(self, kind: str, payload: Any, *, device: bool = True, qos: int = 0) -> bool:
        return self.link.publish_now(self.topic(kind, device), payload.SerializeToString(), qos=qos)

    @property
    def publishable(self) -> bool:
        return self.born and self.device_born and self.link.connected and self.host_online

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.link.set_will(self._will)
        self.link.subscribe_absolute(self.topic("NCMD"), self.host.on_ncmd)
        self.link.subscribe_absolute(self.topic("DCMD", device=True), self.host.on_dcmd)
        if self.config.primary_host_id is not None:
            state = f"{NAMESPACE}/STATE/{self.config.primary_host_id}"
            self.link.subscribe_absolute(state, self.on_state)
        self.link.on_connect(self.birth)
        self._watch = asyncio.create_task(self._watch_station(), name="sparkplug-station-state")

    def _will(self) -> tuple[str, bytes, int, bool]:
        """Before each connect: a new session, a new bdSeq; nothing is born on it yet."""
        self.bd_seq = (self.bd_seq + 1) % 256
        save_bd_seq(self.bd_seq_file, self.bd_seq)  # before the CONNECT that carries it
        self.born = self.device_born = False
        if self.config.primary_host_id is not None:
            self.host_online = False  # a fresh STATE is awaited on every session
        return self.topic("NDEATH"), self._death().SerializeToString(), 1, False

    def _death(self) -> Any:
        payload = self._payload(seq=False)
        add_metric(payload, self.node.by_name["bdSeq"], self.bd_seq, birth=True)
        return payload

    def birth(self) -> None:
        """NBIRTH (``seq`` 0) and DBIRTH: after each connect, on Rebirth, when the host returns."""
        if not self.link.connected or not self.host_online:
            return
        self._profile_changed()
        payload = self._payload(seq=False)
        self.seq = payload.seq = 0
        node = {
            "bdSeq": self.bd_seq,
            "Node Control/Rebirth": False,
            "Node Control/Reload": False,
            "Node Control/Next Server": False,
            "Node Info/Version": self.version,
            "Node Info/Gateway ID": self.gateway_id,
        }
        for name, value in node.items():
            add_metric(payload, self.node.by_name[name], value, birth=True)
        self.born = self._send("NBIRTH", payload, device=False)
        self.device_born = False
        if self.born:
            log.info("Sparkplug node born", node=self.node_id, bd_seq=self.bd_seq)
            if not self.stale:
                self._device_birth()

    def _device_birth(self) -> None:
        self._station_values()
        payload = self._payload()
        for m in self.device.by_name.values():
            add_metric(
                payload, m, self.values.get(m.name), birth=True, timestamp=self.times.get(m.name)
            )
        self.device_born = self._send("DBIRTH", payload)
        if self.device_born:
            self.flush()

    def _device_death(self) -> None:
        if self.born and self.device_born and self.link.connected:
            self._send("DDEATH", self._payload())
        self.device_born = False

    def rebirth(self) -> None:
        self.born = self.device_born = False
        self.birth()

    async def stop(self, timeout: float = 5.0) -> None:
        """Let the commands in flight finish (bounded), then the NDEATH: a clean disconnect
        sends no will."""
        await self.host.stop(timeout)
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        self._clean_death()

    def _clean_death(self) -> None:
        # A clean DISCONNECT sends no will: the NDEATH goes out first, on the same connection.
        if self.born and self.link.connected:
            self._send("NDEATH", self._death(), device=False, qos=1)
        self.born = self.device_born = False

    def _check_profile(self) -> None:
        """A reload or pushed profile: new metrics, new aliases, announced by a rebirth."""
        if self._profile_changed():
            self.rebirth()

    def _profile_changed(self) -> bool:
        if self.station.profile.content_hash == self._profile_hash:
            return False
        self.device = self._catalogue()
        self.stale.clear()  # the telemetry groups start afresh
        return True

    def _catalogue(self) -> Catalogue:
        profile = self.station.profile
        self._profile_hash = profile.content_hash
        self.values = {
            "Profile/Name": profile.name,
            "Profile/Version": profile.version,
            "Profile/Hash": profile.content_hash,
        }
        self.times = {}
        return device_catalogue(profile, handshake_points(profile))

    # ------------------------------------------------------------------ from the agent

    def mirror(self, suffix: str, payload: dict[str, Any]) -> None:
        """An agent message (topic suffix, payload) as Sparkplug, when it maps. Never raises:
        the JSON report and the cycle that published it go on whatever happens here."""
        try:
            self._mirror(suffix, payload)
        except Exception:
            log.exception("Sparkplug message not sent", suffix=suffix)

    def cycle(self, report: CycleReport) -> None:
        """A cycle report under ``Cycle/``, stored until it is handed over. Never raises."""
        try:
            self._check_profile()
            self._cycle(report)
        except Exception:
            log.exception("Sparkplug cycle not sent", cycle=report.id)

    def _mirror(self, suffix: str, payload: dict[str, Any]) -> None:
        self._check_profile()
        if suffix.startswith("telemetry/"):
            self._telemetry(payload)
        elif suffix == "events" and payload.get("event") == "telemetry_stale":
            self.stale.add(str(payload.get("group")))
            self._device_death()
        elif suffix == "events" and payload.get("event") == "telemetry_recovered":
            self.stale.discard(str(payload.get("group")))
            if not self.stale and self.born and not self.device_born:
                self._device_birth()

    def _telemetry(self, message: dict[str, Any]) -> None:
        ts = iso_ms(message.get("time"))
        group = str(message.get("group"))
        if message.get("quality") == "good" and group in self.stale:
            # Also after telemetry restarted (reload), which reports no recovery event.
            self.stale.discard(group)
            if not self.stale and self.born and not self.device_born:
                self._device_birth()
        values = {f"Machine/{k}": v for k, v in (message.get("values") or {}).items()}
        stale, is_stale = f"Telemetry/{group}/Stale", message.get("quality") != "good"
        if self.values.get(stale) != is_stale:  # sent when it changes
            values[stale] = is_stale
        changed = {}
        for name, value in values.items():
            if name in self.device.by_name:
                self.values[name], self.times[name] = value, ts
                changed[name] = value
        self._data(changed, ts)

    def _data(self, values: dict[str, Any], ts: int | None, historical: bool = False) -> bool:
        if not values or not self.publishable:
            return False
        payload = self._payload()
        for name, value in values.items():
            add_metric(
                payload, self.device.by_name[name], value, timestamp=ts, historical=historical
            )
        return self._send("DDATA", payload)

    def _cycle(self, report: CycleReport) -> None:
        values = {k: v for k, v in cycle_values(report).items() if k in self.device.by_name}
        # Every Cycle/ metric, null when this cycle has none: no value of an earlier cycle remains.
        record = {n: None for n in self.device.by_name if n.startswith("Cycle/")} | values
        held = not self.publishable or len(self.store) > 0
        body = {"time": report.epoch_ms, "values": record, "held": held}
        if self.store.put(STORE_TOPIC, json.dumps(body).encode(), 0, False, Keep.RECORD) is None:
            # Full of cycles the broker has not taken: the JSON report is the record of this one.
            log.error(
                "Sparkplug store full: this cycle is not sent as Sparkplug",
                cycle=report.id,
                held=len(self.store),
            )
        self.flush()

    def flush(self) -> None:
        """Hand over the stored cycles, oldest first, while node and device are born."""
        while self.publishable:
            batch = self.store.oldest(20)
            if not batch:
                return
            for message in batch:
                body = json.loads(message.payload)
                values = {k: v for k, v in body["values"].items() if k in self.device.by_name}
                if values and not self._data(values, body["time"], historical=body["held"]):
                    return  # the connection went: kept for the next birth
                for name, value in values.items():
                    self.values[name], self.times[name] = value, body["time"]
                self.store.ack(message.id)

    def _station_values(self) -> dict[str, Any]:
        status = self.station.line_status()
        now = {
            "Station/Accepting Parts": status.get("accepting_parts"),
            "Station/Paused": status.get("paused"),
            "Station/Cycle Running": status.get("cycle_running"),
            "Station/Backlog": status.get("backlog"),
        }
        changed = {k: v for k, v in now.items() if self.values.get(k, not v) != v}
        ts = now_ms()
        for name in changed:
            self.values[name], self.times[name] = now[name], ts
        return changed

    async def _watch_station(self) -> None:
        # Station state by exception, checked every second; pause/resume answer at once.
        while True:
            await asyncio.sleep(1.0)
            try:
                self._check_profile()
                self._data(self._station_values(), now_ms())
                self.flush()
            except Exception:  # a bug here must not end the watch for good
                log.exception("Sparkplug station state update failed")

    # ------------------------------------------------------------------ from the host

    def on_state(self, topic: str, payload: bytes, properties: Any) -> None:
        """3.0 STATE: ``{"online": bool, "timestamp": ms}`` (retained) from the primary host."""
        try:
            state = json.loads(payload)
            online, stamp = state["online"], int(state.get("timestamp", 0))
        except (ValueError, KeyError, TypeError):
            log.warning("Sparkplug STATE ignored: not {online, timestamp}", topic=topic)
            return
        if not isinstance(online, bool) or stamp < self._host_time:
            return  # an older state than the one acted on
        self._host_time = stamp
        if online and not self.host_online:
            log.info("Sparkplug primary host online", host=self.config.primary_host_id)
            self.host_online = True
            self.rebirth()
        elif not online and self.host_online:
            log.warning(
                "Sparkplug primary host offline: cycles are held until it returns",
                host=self.config.primary_host_id,
            )
            self.host_online = False
            self.born = self.device_born = False

    def command_result(self, text: str, written: dict[str, Any] | None = None) -> None:
        """``Command/Last Result`` as DDATA; after a command that ran (``written``: the points it
        wrote) with those points and the station state."""
        self.values["Command/Last Result"] = text
        done: dict[str, Any] = {}
        if written is not None:
            done = {f"Machine/{k}": v for k, v in written.items()} | self._station_values()
        self._data({**done, "Command/Last Result": text}, now_ms())

    def next_server(self) -> None:
        """NDEATH, then the uplink goes to the next broker."""
        self._clean_death()
        self.link.next_server()
