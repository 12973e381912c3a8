"""Where the agent's messages go: every output gets each one and decides what it sends.

A cycle report comes as the typed ``CycleReport`` (``station/report.py``); every other agent
message (``events``, ``telemetry/<group>``, ``status``, ``reply/<id>``) as a topic suffix and a
JSON payload. The outputs: the JSON topics on the uplink (the line's contract, and the outbox that
keeps them), the cycle metrics, a Sparkplug B node and ThingsBoard's gateway API, the last two on
the same connection; each chooses its topic, retention and encoding. A cycle report committed
ahead (write-ahead, into the JSON topics' outbox) comes through once, when it is final, with
``release``: the JSON output then replaces the held copy, and the metrics count the report once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from .. import __version__, messages
from ..config import AgentConfig
from ..station.report import CycleReport, IfStopped
from ..uplink.mqtt import MqttUplink
from ..uplink.outbox import Keep, MemoryOutbox, Outbox, Payload
from .commands import Commands
from .thingsboard import AdjustmentSink, ThingsBoard

if TYPE_CHECKING:
    from .sparkplug import SparkplugNode, Station

log = structlog.get_logger("agent")


class Output(Protocol):
    def send(self, suffix: str, payload: dict[str, Any], qos: int) -> None: ...

    def cycle(self, report: CycleReport, release: bool) -> None: ...


class JsonLink(Protocol):
    def publish(self, suffix: str, payload: dict[str, Any], *, qos: int = 1) -> object: ...

    def publish_encoded(
        self, suffix: str, payload: Payload, *, keep: Keep, release: str | None = None
    ) -> object: ...

    def hold(self, suffix: str, key: str, payload: bytes) -> None: ...

    def unhold(self, key: str) -> None: ...


class Mirrored(Protocol):
    def mirror(self, suffix: str, payload: dict[str, Any]) -> None: ...

    def cycle(self, report: CycleReport) -> None: ...


#: The JSON topic of cycle reports.
CYCLES = "cycles"


@dataclass(frozen=True)
class JsonTopics:
    """The JSON topics; with ``only_own`` (Sparkplug in their place) just status and replies."""

    link: JsonLink
    only_own: bool = False

    def send(self, suffix: str, payload: dict[str, Any], qos: int) -> None:
        if self.only_own and suffix != "status" and not suffix.startswith("reply/"):
            return
        self.link.publish(suffix, payload, qos=qos)

    def cycle(self, report: CycleReport, release: bool) -> None:
        if self.only_own:
            if release:  # held here all the same (write-ahead): dropped, or it stays forever
                self.link.unhold(report.id)
            return
        body = report.to_json()  # encoded once; the outbox adds its seq
        self.link.publish_encoded(
            CYCLES,
            lambda seq: b'%s,"seq":%d}' % (body[:-1], seq),
            keep=Keep.RECORD,  # never dropped
            release=report.id if release else None,
        )

    def hold(self, report: CycleReport, stopped: IfStopped) -> None:
        """Write ahead: the report as ``stopped`` says, stored unsent until its release."""
        self.link.hold(CYCLES, report.id, report.to_json(stopped=stopped))


@dataclass(frozen=True)
class CycleCounts:
    """Each cycle report, counted once: a held one is not sent here, its release is."""

    observe: Callable[[CycleReport], None]

    def send(self, suffix: str, payload: dict[str, Any], qos: int) -> None:
        pass

    def cycle(self, report: CycleReport, release: bool) -> None:
        self.observe(report)


@dataclass(frozen=True)
class Mirror:
    """An output in another API (Sparkplug, ThingsBoard): it maps what it can."""

    target: Mirrored

    def send(self, suffix: str, payload: dict[str, Any], qos: int) -> None:
        self.target.mirror(suffix, payload)

    def cycle(self, report: CycleReport, release: bool) -> None:
        self.target.cycle(report)


class Outputs:
    """All outputs, in order; ``publish`` and ``cycle`` are the agent's one way out."""

    def __init__(self, outputs: list[Output]) -> None:
        self.outputs = outputs

    def publish(self, suffix: str, payload: dict[str, Any], qos: int) -> None:
        for output in self.outputs:
            output.send(suffix, payload, qos)

    def cycle(self, report: CycleReport, *, release: bool = False) -> None:
        """A final cycle report; ``release``: it replaces the copy held ahead."""
        for output in self.outputs:
            output.cycle(report, release)


