"""The agent's configuration: one YAML file, validated completely before any device is touched.

One validator: ``check-config``, ``run``, ``reload`` (MQTT and SIGHUP) and ``push_profile`` all call
the functions of this module, so whatever one of them refuses, ``check-config`` refuses first.
Validation runs in stages (every problem in a stage is reported together, each as
``file:line: key.path: message``):
  1. the schema of this module (unknown keys, wrong types, missing keys), with the ``reader:``
     section against the settings model of the reader its ``type`` names (``tag/registry.py``),
  2. the firmware profile the machine section names (``machine/profile.py``), and the ``machine:``
     section against the settings model of that profile's driver,
  3. the driver's own rules: it encodes every constant the profile supplies (program numbers,
     handshake values, parameter defaults) with these settings; no I/O (``machine_for``),
  4. the files the config names: trusted keys are Ed25519 PEM public keys, the broker's TLS files
     load, ``state_dir`` and the tag directory are directories the agent can create and write; a
     profile's detached signature (``<profile>.sig``), when present or required, verifies with a
     key of ``profile_keys``.
``statedir.py`` adds the last stage, for ``run`` and ``check-config``: no other agent holds the
state directory and its outbox opens. Relative paths are relative to the file's own directory.
"""

from __future__ import annotations

import os
import re
import ssl
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError, ConfigProblem
from .instructions.signing import KeyRing
from .machine import registry
from .machine.driver import MachineDriver
from .machine.profile import Profile, load_profile
from .machine.profile_signature import ProfileRefused, signature_path, verify_profile
from .tag.reader import ReaderSettings
from .tag.registry import reader_settings
from .yamlfile import Lines, load_yaml, problems_from_validation, validate

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Strict):
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


#: Sparkplug B identifiers: any UTF-8 text without the topic separators and wildcards.
_SPB_ID = r"^[^/+#]+$"


class SparkplugConfig(_Strict):
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


class ThingsBoardConfig(_Strict):
    """Speak the ThingsBoard IoT Gateway MQTT API as well (docs/line-integration.md)."""

    enabled: bool = False
    # The device name ThingsBoard shows; default: <gateway_id>-<station>.
    device: str | None = Field(None, min_length=1, max_length=255)
    device_type: str = Field("edge-agent station", min_length=1, max_length=255)
    cycles: bool = True  # cycle reports as device telemetry too
    adjustments_attribute: str | None = "adjustments"  # shared attribute holding an adjustment set


class HealthConfig(_Strict):
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


class LogConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class AgentConfigDoc(_Strict):
    gateway_id: str = Field(min_length=1, max_length=64, pattern=_ID)
    station: str = Field(min_length=1, max_length=8, pattern=_ID)
    reader: dict[str, Any]  # the reader's own SETTINGS_MODEL (tag/registry.py), see _schema
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


#: Sections a reload does not apply (identity, links and files opened once at start): a change
#: is reported as ``restart_required``.
NEEDS_RESTART = (
    "gateway_id",
    "station",
    "reader",
    "broker",
    "log",
    "thingsboard",
    "sparkplug",
    "health",
    "state_dir",
    "outbox",
)


