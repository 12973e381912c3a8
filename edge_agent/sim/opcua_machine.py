"""The reference OPC UA machine: a small asyncua server the tests and ``demo --opcua`` run against.

Address space (namespace ``urn:edge-agent:reference-opcua-machine``, node ids are strings so they
do not depend on creation order; browse names are in the same namespace)::

    Objects/Machine
        Double, Int32, Boolean, String   writable parameters of those DataTypes
        Trigger                          writable Boolean: its rising edge runs a machine cycle
        Result (Double)                  read-only: 2 x Double of the last cycle
        Cycles (UInt32)                  read-only: cycles since start
        Done (Boolean)                   read-only: set by a cycle, cleared when Trigger goes false
        Counter (UInt32)                 read-only: increases every second
        Add(a: Double, b: Double) -> sum (Double)

The machine cycle runs ``done_delay`` s after the rising edge (0: within the write itself).
Endpoints: security None and Basic256Sha256 Sign / SignAndEncrypt; identities anonymous (unless
``--no-anonymous``), the ``--user NAME:PASSWORD`` accounts and the X.509 user certificates given
with ``--user-cert FILE``. The server's certificate is created
on first start in ``--pki`` (``server-cert.der``, ``server-key.pem``) and reused afterwards.

Run standalone (for ``edge-agent demo --opcua --machine opc.tcp://127.0.0.1:4840/edge-agent``)::

    python -m edge_agent.sim.opcua_machine --port 4840 --user operator:secret
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

NAMESPACE = "urn:edge-agent:reference-opcua-machine"
APPLICATION_URI = "urn:edge-agent:sim:reference-opcua-machine"
DEFAULT_PATH = "/edge-agent"

_WRITABLE = {
    "Double": (0.0, ua.VariantType.Double),
    "Int32": (0, ua.VariantType.Int32),
    "Boolean": (False, ua.VariantType.Boolean),
    "String": ("", ua.VariantType.String),
    "Trigger": (False, ua.VariantType.Boolean),
}
_READ_ONLY = {
    "Result": (0.0, ua.VariantType.Double),
    "Cycles": (0, ua.VariantType.UInt32),
    "Done": (False, ua.VariantType.Boolean),
    "Counter": (0, ua.VariantType.UInt32),
}


class _Accounts:
    """Anonymous (if allowed), username/password and X.509 users; anything else is refused."""

    def __init__(self, users: dict[str, str], anonymous: bool, certificates: set[bytes]) -> None:
        self.users = users
        self.anonymous = anonymous
        self.certificates = certificates  # DER of the accepted user certificates

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        # ``certificate`` is the X.509 user token's certificate, or else the secure channel's
        # client certificate: only a listed one is a user identity.
        if username is None:
            if certificate is not None and _der(certificate) in self.certificates:
                return User(role=UserRole.User, name="x509")
            return User(role=UserRole.User) if self.anonymous else None
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        if username in self.users and self.users[username] == password:
            return User(role=UserRole.User, name=username)
        return None


class ReferenceOpcUaMachine:
    """``await start()``, talk OPC UA to ``url``, ``await stop()``."""

    def __init__(
        self,
        *,
        pki: Path,
        users: dict[str, str] | None = None,
        anonymous: bool = True,
        done_delay: float = 0.0,
        extra_namespaces: int = 0,
        user_certificates: list[Path] | None = None,
    ) -> None:
        self.pki = pki
        self.user_certificates = user_certificates or []
        self.extra_namespaces = extra_namespaces  # registered first: moves our namespace's index
        self.users = users or {}
        self.anonymous = anonymous
        self.done_delay = done_delay
        self.url = ""
        self.cycles = 0
        self._server: Server | None = None
        self._nodes: dict[str, ua.NodeId] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._trigger = False

    @property
    def certificate(self) -> Path:
        return self.pki / "server-cert.der"

    async def start(
        self, host: str = "127.0.0.1", port: int = 4840, path: str = DEFAULT_PATH
    ) -> str:
        self.pki.mkdir(parents=True, exist_ok=True)
        key = self.pki / "server-key.pem"
        await cert_gen.setup_self_signed_certificate(
            key,
            self.certificate,
            APPLICATION_URI,
            socket.gethostname(),
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            {"organizationName": "edge-agent"},
        )
        accepted = {_der(path.read_bytes()) for path in self.user_certificates}
        server = Server(user_manager=_Accounts(self.users, self.anonymous, accepted))
        await server.init()
        if port == 0:  # any free port (the endpoint URL must name the real one)
            with socket.socket() as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
        self.url = f"opc.tcp://{host}:{port}{path}"
        server.set_endpoint(self.url)
        server.set_server_name("edge-agent reference OPC UA machine")
        await server.set_application_uri(APPLICATION_URI)
        await server.load_certificate(self.certificate)
        await server.load_private_key(key)
        server.set_security_policy(
            [
                ua.SecurityPolicyType.NoSecurity,
                ua.SecurityPolicyType.Basic256Sha256_Sign,
                ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
            ]
        )
        tokens: list[type] = [ua.UserNameIdentityToken]
        if self.anonymous:
            tokens.insert(0, ua.AnonymousIdentityToken)
        if self.user_certificates:
            tokens.append(ua.X509IdentityToken)
        server.set_identity_tokens(tokens)
        await self._build(server)
        await server.start()
        self._server = server
        self._spawn(self._count_seconds())
        return self.url

    async def _build(self, server: Server) -> None:
        for i in range(self.extra_namespaces):
            await server.register_namespace(f"urn:edge-agent:sim:filler:{i}")
        idx = await server.register_namespace(NAMESPACE)
        machine = await server.nodes.objects.add_object(
            ua.NodeId("Machine", idx), ua.QualifiedName("Machine", idx)
        )
        for name, (value, vtype) in {**_WRITABLE, **_READ_ONLY}.items():
            node = await machine.add_variable(
                ua.NodeId(name, idx), ua.QualifiedName(name, idx), ua.Variant(value, vtype)
            )
            if name in _WRITABLE:
                await node.set_writable()
            self._nodes[name] = node.nodeid

        def add(parent: ua.NodeId, a: ua.Variant, b: ua.Variant) -> list[ua.Variant]:
            return [ua.Variant(a.Value + b.Value, ua.VariantType.Double)]

        inputs = [_argument("a", ua.VariantType.Double), _argument("b", ua.VariantType.Double)]
        method = await machine.add_method(
            ua.NodeId("Add", idx),
            ua.QualifiedName("Add", idx),
            add,
            inputs,
            [_argument("sum", ua.VariantType.Double)],
        )
        self._nodes["Add"] = method.nodeid
        server.iserver.aspace.add_datachange_callback(
            self._nodes["Trigger"], ua.AttributeIds.Value, self._on_trigger
        )

    async def _on_trigger(self, handle: int, value: ua.DataValue) -> None:
        level = bool(value.Value.Value) if value.Value is not None else False
        rising, self._trigger = level and not self._trigger, level
        if rising:
            if self.done_delay > 0:
                self._spawn(self._complete_later())
            else:
                await self._complete()
        elif not level:
            await self._set("Done", False, ua.VariantType.Boolean)

    async def _complete_later(self) -> None:
        await asyncio.sleep(self.done_delay)
        if self._trigger:
            await self._complete()

    async def _complete(self) -> None:
        double = self._value("Double")
        self.cycles += 1
        await self._set("Result", 2 * double, ua.VariantType.Double)
        await self._set("Cycles", self.cycles, ua.VariantType.UInt32)
        await self._set("Done", True, ua.VariantType.Boolean)

    async def _count_seconds(self) -> None:
        count = 0
        while True:
            await asyncio.sleep(1)
            count = (count + 1) & 0xFFFF_FFFF
            await self._set("Counter", count, ua.VariantType.UInt32)

    def _value(self, name: str) -> Any:
        assert self._server is not None
        return self._server.read_attribute_value(self._nodes[name]).Value.Value

    async def _set(self, name: str, value: Any, vtype: ua.VariantType) -> None:
        assert self._server is not None
        # Stamped at the source, as a PLC does: telemetry reports the machine's time of change.
        now = datetime.now(UTC)
        await self._server.write_attribute_value(
            self._nodes[name],
            ua.DataValue(ua.Variant(value, vtype), SourceTimestamp=now, ServerTimestamp=now),
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):
                await server.stop()


def _der(certificate: Any) -> bytes:
    if isinstance(certificate, x509.Certificate):
        return certificate.public_bytes(Encoding.DER)
    data = bytes(certificate)
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data).public_bytes(Encoding.DER)
    return data


def _argument(name: str, vtype: ua.VariantType) -> ua.Argument:
    arg = ua.Argument()
    arg.Name = name
    arg.DataType = ua.NodeId(vtype.value)
    arg.ValueRank = -1
    arg.Description = ua.LocalizedText(name)
    return arg


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m edge_agent.sim.opcua_machine",
        description="Serve the reference OPC UA machine (see the module docstring).",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4840)
    p.add_argument("--path", default=DEFAULT_PATH, help=f"endpoint path (default {DEFAULT_PATH})")
    p.add_argument(
        "--pki", type=Path, help="directory of the server certificate (default: a temporary one)"
    )
    p.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD")
    p.add_argument("--no-anonymous", action="store_true", help="refuse anonymous sessions")
    p.add_argument(
        "--user-cert",
        action="append",
        default=[],
        type=Path,
        help="accepted X.509 user certificate",
    )
    p.add_argument(
        "--done-delay", type=float, default=0.0, help="seconds from trigger to done (default 0)"
    )
    p.add_argument(
        "--extra-namespaces",
        type=int,
        default=0,
        help="register N other namespaces first, as another firmware might (moves our index)",
    )
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    users = dict(u.split(":", 1) for u in args.user)
    with tempfile.TemporaryDirectory(prefix="opcua-machine-") as tmp:
        machine = ReferenceOpcUaMachine(
            pki=args.pki or Path(tmp),
            users=users,
            anonymous=not args.no_anonymous,
            done_delay=args.done_delay,
            extra_namespaces=args.extra_namespaces,
            user_certificates=args.user_cert,
        )
        url = await machine.start(args.host, args.port, args.path)
        # One line on stdout when the endpoint answers: tests and scripts wait for it.
        print(f"ready {url} certificate {machine.certificate}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await machine.stop()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    asyncio.run(_serve(_parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
