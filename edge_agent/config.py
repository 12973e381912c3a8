"""The agent's configuration: one YAML file, validated completely before any device is touched.

Validation runs in stages (every problem in a stage is reported together):
  1. the schema of this module (unknown keys, wrong types, missing keys),
  2. the firmware profile the machine section names, and the ``machine:`` section against the
     settings model of that profile's driver,
  3. whole-config checks: trusted key files readable, paths exist.
Relative paths in the file are relative to the file's own directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError, ConfigProblem
from .machine import registry
from .machine.profile import Profile, load_profile
from .yamlfile import Lines, load_yaml, problems_from_validation, validate

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _ReaderConfig(_Strict):
    # A tag taken away and presented again: next_step (the cycle decides) or ignore it within
    # return_window seconds of leaving (0: until another tag came); docs/readers.md.
    on_return: Literal["next_step", "ignore"] = "next_step"
    return_window: float = Field(0.0, ge=0, le=86400)


class SimulatedReaderConfig(_ReaderConfig):
    """Tags are files ``<UID-hex>.ndef`` in a directory: a file appearing is a tag arriving."""

    type: Literal["simulated"]
    name: str = "sim"
    directory: Path | None = None
    poll_interval: float = Field(0.2, gt=0, le=10)


class NfcReaderConfig(_ReaderConfig):
    """An NFC reader through nfcpy; ``device`` as nfcpy takes it (docs/readers.md)."""

    type: Literal["nfc"]
    name: str = "nfc"
    device: str = Field("usb", pattern=r"^(usb|tty|com|udp)(:.*)?$")  # usb:VID:PID, tty:USB0:pn532
    targets: list[Literal["106A", "106B", "212F", "424F"]] = Field(
        default=["106A", "106B", "212F"], min_length=1
    )
    poll_interval: float = Field(0.1, gt=0, le=5)  # between senses, and presence checks
    backoff_max: float = Field(30.0, gt=0, le=600)  # longest wait between attempts to open it
    # NTAG21x password of protected tags: PWD (4 bytes) + PACK (2 bytes) in hex; use ${ENV}.
    password: str | None = Field(None, pattern=r"^[0-9A-Fa-f]{12}$")


class AutoIdReaderConfig(_ReaderConfig):
    """An RFID reader behind OPC UA (OPC 30010 AutoID); docs/readers.md."""

    type: Literal["autoid"]
    name: str = "autoid"
    url: str = Field(pattern=r"^opc\.tcp://")
    region: int = Field(3, ge=0, le=65535)  # memory region holding the NDEF message (3: USER)
    timeout: float = Field(4.0, gt=0, le=60)
    backoff_max: float = Field(30.0, gt=0, le=600)


ReaderConfig = Annotated[
    SimulatedReaderConfig | NfcReaderConfig | AutoIdReaderConfig, Field(discriminator="type")
]


class TlsConfig(_Strict):
    ca_file: Path  # CA bundle that signed the broker's certificate
    cert_file: Path | None = None  # client certificate, when the broker asks for one
    key_file: Path | None = None
    verify_hostname: bool = True  # the broker's certificate must name the host we connect to


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


class BrokerConfig(_Strict):
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


class CycleConfig(_Strict):
    write_back: bool = True  # write progress onto the tag after each step
    drain_timeout: float = Field(30.0, gt=0)  # at shutdown: how long the cycle in flight may finish


CommandName = Literal[
    "status", "read", "write", "pause", "resume", "reload", "push_profile", "rollback_profile"
]


class CommandsConfig(_Strict):
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


class OutboxConfig(_Strict):
    """Bounds of the disk outbox in ``state_dir`` (docs/mqtt.md, Delivery)."""

    max_messages: int = Field(100_000, ge=10)
    max_bytes: int | None = Field(None, ge=10_000)  # payload bytes in all; None: no size limit
    telemetry_max_age: float | None = Field(None, gt=0)  # seconds; older telemetry is dropped


class TelemetryConfig(_Strict):
    enabled: bool = True  # watch the profile's telemetry groups (docs/line-integration.md)


class ThingsBoardConfig(_Strict):
    """Speak the ThingsBoard IoT Gateway MQTT API as well (docs/line-integration.md)."""

    enabled: bool = False
    # The device name ThingsBoard shows; default: <gateway_id>-<station>.
    device: str | None = Field(None, min_length=1, max_length=255)
    device_type: str = Field("edge-agent station", min_length=1, max_length=255)
    cycles: bool = True  # cycle reports as device telemetry too
    adjustments_attribute: str | None = "adjustments"  # shared attribute holding an adjustment set


class LogConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class AgentConfigDoc(_Strict):
    gateway_id: str = Field(min_length=1, max_length=64, pattern=_ID)
    station: str = Field(min_length=1, max_length=8, pattern=_ID)
    reader: ReaderConfig
    machine: dict[str, Any]
    broker: BrokerConfig = BrokerConfig()
    trusted_keys: dict[str, Path] = Field(min_length=1)
    cycle: CycleConfig = CycleConfig()
    commands: CommandsConfig = CommandsConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    thingsboard: ThingsBoardConfig = ThingsBoardConfig()
    state_dir: Path | None = None  # the disk outbox lives here; without it, in memory only
    outbox: OutboxConfig = OutboxConfig()
    log: LogConfig = LogConfig()

    @field_validator("trusted_keys")
    @classmethod
    def _key_ids(cls, v: dict[str, Path]) -> dict[str, Path]:
        for key_id in v:
            if not re.match(r"^[A-Za-z0-9_.\-]{1,16}$", key_id):
                raise ValueError(f"key id '{key_id}' must be 1-16 characters of A-Z a-z 0-9 _ . -")
        return v


@dataclass(frozen=True)
class AgentConfig:
    """A validated config with its profile loaded and paths resolved."""

    source: str
    gateway_id: str
    station: str
    reader: SimulatedReaderConfig | NfcReaderConfig | AutoIdReaderConfig
    machine: Any  # the driver's SETTINGS_MODEL instance
    profile: Profile
    broker: BrokerConfig
    trusted_keys: dict[str, Path]
    cycle: CycleConfig
    log: LogConfig
    commands: CommandsConfig
    state_dir: Path | None = None
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    thingsboard: ThingsBoardConfig = field(default_factory=ThingsBoardConfig)

    @property
    def client_id(self) -> str:
        return self.broker.client_id or f"edge-agent-{self.gateway_id}"


def load_config(path: str | Path, *, profile_override: str | Path | None = None) -> AgentConfig:
    """Load, validate and resolve a config file. Raises ConfigError naming file, line and key."""
    file = str(path)
    data, lines = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(file, 1, "", "a config file is a mapping of keys")])
    doc = validate(AgentConfigDoc, _expand_env(data, file, lines), file, lines)
    base = Path(path).resolve().parent
    problems: list[ConfigProblem] = []

    profile_path = profile_override or doc.machine.get("profile")
    profile: Profile | None = None
    if not profile_path:
        problems.append(
            ConfigProblem(
                file, lines.get(("machine",)), "machine.profile", "required key is missing"
            )
        )
    else:
        try:
            profile = load_profile(_resolve(base, Path(str(profile_path))))
        except ConfigError as err:
            problems.extend(err.problems)

    machine: Any = None
    if profile is not None:
        settings_model = registry.driver_module(profile.driver).SETTINGS_MODEL
        settings = {k: v for k, v in doc.machine.items() if k != "profile"}
        try:
            machine = _resolve_paths(settings_model.model_validate(settings), base)
        except ValidationError as err:
            problems.extend(problems_from_validation(err, file, lines, ("machine",)))

    keys = {}
    for key_id, key_path in doc.trusted_keys.items():
        resolved = _resolve(base, key_path)
        if not resolved.is_file():
            problems.append(
                ConfigProblem(
                    file,
                    lines.get(("trusted_keys", key_id)),
                    f"trusted_keys.{key_id}",
                    f"no such file: {resolved}",
                )
            )
        keys[key_id] = resolved

    reader = doc.reader
    if isinstance(reader, SimulatedReaderConfig) and reader.directory is not None:
        reader = reader.model_copy(update={"directory": _resolve(base, reader.directory)})

    broker = doc.broker
    if broker.tls is not None:
        tls_paths = {}
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(broker.tls, name)
            if value is None:
                continue
            tls_paths[name] = resolved = _resolve(base, value)
            if not resolved.is_file():
                problems.append(
                    ConfigProblem(
                        file,
                        lines.get(("broker", "tls", name)),
                        f"broker.tls.{name}",
                        f"no such file: {resolved}",
                    )
                )
        broker = broker.model_copy(update={"tls": broker.tls.model_copy(update=tls_paths)})

    if problems or profile is None:
        raise ConfigError(problems)
    return AgentConfig(
        source=file,
        gateway_id=doc.gateway_id,
        station=doc.station,
        reader=reader,
        machine=machine,
        profile=profile,
        broker=broker,
        trusted_keys=keys,
        cycle=doc.cycle,
        log=doc.log,
        commands=doc.commands,
        telemetry=doc.telemetry,
        state_dir=_resolve(base, doc.state_dir) if doc.state_dir is not None else None,
        outbox=doc.outbox,
        thingsboard=doc.thingsboard,
    )


def _resolve_paths(model: BaseModel, base: Path) -> Any:
    """Make every path the file gives (certificates, keys, ...) relative to the file's directory,
    at any depth of a driver's settings. Defaults are left as the driver chose them."""
    update: dict[str, Any] = {}
    for name in model.model_fields_set:
        value = getattr(model, name)
        if isinstance(value, Path):
            update[name] = _resolve(base, value)
        elif isinstance(value, BaseModel):
            update[name] = _resolve_paths(value, base)
    return model.model_copy(update=update) if update else model


def _resolve(base: Path, path: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base / path


_ENV = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)\}")


def _expand_env(data: Any, file: str, lines: Lines, path: tuple[str | int, ...] = ()) -> Any:
    """Replace ``${NAME}`` in string values: secrets (broker password) stay out of the file."""
    if isinstance(data, dict):
        return {k: _expand_env(v, file, lines, (*path, k)) for k, v in data.items()}
    if isinstance(data, list):
        return [_expand_env(v, file, lines, (*path, i)) for i, v in enumerate(data)]
    if isinstance(data, str) and "${" in data:

        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in os.environ:
                dotted = ".".join(str(p) for p in path)
                raise ConfigError(
                    [
                        ConfigProblem(
                            file,
                            lines.get(path),
                            dotted,
                            f"environment variable {m.group(1)} is not set",
                        )
                    ]
                )
            return os.environ[m.group(1)]

        return _ENV.sub(sub, data)
    return data
