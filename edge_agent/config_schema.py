"""The config file's schema, validation stage 1: every section's settings and the whole document.

Unknown keys, wrong types and missing keys are reported together, each as
``file:line: key.path: message``; the ``reader:`` section is checked against the settings model of
the reader its ``type`` names (``tag/registry.py``), the ``machine:`` section later, against its
driver's (``config.py``, once the profile says which driver). The outputs' and the uplink's
settings live here, so they import this module and not the loader.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .errors import ConfigError, ConfigProblem
from .tag.reader import ReaderSettings
from .tag.registry import reader_settings
from .yamlfile import Lines, StrictModel, validate

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class TlsConfig(StrictModel):
    ca_file: Path  # CA bundle that signed the broker's certificate
    cert_file: Path | None = None  # client certificate, when the broker asks for one
    key_file: Path | None = None
    verify_hostname: bool = True  # the broker's certificate must name the host we connect to

    @model_validator(mode="after")
    def _key_with_cert(self) -> TlsConfig:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is only used with cert_file (the client certificate)")
        return self


_URI = re.compile(r"^(mqtts?)://(\[[0-9A-Fa-f:.]+\]|[^:/\s\[\]]+)(?::(\d{1,5}))?/?$")


def parse_broker_uri(uri: str) -> tuple[bool, str, int]:
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` -> (tls, host, port)."""
    m = _URI.match(uri)
    if not m:
        raise ValueError(f"'{uri}' is not mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    tls = m.group(1) == "mqtts"
    port = int(m.group(3) or (8883 if tls else 1883))
    if not 1 <= port <= 65535:
        raise ValueError(f"'{uri}': port must be 1-65535")
    return tls, m.group(2).strip("[]"), port


class BrokerConfig(StrictModel):
    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    # Brokers tried in turn (failover); when given, host and port are not used.
    uris: list[str] = []
    client_id: str | None = None  # default: edge-agent-<gateway_id>, unique per gateway
    keepalive: int = Field(30, ge=5, le=3600)
    username: str | None = None
    password: str | None = None
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    tls: TlsConfig | None = None
    # false: the broker keeps our session (subscriptions, commands queued while we were away)
    clean_session: bool = False
    session_expiry: int = Field(86400, ge=0)  # MQTT 5: seconds the broker keeps the session
    topic_prefix: str = "edge"
    inflight: int = Field(20, ge=1, le=1000)  # QoS 1 messages awaiting PUBACK at once
    status_interval: float = Field(60.0, gt=0)  # seconds between refreshes of the retained status
    reconnect_min: float = Field(0.5, gt=0)
    reconnect_max: float = Field(60.0, gt=0)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_number(cls, v: Any) -> Any:
        # YAML reads `protocol: 5` as a number and `5.0` as a float
        return {5: "5", "5.0": "5"}.get(v, v) if not isinstance(v, bool) else v

    @field_validator("uris")
    @classmethod
    def _uris(cls, v: list[str]) -> list[str]:
        schemes = {parse_broker_uri(uri)[0] for uri in v}
        if len(schemes) > 1:
            raise ValueError("use mqtt:// for every broker or mqtts:// for every broker, not both")
        return v

    @model_validator(mode="after")
    def _tls_matches_uris(self) -> BrokerConfig:
        if self.tls is not None and self.uris and not self.use_tls:
            raise ValueError("broker.tls is set but the uris say mqtt://; use mqtts://")
        return self

    @property
    def use_tls(self) -> bool:
        """TLS when a ``tls:`` block is given or the URIs say mqtts:// (then the system's CAs)."""
        if self.uris:
            return parse_broker_uri(self.uris[0])[0]
        return self.tls is not None

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        if self.uris:
            return [parse_broker_uri(uri)[1:] for uri in self.uris]
        return [(self.host, self.port)]

    @field_validator("topic_prefix")
    @classmethod
    def _no_wildcards(cls, v: str) -> str:
        if not v or any(c in v for c in "#+") or v.startswith("/") or v.endswith("/"):
            raise ValueError(
                "must be a plain topic level like 'edge' (no wildcards, no edge slashes)"
            )
        return v


class CycleConfig(StrictModel):
    write_back: bool = True  # write progress onto the tag after each step
    drain_timeout: float = Field(30.0, gt=0)  # at shutdown: how long the cycle in flight may finish


CommandName = Literal[
    "status", "read", "write", "pause", "resume", "reload", "push_profile", "rollback_profile"
]


class CommandsConfig(StrictModel):
    """Commands from the line (docs/line-integration.md). Default: only those that change nothing."""

    allowed: list[CommandName] = [
        "status",
        "read",
    ]
    adjustments: bool = False  # apply the line's retained parameter adjustment set
    # Hardening (docs/line-integration.md, "Limits"): what one message may cost the station.
    max_payload: int = Field(262_144, ge=1024)  # bytes; a larger command is refused too_large
    max_depth: int = Field(32, ge=2, le=1000)  # JSON nesting; deeper is refused malformed
    queue: int = Field(100, ge=1, le=100_000)  # commands waiting their turn; more: busy
    dedup_window: float = Field(600.0, ge=0)  # seconds a correlation_id's reply is remembered
    dedup_size: int = Field(1000, ge=0, le=1_000_000)  # replies remembered at most
    # MQTT 5 response topics answered (topic filters); None: <topic_prefix>/<gateway_id>/reply/#
    response_topics: list[str] | None = None


class OutboxConfig(StrictModel):
    """Bounds of the disk outbox in ``state_dir`` (docs/mqtt.md, Delivery)."""

    max_messages: int = Field(100_000, ge=10)
    max_bytes: int | None = Field(None, ge=10_000)  # payload bytes in all; None: no size limit
    telemetry_max_age: float | None = Field(None, gt=0)  # seconds; older telemetry is dropped


class TelemetryConfig(StrictModel):
    enabled: bool = True  # watch the profile's telemetry groups (docs/line-integration.md)


#: Sparkplug B identifiers: any UTF-8 text without the topic separators and wildcards.
_SPB_ID = r"^[^/+#]+$"


class SparkplugConfig(StrictModel):
    """Be a Sparkplug B 3.0 edge node as well, or instead of the JSON topics (docs/sparkplug.md)."""

    enabled: bool = False
    group_id: str = Field("edge-agent", min_length=1, max_length=255, pattern=_SPB_ID)
    edge_node_id: str | None = Field(None, min_length=1, max_length=255, pattern=_SPB_ID)
    device_id: str | None = Field(None, min_length=1, max_length=255, pattern=_SPB_ID)
    # Births wait for spBv1.0/STATE/<primary_host_id> online; data is held while it is offline.
    primary_host_id: str | None = Field(None, min_length=1, max_length=255, pattern=_SPB_ID)
    # false: cycle reports, telemetry and events go out as Sparkplug only (status and command
    # replies stay on the JSON topics).
    json_topics: bool = True


class ThingsBoardConfig(StrictModel):
    """Speak the ThingsBoard IoT Gateway MQTT API as well (docs/line-integration.md)."""

    enabled: bool = False
    # The device name ThingsBoard shows; default: <gateway_id>-<station>.
    device: str | None = Field(None, min_length=1, max_length=255)
    device_type: str = Field("edge-agent station", min_length=1, max_length=255)
    cycles: bool = True  # cycle reports as device telemetry too
    adjustments_attribute: str | None = "adjustments"  # shared attribute holding an adjustment set


class HealthConfig(StrictModel):
    """The optional HTTP endpoint for /healthz and /metrics (docs/operations.md); off by default."""

    # "PORT" (on 127.0.0.1) or "HOST:PORT"; no authentication: keep it on loopback unless a
    # firewall decides who may scrape it.
    listen: tuple[str, int] | None = None

    @field_validator("listen", mode="before")
    @classmethod
    def _host_port(cls, v: Any) -> Any:
        if v is None or isinstance(v, tuple):
            return v
        host, _, port = str(v).rpartition(":")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"'{v}' is not PORT or HOST:PORT (e.g. 127.0.0.1:9410)")
        return (host.strip("[]") or "127.0.0.1", int(port))