@dataclass(frozen=True)
class AgentConfig:
    """A validated config with its profile loaded and paths resolved."""

    source: str
    gateway_id: str
    station: str
    reader: ReaderSettings  # the reader's SETTINGS_MODEL instance
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
    sparkplug: SparkplugConfig = field(default_factory=SparkplugConfig)
    thingsboard: ThingsBoardConfig = field(default_factory=ThingsBoardConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    profile_keys: dict[str, Path] = field(default_factory=dict)
    require_signed_profile: bool = False  # machine.require_signed_profile
    lines: Lines = field(default_factory=dict, compare=False, repr=False)  # key path -> line

    def problem(self, path: tuple[str, ...], message: str) -> ConfigProblem:
        """A problem at ``path`` of this config file, with its line."""
        return ConfigProblem(self.source, self.lines.get(path), ".".join(path), message)

    @property
    def client_id(self) -> str:
        return self.broker.client_id or f"edge-agent-{self.gateway_id}"


def load_config(path: str | Path, *, profile_override: str | Path | None = None) -> AgentConfig:
    """Load, validate and resolve a config file. Raises ConfigError naming file, line and key."""
    file = str(path)
    data, lines = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(file, 1, "", "a config file is a mapping of keys")])
    doc, reader = _schema(_expand_env(data, file, lines), file, lines)
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
        settings = {k: v for k, v in doc.machine.items() if k not in _MACHINE_KEYS}
        try:
            machine = _resolve_paths(settings_model.model_validate(settings), base)
        except ValidationError as err:
            problems.extend(problems_from_validation(err, file, lines, ("machine",)))
    if profile is not None and machine is not None:
        try:
            machine_for(profile, machine)
        except ConfigError as err:
            problems.extend(err.problems)

    def problem(path: tuple[str, ...], message: str | None) -> None:
        if message is not None:
            problems.append(ConfigProblem(file, lines.get(path), ".".join(path), message))

    keys = {}
    for key_id, key_path in doc.trusted_keys.items():
        keys[key_id] = resolved = _resolve(base, key_path)
        problem(("trusted_keys", key_id), _public_key_problem(resolved))
    profile_keys = {}
    for key_id, key_path in doc.profile_keys.items():
        profile_keys[key_id] = resolved = _resolve(base, key_path)
        problem(("profile_keys", key_id), _public_key_problem(resolved))
    require_signed = doc.machine.get("require_signed_profile", False)
    if not isinstance(require_signed, bool):
        problem(("machine", "require_signed_profile"), "must be true or false")
    elif profile is not None and not problems:
        problem(("machine", "profile"), _signature_problem(profile, profile_keys, require_signed))

    reader = _resolve_paths(reader, base)
    directory = getattr(reader, "directory", None)  # tags as files (simulated): written into
    if isinstance(directory, Path):
        problem(("reader", "directory"), _directory_problem(directory))

    broker = doc.broker
    if broker.tls is not None:
        tls_paths = {}
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(broker.tls, name)
            if value is not None:
                tls_paths[name] = _resolve(base, value)
        tls = broker.tls.model_copy(update=tls_paths)
        broker = broker.model_copy(update={"tls": tls})
        for name, message in _tls_problems(tls):
            problem(("broker", "tls", name), message)

    state_dir = _resolve(base, doc.state_dir) if doc.state_dir is not None else None
    if state_dir is not None:
        problem(("state_dir",), _directory_problem(state_dir))

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
        sparkplug=doc.sparkplug,
        log=doc.log,
        commands=doc.commands,
        telemetry=doc.telemetry,
        state_dir=state_dir,
        outbox=doc.outbox,
        thingsboard=doc.thingsboard,
        health=doc.health,
        profile_keys=profile_keys,
        require_signed_profile=require_signed is True,
        lines=lines,
    )


def _schema(data: dict[str, Any], file: str, lines: Lines) -> tuple[AgentConfigDoc, ReaderSettings]:
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


def machine_for(profile: Profile, settings: Any, *, text: str | None = None) -> MachineDriver:
    """Stage 3: the driver of ``profile`` with these ``machine:`` settings, not connected.

    Creating it encodes every constant the profile supplies, so a program number outside its
    point's limits or a default outside the envelope is refused here, with its line, and not at
    the first part. ``text``: the profile's YAML when it is not a file (a pushed profile).
    """
    try:
        return registry.driver_module(profile.driver).create(settings, profile)  # type: ignore[no-any-return]
    except ConfigError as err:
        raise ConfigError(locate(err.problems, profile.source, text)) from err


def profile_for(profile: Profile, config: AgentConfig, *, text: str | None = None) -> MachineDriver:
    """The checks ``check-config`` runs on a config's profile, for another profile on the same
    machine (``push_profile``): the same driver, and stage 3. Returns the driver for it."""
    current = config.profile.driver
    if profile.driver != current:
        lines = _lines_of(profile.source, text)
        raise ConfigError(
            [
                ConfigProblem(
                    profile.source,
                    lines.get(("driver",)),
                    "driver",
                    f"'{profile.driver}' differs from the machine's driver '{current}': "
                    "a new machine needs a new config, not a pushed profile",
                )
            ]
        )
    return machine_for(profile, config.machine, text=text)


def _lines_of(file: str, text: str | None) -> Lines:
    try:
        return load_yaml(file, text)[1]
    except ConfigError:
        return {}


_KEY_PART = re.compile(r"\[(\d+)\]|([^.\[\]]+)")


def locate(problems: list[ConfigProblem], file: str, text: str | None) -> list[ConfigProblem]:
    """Give the problems in ``file`` that were found after parsing (``operations.drill.program``)
    the line of their key. ``text``: the file's YAML when it is not on disk."""
    if all(p.line is not None or p.file != file for p in problems):
        return problems
    lines = _lines_of(file, text)
    out = []
    for p in problems:
        if p.line is None and p.file == file:
            path: tuple[str | int, ...] = tuple(
                int(index) if index else key for index, key in _KEY_PART.findall(p.path)
            )
            while path and path not in lines:
                path = path[:-1]
            p = replace(p, line=lines.get(path))
        out.append(p)
    return out