def open_outbox(config: AgentConfig, alarm: DropAlarm) -> Outbox:
    """Where the JSON topics wait for the broker: on disk in the state directory if there is one."""
    if config.state_dir is None:
        log.warning("no state_dir: the outbox is in memory and lost if the agent stops")
        return MemoryOutbox(config.outbox.max_messages)
    from ..uplink.outbox_sqlite import SqliteOutbox  # sqlite3 is loaded only when used

    return SqliteOutbox(
        config.state_dir / "outbox.sqlite3",
        max_messages=config.outbox.max_messages,
        max_bytes=config.outbox.max_bytes,
        telemetry_max_age=config.outbox.telemetry_max_age,
        on_drop=alarm,
    )


class DropAlarm:
    """Messages the full outbox dropped, told to the line as an ``outbox_dropped`` event."""

    def __init__(self, gateway_id: str, link: Callable[[], MqttUplink]) -> None:
        self.gateway_id, self._link = gateway_id, link
        self._alarm_at = 0.0  # last outbox_dropped event
        self._dropped = 0  # messages dropped since that event

    def __call__(self, count: int, keep: Keep) -> None:
        # One event a minute at most: the event itself goes through the full outbox.
        self._dropped += count
        now = time.time()
        if now - self._alarm_at < 60:
            return
        self._alarm_at, dropped, self._dropped = now, self._dropped, 0
        link = self._link()
        fields = {"dropped": dropped, "class": keep.name.lower(), "backlog": link.backlog}
        link.publish("events", messages.event(self.gateway_id, "outbox_dropped", at=now, **fields))


async def room_for_reports(link: MqttUplink, tag: str) -> None:
    """Only cycle reports left and the outbox at its limit: take no part rather than lose one."""
    if not link.outbox.full:
        return
    log.error(
        "outbox full of cycle reports: not accepting parts until the broker takes them",
        tag=tag,
        backlog=link.backlog,
        oldest_age_s=link.oldest_age,
    )
    link.refresh_status()  # accepting_parts: false
    await link.wait_outbox_room()
    log.info("outbox has room again: accepting parts", backlog=link.backlog)
    link.refresh_status()


def thingsboard(
    config: AgentConfig, link: MqttUplink, commands: Commands, adjustments: AdjustmentSink | None
) -> ThingsBoard | None:
    """ThingsBoard's gateway API, if the config turns it on."""
    tb = config.thingsboard
    if not tb.enabled:
        return None
    device = tb.device or f"{config.gateway_id}-{config.station}"
    return ThingsBoard(tb, device=device, link=link, commands=commands, adjustments=adjustments)


def sparkplug(
    config: AgentConfig, link: MqttUplink, station: Station, commands: Commands
) -> SparkplugNode | None:
    """A Sparkplug B edge node, if the config turns it on; its store beside the outbox."""
    if not config.sparkplug.enabled:
        return None
    from .sparkplug import SparkplugNode  # protobuf is loaded only when used

    store: Outbox = MemoryOutbox()
    bd_seq_file = None
    if config.state_dir is not None:
        from ..uplink.outbox_sqlite import SqliteOutbox

        store = SqliteOutbox(config.state_dir / "sparkplug.sqlite3")
        bd_seq_file = config.state_dir / "sparkplug-bdseq"
    return SparkplugNode(
        config.sparkplug,
        gateway_id=config.gateway_id,
        station_id=config.station,
        version=__version__,
        link=link,
        station=station,
        commands=commands,
        store=store,
        bd_seq_file=bd_seq_file,
    )
