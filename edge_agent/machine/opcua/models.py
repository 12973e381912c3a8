"""OPC UA machines: how a profile addresses a node, and the ``machine:`` settings.

The driver registry loads these models (through the package) to validate a profile; this module
does not import asyncua, so ``check-config`` works without the ``opcua`` extra.

Addressing survives server restarts: a node is named by its namespace *URI* (``namespace:``, usually
set once in the profile's ``defaults:``) and an identifier (``node: "s=Double"``, ``"i=1001"``,
``"g=<guid>"``, ``"b=<base64>"``, or a full ``"nsu=<uri>;s=..."``), or by a browse path from the
Objects folder (``path: Machine/Double``). A bare namespace index (``ns=2;...``) is refused: servers
renumber their namespaces when they restart or load another model.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from ...errors import ConfigProblem, MachineError
from ...yamlfile import StrictModel
from ..profile import PointType
from ..profile_schema import BasePoint

__all__ = [
    "POINT_MODEL",
    "SETTINGS_MODEL",
    "STANDARD_NAMESPACE",
    "Address",
    "MachineMismatch",
    "OpcUaPoint",
    "OpcUaSettings",
    "parse_address",
]

STANDARD_NAMESPACE = "http://opcfoundation.org/UA/"

#: The built-in DataType (its numeric id in namespace 0) each profile type must meet on the server.
DATA_TYPES: dict[PointType, tuple[int, str]] = {
    PointType.BOOL: (1, "Boolean"),
    PointType.I16: (4, "Int16"),
    PointType.U16: (5, "UInt16"),
    PointType.I32: (6, "Int32"),
    PointType.U32: (7, "UInt32"),
    PointType.F32: (10, "Float"),
    PointType.F64: (11, "Double"),
    PointType.STRING: (12, "String"),
}

_IDENTIFIER = re.compile(r"^(?P<kind>[isgb])=(?P<value>.+)$", re.S)
_PATH_ELEMENT = re.compile(r"^(?:\{(?P<uri>[^{}]+)\})?(?P<name>[^{}/]+)$")


@dataclass(frozen=True)
class Address:
    """A node as the profile names it: by namespace URI and identifier, or by browse path."""

    namespace: str  # URI; STANDARD_NAMESPACE for namespace 0
    kind: Literal["i", "s", "g", "b", "path"]
    value: str  # the identifier, or the path text
    path: tuple[tuple[str, str], ...] = ()  # (namespace URI, browse name) per element

    def __str__(self) -> str:
        if self.kind == "path":
            return "/Objects/" + "/".join(
                name if uri == self.namespace else f"{{{uri}}}{name}" for uri, name in self.path
            )
        if self.namespace == STANDARD_NAMESPACE:
            return f"{self.kind}={self.value}"
        return f"nsu={self.namespace};{self.kind}={self.value}"


def parse_address(node: str | None, path: str | None, namespace: str | None) -> Address:
    """The address given by ``node`` or ``path``; ValueError saying what is wrong."""
    if (node is None) == (path is None):
        raise ValueError("give exactly one of 'node' (an identifier) or 'path' (a browse path)")
    if node is not None:
        text = node.strip()
        if text.startswith("ns="):
            raise ValueError(
                f"'{node}' uses a namespace index; indexes change when the server restarts. "
                "Name the namespace by its URI: 'nsu=<uri>;...' or 'namespace: <uri>'"
            )
        uri = namespace
        if text.startswith("nsu="):
            uri, sep, text = text[4:].partition(";")
            if not sep or not uri:
                raise ValueError(f"'{node}' is not 'nsu=<namespace uri>;<identifier>'")
        m = _IDENTIFIER.match(text)
        if m is None:
            raise ValueError(
                f"'{node}' is not an identifier: use i=<number>, s=<string>, g=<guid> or b=<base64>"
            )
        kind, value = m["kind"], m["value"]
        if kind == "i" and not (value.isdigit() and int(value) <= 0xFFFF_FFFF):
            raise ValueError(f"'{node}': a numeric identifier is 0..4294967295")
        if kind == "g" and not re.fullmatch(
            r"[0-9A-Fa-f]{8}(-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}", value
        ):
            raise ValueError(f"'{node}': a GUID looks like 72962B91-FA75-4AE6-8D28-B404DC7DAF63")
        if uri is None:
            if kind != "i":
                raise ValueError(f"'{node}' needs a namespace: set 'namespace: <uri>' or use nsu=")
            uri = STANDARD_NAMESPACE
        return Address(uri, kind, value)  # type: ignore[arg-type]
    assert path is not None
    text = path.strip().removeprefix("/Objects/")
    # Split on "/" outside braces: namespace URIs contain slashes themselves.
    elements = [e.strip() for e in re.split(r"/(?![^{]*\})", text) if e.strip()]
    if not elements:
        raise ValueError("the browse path is empty")
    parsed = []
    for element in elements:
        m = _PATH_ELEMENT.match(element)
        if m is None:
            raise ValueError(f"path element '{element}' is not 'Name' or '{{namespace uri}}Name'")
        uri = m["uri"] or namespace
        if uri is None:
            raise ValueError(f"path element '{element}' needs a namespace: set 'namespace: <uri>'")
        parsed.append((uri, m["name"]))
    return Address(namespace or parsed[-1][0], "path", path, tuple(parsed))


class OpcUaPoint(BasePoint):
    """One variable on the server. ``type`` must be the node's DataType (checked at connect)."""

    namespace: str | None = Field(None, min_length=1, description="namespace URI")
    node: str | None = None
    path: str | None = None
    read_only: bool = False  # e.g. a Done flag the machine owns: the handshake must not write it

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        parse_address(self.node, self.path, self.namespace)  # ValueError names the problem
        if self.type in (PointType.BOOL, PointType.STRING) and (
            self.scale != 1.0 or self.offset != 0.0
        ):
            raise ValueError(f"{self.type.value} points cannot have a scale or offset")
        if self.length is not None and self.type is not PointType.STRING:
            raise ValueError("'length' applies to string points only")
        return self

    @property
    def address(self) -> Address:
        return parse_address(self.node, self.path, self.namespace)

    @property
    def writable(self) -> bool:
        return not self.read_only

    def cells(self) -> frozenset[tuple[str, int | str]]:
        return frozenset({("node", str(self.address))})