#: Keys of the ``machine:`` section that are the agent's, not the driver's.
_MACHINE_KEYS = ("profile", "require_signed_profile")


def profile_keyring(config: AgentConfig) -> KeyRing:
    """The keys that may certify this station's firmware profiles (loaded: stage 4 checked them)."""
    return KeyRing.from_files({k: str(p) for k, p in config.profile_keys.items()})


def _signature_problem(profile: Profile, keys: dict[str, Path], required: bool) -> str | None:
    """Verify the on-disk profile's ``.sig`` and record what it vouches for on ``profile``.

    An unsigned profile is a problem only when signatures are required (the agent then warns
    at start); a signature that is present must always verify.
    """
    sig_path = signature_path(profile.source)
    if not sig_path.exists():
        return f"{profile.source} is not signed (no {sig_path.name})" if required else None
    try:
        profile.signature = verify_profile(
            Path(profile.source).read_bytes(),
            sig_path.read_bytes(),
            KeyRing.from_files({k: str(p) for k, p in keys.items()}),
            name=profile.name,
            version=profile.version,
            origin=sig_path.name,
        )
    except ProfileRefused as err:
        return f"signature refused: {err}"
    except OSError as err:
        return f"{err.filename}: cannot read: {err.strerror}"
    return None


def _public_key_problem(path: Path) -> str | None:
    """Why the agent could not load ``path`` as a trusted key (None: it can)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    if not path.exists():
        return f"no such file: {path}"
    if path.is_dir():
        return f"{path} is a directory, not a key file"
    if not path.is_file():
        return f"{path} is not a regular file"
    try:
        data = path.read_bytes()
    except OSError as err:
        return f"cannot read {path}: {err.strerror}"
    if b"PRIVATE KEY-----" in data:
        return f"{path} is a private key: a station needs only the public key (the .pub file)"
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return (
            f"{path} is not a PEM public key (a '-----BEGIN PUBLIC KEY-----' block, "
            "as 'edge-agent tag keygen' writes)"
        )
    if not isinstance(key, Ed25519PublicKey):
        kind = type(key).__name__.lstrip("_").removesuffix("PublicKey")
        kind = {"EllipticCurve": "EC"}.get(kind, kind)
        return f"{path} holds a key of type {kind}; travelers are signed with Ed25519"
    return None


def _directory_problem(path: Path) -> str | None:
    """Why the agent could not create ``path`` or write in it (None: it can).

    Tried, not guessed from permission bits: a file is created and removed in it, or, when it does
    not exist yet, a directory in its nearest existing parent. Nothing is left behind.
    """
    if path.exists():
        if not path.is_dir():
            return f"{path} exists and is not a directory"
        try:
            with tempfile.TemporaryFile(dir=path, prefix=".edge-agent-check-"):
                pass
        except OSError as err:
            return f"cannot write in {path}: {err.strerror}"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create {path}: {parent} is not a directory"
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".edge-agent-check-"))
    except OSError as err:
        return f"cannot create {path}: {err.strerror} (in {parent})"
    return None


def _tls_problems(tls: TlsConfig) -> list[tuple[str, str]]:
    """The broker's TLS files, loaded as the uplink loads them (``ssl``), so a bad one is named
    here and not in a traceback at start."""
    problems = []
    for name in ("ca_file", "cert_file", "key_file"):
        value = getattr(tls, name)
        if value is not None and not value.is_file():
            what = "is a directory" if value.is_dir() else "no such file"
            problems.append((name, f"{what}: {value}"))
    if problems:
        return problems
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(tls.ca_file))
    except (ssl.SSLError, OSError) as err:
        problems.append(("ca_file", f"{tls.ca_file} is not a PEM certificate bundle ({_why(err)})"))
    if tls.cert_file is not None:
        try:
            # An encrypted key would make OpenSSL prompt on the terminal: refuse it instead.
            context.load_cert_chain(str(tls.cert_file), tls.key_file and str(tls.key_file), b"")
        except (ssl.SSLError, OSError) as err:
            problems.append(
                ("cert_file", f"{tls.cert_file} and its key do not load together ({_why(err)})")
            )
    return problems


def _why(err: Exception) -> str:
    reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or str(err)
    return str(reason).replace("_", " ").lower()


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