class LogConfig(StrictModel):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class AgentConfigDoc(StrictModel):
    gateway_id: str = Field(min_length=1, max_length=64, pattern=_ID)
    station: str = Field(min_length=1, max_length=8, pattern=_ID)
    reader: dict[str, Any]  # the reader's own SETTINGS_MODEL (tag/registry.py), see validate_doc
    machine: dict[str, Any]
    broker: BrokerConfig = BrokerConfig()
    trusted_keys: dict[str, Path] = Field(min_length=1)
    # Who may certify firmware profiles: a trust list of its own, never the travelers' keys.
    profile_keys: dict[str, Path] = {}
    cycle: CycleConfig = CycleConfig()
    commands: CommandsConfig = CommandsConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    thingsboard: ThingsBoardConfig = ThingsBoardConfig()
    sparkplug: SparkplugConfig = SparkplugConfig()
    state_dir: Path | None = None  # the disk outbox lives here; without it, in memory only
    outbox: OutboxConfig = OutboxConfig()
    log: LogConfig = LogConfig()
    health: HealthConfig = HealthConfig()

    @field_validator("trusted_keys", "profile_keys")
    @classmethod
    def _key_ids(cls, v: dict[str, Path]) -> dict[str, Path]:
        for key_id in v:
            if not re.match(r"^[A-Za-z0-9_.\-]{1,16}$", key_id):
                raise ValueError(f"key id '{key_id}' must be 1-16 characters of A-Z a-z 0-9 _ . -")
        return v


def validate_doc(
    data: dict[str, Any], file: str, lines: Lines
) -> tuple[AgentConfigDoc, ReaderSettings]:
    """Stage 1: the schema of this module, and the ``reader:`` section against the settings model
    of the reader its ``type`` names; every problem together, in the order of the keys."""
    problems: list[ConfigProblem] = []
    doc = reader = None
    try:
        doc = validate(AgentConfigDoc, data, file, lines)
    except ConfigError as err:
        problems.extend(err.problems)
    if isinstance(data.get("reader"), dict):
        try:
            reader = reader_settings(data["reader"], file, lines)
        except ConfigError as err:
            problems.extend(err.problems)
    if problems or doc is None or reader is None:
        keys = list(AgentConfigDoc.model_fields)

        def rank(p: ConfigProblem) -> int:
            key = re.split(r"[.\[]", p.path)[0]
            return keys.index(key) if key in keys else len(keys)  # unknown keys last, as pydantic

        raise ConfigError(sorted(problems, key=rank))
    return doc, reader
