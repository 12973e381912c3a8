"""The agent's configuration: one YAML file, validated completely before any device is touched.

One validator: ``check-config``, ``run``, ``reload`` (MQTT and SIGHUP) and ``push_profile`` all call
the functions of this module, so whatever one of them refuses, ``check-config`` refuses first.
Validation runs in stages (every problem in a stage is reported together, each as
``file:line: key.path: message``):
  1. the schema (``config_schema.py``: unknown keys, wrong types, missing keys), with the
     ``reader:`` section against the settings model of the reader its ``type`` names,
  2. the firmware profile the machine section names (``machine/profile.py``), and the ``machine:``
     section against the settings model of that profile's driver,
  3. the driver's own rules: it encodes every constant the profile supplies (program numbers,
     handshake values, parameter defaults) with these settings; no I/O (``machine_for``),
  4. the files the config names (``config_files.py``): trusted keys, the broker's TLS files,
     ``state_dir`` and the tag directory, the profile's signature.
``statedir.py`` adds the last stage, for ``run`` and ``check-config``: no other agent holds the
state directory and its outbox opens. Relative paths are relative to the file's own directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .config_files import Findings, check_files, keyring, resolve, resolve_paths
from .config_schema import (
    BrokerConfig,
    CommandsConfig,
    CycleConfig,
    HealthConfig,
    LogConfig,
    OutboxConfig,
    SparkplugConfig,
    TelemetryConfig,
    ThingsBoardConfig,
    validate_doc,
)
from .errors import ConfigError, ConfigProblem
from .instructions.signing import KeyRing
from .machine import registry
from .machine.driver import MachineDriver
from .machine.profile import Profile, load_profile
from .tag.reader import ReaderSettings
from .yamlfile import Lines, load_yaml, problems_from_validation

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
    doc, reader = validate_doc(_expand_env(data, file, lines), file, lines)
    base = Path(path).resolve().parent
    found = Findings(file, lines)
    profile = _profile(profile_override or doc.machine.get("profile"), base, found)
    machine = _machine(doc.machine, profile, base, found) if profile is not None else None
    files = check_files(doc, reader, profile, base, found)
    if found.problems or profile is None:
        raise ConfigError(found.problems)
    return AgentConfig(
        source=file,
        gateway_id=doc.gateway_id,
        station=doc.station,
        reader=files.reader,
        machine=machine,
        profile=profile,
        broker=files.broker,
        trusted_keys=files.trusted_keys,
        cycle=doc.cycle,
        sparkplug=doc.sparkplug,
        log=doc.log,
        commands=doc.commands,
        telemetry=doc.telemetry,
        state_dir=files.state_dir,
        outbox=doc.outbox,
        thingsboard=doc.thingsboard,
        health=doc.health,
        profile_keys=files.profile_keys,
        require_signed_profile=files.require_signed_profile,
        lines=lines,
    )


def _profile(path: Any, base: Path, found: Findings) -> Profile | None:
    """Stage 2: the firmware profile ``machine.profile`` (or ``--profile``) names."""
    if not path:
        line = found.lines.get(("machine",))
        found.problems.append(
            ConfigProblem(found.file, line, "machine.profile", "required key is missing")
        )
        return None
    try:
        return load_profile(resolve(base, Path(str(path))))
    except ConfigError as err:
        found.problems.extend(err.problems)
        return None


#: Keys of the ``machine:`` section that are the agent's, not the driver's.
_MACHINE_KEYS = ("profile", "require_signed_profile")


def _machine(section: dict[str, Any], profile: Profile, base: Path, found: Findings) -> Any:
    """Stages 2 and 3: the ``machine:`` section against the settings model of the profile's
    driver, then the driver created with them (None when the settings are refused)."""
    model = registry.driver_module(profile.driver).SETTINGS_MODEL
    settings = {k: v for k, v in section.items() if k not in _MACHINE_KEYS}
    try:
        machine = resolve_paths(model.model_validate(settings), base)
    except ValidationError as err:
        found.problems.extend(problems_from_validation(err, found.file, found.lines, ("machine",)))
        return None
    try:
        machine_for(profile, machine)
    except ConfigError as err:
        found.problems.extend(err.problems)
    return machine


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


def profile_keyring(config: AgentConfig) -> KeyRing:
    """The keys that may certify this station's firmware profiles (loaded: stage 4 checked them)."""
    return keyring(config.profile_keys)


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