def _default_pki() -> Path:
    # Under systemd (StateDirectory=edge-agent) the only writable place is the state directory.
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(state) / "pki" if state else Path("pki")


class OpcUaSecurity(StrictModel):
    """The secure channel and the gateway's application instance certificate."""

    policy: Literal["None", "Basic256Sha256"] = "None"
    mode: Literal["None", "Sign", "SignAndEncrypt"] = "None"
    #: Where the generated certificate (``own/``), the trusted server certificates (``trusted/``)
    #: and the refused ones (``rejected/``) live.
    pki: Path = Field(default_factory=lambda: _default_pki())
    certificate: Path | None = None  # given: used as is (DER or PEM); else generated on first start
    private_key: Path | None = None
    application_uri: str | None = None  # default urn:<hostname>:edge-agent; must match the cert
    server_thumbprint: str | None = Field(
        None, description="pinned SHA-1 or SHA-256 (hex) of the server certificate"
    )

    @field_validator("server_thumbprint")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is None:
            return v
        clean = v.replace(":", "").replace(" ", "").lower()
        if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", clean):
            raise ValueError("a thumbprint is 40 (SHA-1) or 64 (SHA-256) hex digits")
        return clean

    @model_validator(mode="after")
    def _pairs(self) -> Self:
        if (self.policy == "None") != (self.mode == "None"):
            raise ValueError(
                "policy None goes with mode None; Basic256Sha256 with Sign or SignAndEncrypt"
            )
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("give both 'certificate' and 'private_key', or neither")
        return self


class OpcUaSettings(StrictModel):
    """The ``machine:`` section of the config for an OPC UA machine."""

    url: str = Field(pattern=r"^opc\.tcp://[^/:]+(:\d+)?(/.*)?$")
    security: OpcUaSecurity = OpcUaSecurity()
    username: str | None = None
    password: str | None = None  # ${ENV} in the config keeps it out of the file
    user_certificate: Path | None = None  # X.509 user identity
    user_private_key: Path | None = None
    timeout: float = Field(2.0, gt=0, le=60, description="seconds per request and per connect")
    publishing_interval: float = Field(
        0.01, gt=0, le=10, description="seconds: how often the server sends data changes"
    )
    reconnect_min: float = Field(0.2, gt=0, le=60)
    reconnect_max: float = Field(30.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _identity(self) -> Self:
        if (self.username is None) != (self.password is None):
            raise ValueError("give both 'username' and 'password', or neither")
        if (self.user_certificate is None) != (self.user_private_key is None):
            raise ValueError("give both 'user_certificate' and 'user_private_key', or neither")
        if self.username is not None and self.user_certificate is not None:
            raise ValueError("one user identity: username/password or user_certificate, not both")
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min must not exceed reconnect_max")
        return self

    @property
    def identity(self) -> str:
        if self.username is not None:
            return f"user {self.username}"
        if self.user_certificate is not None:
            return f"X.509 user {self.user_certificate}"
        return "anonymous"


POINT_MODEL = OpcUaPoint
SETTINGS_MODEL = OpcUaSettings


class MachineMismatch(MachineError):
    """The live server does not match the profile (missing node, wrong type, read-only node).

    Not worth retrying until the profile or the machine changes; ``problems`` name profile, point,
    parameter and node, as ``check-config`` prints them.
    """

    def __init__(self, problems: list[ConfigProblem], *, device: str) -> None:
        self.problems = problems
        text = "; ".join(f"{p.path}: {p.message}" for p in problems)
        super().__init__(f"machine does not match the profile: {text}", device=device)
        self.retryable = False
