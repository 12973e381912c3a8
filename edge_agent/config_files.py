"""Validation stage 4: the files and directories a config names, tried as the agent will use them.

Trusted keys are Ed25519 PEM public keys, the broker's TLS files load, ``state_dir`` and the tag
directory are directories the agent can create and write; a profile's detached signature
(``<profile>.sig``), when present or required, verifies with a key of ``profile_keys``. Relative
paths are relative to the config file's own directory. Nothing is left behind on disk.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .config_schema import AgentConfigDoc, BrokerConfig, TlsConfig
from .errors import ConfigProblem
from .instructions.signing import KeyRing
from .machine.profile import Profile
from .machine.profile_signature import ProfileRefused, signature_path, verify_profile
from .tag.reader import ReaderSettings
from .yamlfile import Lines


@dataclass
class Findings:
    """The problems found in one config file so far, each at the line of its key."""

    file: str
    lines: Lines
    problems: list[ConfigProblem] = field(default_factory=list)

    def add(self, path: tuple[str, ...], message: str | None) -> None:
        """A problem at ``path`` (None: no problem)."""
        if message is not None:
            line = self.lines.get(path)
            self.problems.append(ConfigProblem(self.file, line, ".".join(path), message))


@dataclass(frozen=True)
class NamedFiles:
    """What stage 4 checked, with every path resolved."""

    trusted_keys: dict[str, Path]
    profile_keys: dict[str, Path]
    reader: ReaderSettings
    broker: BrokerConfig
    state_dir: Path | None
    require_signed_profile: bool


def check_files(
    doc: AgentConfigDoc,
    reader: ReaderSettings,
    profile: Profile | None,
    base: Path,
    found: Findings,
) -> NamedFiles:
    """Stage 4 on a config whose schema is valid; ``base``: the config file's directory. The
    profile's signature is checked only when nothing else was found (it names the profile keys)."""
    keys = _keys(doc.trusted_keys, "trusted_keys", base, found)
    profile_keys = _keys(doc.profile_keys, "profile_keys", base, found)
    require_signed = doc.machine.get("require_signed_profile", False)
    if not isinstance(require_signed, bool):
        found.add(("machine", "require_signed_profile"), "must be true or false")
    elif profile is not None and not found.problems:
        found.add(("machine", "profile"), signature_problem(profile, profile_keys, require_signed))

    reader = resolve_paths(reader, base)
    directory = getattr(reader, "directory", None)  # tags as files (simulated): written into
    if isinstance(directory, Path):
        found.add(("reader", "directory"), directory_problem(directory))

    broker = _broker(doc.broker, base, found)
    state_dir = resolve(base, doc.state_dir) if doc.state_dir is not None else None
    if state_dir is not None:
        found.add(("state_dir",), directory_problem(state_dir))
    return NamedFiles(keys, profile_keys, reader, broker, state_dir, require_signed is True)


def _keys(keys: dict[str, Path], section: str, base: Path, found: Findings) -> dict[str, Path]:
    resolved = {key_id: resolve(base, path) for key_id, path in keys.items()}
    for key_id, path in resolved.items():
        found.add((section, key_id), public_key_problem(path))
    return resolved


def _broker(broker: BrokerConfig, base: Path, found: Findings) -> BrokerConfig:
    if broker.tls is None:
        return broker
    paths = {}
    for name in ("ca_file", "cert_file", "key_file"):
        value = getattr(broker.tls, name)
        if value is not None:
            paths[name] = resolve(base, value)
    tls = broker.tls.model_copy(update=paths)
    for name, message in tls_problems(tls):
        found.add(("broker", "tls", name), message)
    return broker.model_copy(update={"tls": tls})


def keyring(keys: dict[str, Path]) -> KeyRing:
    """The keys of ``trusted_keys`` or ``profile_keys``, loaded (this stage checked them)."""
    return KeyRing.from_files({k: str(p) for k, p in keys.items()})


def signature_problem(profile: Profile, keys: dict[str, Path], required: bool) -> str | None:
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
            keyring(keys),
            name=profile.name,
            version=profile.version,
            origin=sig_path.name,
        )
    except ProfileRefused as err:
        return f"signature refused: {err}"
    except OSError as err:
        return f"{err.filename}: cannot read: {err.strerror}"
    return None


def public_key_problem(path: Path) -> str | None:
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


def directory_problem(path: Path) -> str | None:
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


def tls_problems(tls: TlsConfig) -> list[tuple[str, str]]:
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


def resolve_paths(model: BaseModel, base: Path) -> Any:
    """Make every path the file gives (certificates, keys, ...) relative to the file's directory,
    at any depth of a driver's settings. Defaults are left as the driver chose them."""
    update: dict[str, Any] = {}
    for name in model.model_fields_set:
        value = getattr(model, name)
        if isinstance(value, Path):
            update[name] = resolve(base, value)
        elif isinstance(value, BaseModel):
            update[name] = resolve_paths(value, base)
    return model.model_copy(update=update) if update else model


def resolve(base: Path, path: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base / path
