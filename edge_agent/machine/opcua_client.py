"""OPC UA driver on asyncua's client, written against the specification's services.

Only standard services are used (GetEndpoints, TranslateBrowsePathsToNodeIds, Browse, Read, Write,
Call, CreateSubscription / CreateMonitoredItems / Publish), so the driver works with any compliant
server, not only asyncua's own.

At connect the driver selects the endpoint of the configured security policy and mode, checks the
server certificate against the gateway's trust, opens the session, then resolves every node of the
profile (namespace URIs to today's indexes, browse paths to node ids) and reads their NodeClass,
DataType, ValueRank and UserAccessLevel in one Read. Anything that does not match the profile is a
``MachineMismatch`` naming profile, point, parameter and node; the station then refuses parts
instead of failing halfway through a cycle. Values are written with the node's DataType; all
parameters of a step go in one Write request. ``wait_until`` waits on a subscription's data change
notifications, not by polling.

Connection policy: when the connection is lost (server restart, network), whatever is in flight
fails at once with a MachineError (the cycle is reported failed, never repeated), and a supervisor
reconnects with capped exponential backoff, resolving nodes anew (a restarted server may number its
namespaces differently) and re-creating the subscription. asyncua's own reconnect is off: it
would reuse the old node ids.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from asyncua import Client, Node, ua
from asyncua.crypto import security_policies

from ..backoff import Backoff
from ..errors import ConfigProblem, MachineError, MachineFault
from ..yamlfile import load_yaml
from . import codec
from .driver import MachineDriver, RawValue, points_of, show_value, values_equal
from .opcua import (
    DATA_TYPES,
    STANDARD_NAMESPACE,
    Address,
    MachineMismatch,
    OpcUaPoint,
    OpcUaSettings,
    parse_address,
)
from .opcua_security import check_server_certificate, own_certificate
from .profile import CallMethod, PointType, Profile, ResetPoint, SetPoint, WaitFor, WritePoint

log = structlog.get_logger("opcua")

_T = TypeVar("_T")

VARIANT: dict[PointType, ua.VariantType] = {
    PointType.BOOL: ua.VariantType.Boolean,
    PointType.I16: ua.VariantType.Int16,
    PointType.U16: ua.VariantType.UInt16,
    PointType.I32: ua.VariantType.Int32,
    PointType.U32: ua.VariantType.UInt32,
    PointType.F32: ua.VariantType.Float,
    PointType.F64: ua.VariantType.Double,
    PointType.STRING: ua.VariantType.String,
}
_BUILTIN_NAMES = {number: name for number, name in DATA_TYPES.values()}
_PROFILE_TYPE = {number: t for t, (number, _) in DATA_TYPES.items()}
_INTEGERS = {PointType.I16, PointType.U16, PointType.I32, PointType.U32}
_UNSIGNED = {PointType.U16, PointType.U32}
# Abstract DataTypes a variable may declare: which profile types may be written to it.
_ABSTRACT: dict[int, tuple[str, set[PointType]]] = {
    24: ("BaseDataType", set(PointType)),
    26: ("Number", {*_INTEGERS, PointType.F32, PointType.F64}),
    27: ("Integer", _INTEGERS),
    28: ("UInteger", _UNSIGNED),
}
_ENUMERATION = 29  # enumerations are Int32 on the wire
_OBJECTS_FOLDER = ua.NodeId(ua.ObjectIds.ObjectsFolder)
_HIERARCHICAL = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
_HAS_SUBTYPE = ua.NodeId(ua.ObjectIds.HasSubtype)
_HAS_COMPONENT = ua.NodeId(ua.ObjectIds.HasComponent)
_HAS_PROPERTY = ua.NodeId(ua.ObjectIds.HasProperty)
_READ, _WRITE = 0x01, 0x02  # AccessLevel bits CurrentRead, CurrentWrite
_SCALAR_RANKS = (-1, -2, -3)  # Scalar, Any, ScalarOrOneDimension
_POLICY = {"Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256}
_MODE = {
    "None": ua.MessageSecurityMode.None_,
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}
_POLICY_NONE_URI = "http://opcfoundation.org/UA/SecurityPolicy#None"
# Status codes after which retrying soon cannot help: wait the longest backoff.
_REFUSALS = {
    "BadUserAccessDenied",
    "BadIdentityTokenInvalid",
    "BadIdentityTokenRejected",
    "BadCertificateUntrusted",
    "BadCertificateInvalid",
    "BadSecurityChecksFailed",
    "BadSecurityPolicyRejected",
}


@dataclass(frozen=True)
class _Method:
    object_id: ua.NodeId
    method_id: ua.NodeId
    inputs: tuple[ua.VariantType | None, ...]  # None: a DataType this driver does not convert to
    outputs: int


class _Changes:
    """asyncua's subscription handler: keeps the latest value of each watched point."""

    def __init__(self, driver: OpcUaDriver) -> None:
        self.driver = driver

    def datachange_notification(self, node: Node, val: Any, data: Any) -> None:
        dv = data.monitored_item.Value
        # The machine's own time of the value; a server that sets none: its own, else ours.
        stamp = dv.SourceTimestamp or dv.ServerTimestamp
        self.driver._changed(node.nodeid, val, stamp.timestamp() if stamp else time.time())

    def status_change_notification(self, status: Any) -> None:
        log.warning("subscription status changed", device=self.driver.device, status=str(status))


class OpcUaDriver(MachineDriver):
    """A session with one OPC UA server, addressed through a profile's points."""

    def __init__(self, settings: OpcUaSettings, profile: Profile) -> None:
        self.settings = settings
        self.profile = profile
        self.device = f"opcua {settings.url}"
        self._points = points_of(profile, OpcUaPoint)
        self._formats = {
            n: codec.Format(type=p.type, scale=p.scale, offset=p.offset, length=p.length)
            for n, p in self._points.items()
        }
        steps = [*profile.handshake, *profile.on_abort]
        self._watched = sorted({s.wait for s in steps if isinstance(s, WaitFor)})
        self._method_addresses = {
            s.call: parse_address(*_split_call(s.call)) for s in steps if isinstance(s, CallMethod)
        }
        self._usage = _usage(profile)
        self._client: Client | None = None
        self._nodes: dict[str, ua.NodeId] = {}
        self._names: dict[ua.NodeId, str] = {}
        self._methods: dict[str, _Method] = {}
        self._values: dict[str, Any] = {}
        self._stamps: dict[str, float] = {}  # source time (unix s) of each notified value
        self._pushed: dict[float, list[str]] = {}  # telemetry: sampling interval s -> points
        self._seq: dict[str, int] = {}  # data change notifications received per watched point
        self._tick = asyncio.Event()  # set (and replaced) on every data change
        self._lost = asyncio.Event()  # set when this connection is lost
        self._connect_lock = asyncio.Lock()
        self._backoff = Backoff(settings.reconnect_min, settings.reconnect_max)
        self._refusal = False  # the last failure was the server or the profile saying no
        self.mismatch: MachineMismatch | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False
        #: Milliseconds of the last successful connect, endpoint discovery to subscription.
        self.connect_ms = 0.0

    # -- connection ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._client is not None and not self._lost.is_set()

    async def connect(self) -> None:
        self._closed = False
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = asyncio.create_task(self._supervise(), name="opcua-supervisor")
        async with self._connect_lock:
            if self.connected:
                return
            waiting = self._backoff.waiting()
            if waiting is not None:
                raise MachineError(waiting, device=self.device, retryable=not self._refusal)
            try:
                await self._open()
            except MachineError as err:
                if isinstance(err, MachineMismatch):
                    self.mismatch = err  # parts are refused until the server matches again
                # A wrong password, an untrusted certificate, a profile mismatch: wait longest.
                self._refusal = not err.retryable
                error = str(err).removeprefix(f"{self.device}: ")
                self._backoff.failed(error, longest=self._refusal)
                raise
            self.sessions += 1
            failures = self._backoff.succeeded()
            if failures:
                log.warning("machine reachable again", device=self.device, attempts=failures)
            self._refusal = False

    async def _supervise(self) -> None:
        """Reconnect in the background, so that the next part finds the session ready."""
        warned = False
        while not self._closed:
            if self.connected:
                warned = False
                await self._lost.wait()
                log.warning("connection to the machine lost; reconnecting", device=self.device)
                await self._drop()
                continue
            await asyncio.sleep(self._backoff.remaining())
            try:
                await self.connect()
            except MachineError as err:
                if not warned:
                    log.warning(
                        "machine not reachable; retrying", device=self.device, error=str(err)
                    )
                    warned = True

    async def _open(self) -> None:
        s = self.settings
        started = time.perf_counter()
        await self._drop()
        client = Client(s.url, timeout=s.timeout)
        client.name = client.description = "edge-agent"
        client.product_uri = "urn:edge-agent"
        client.session_timeout = 60_000  # ms; the server keeps our session across a short outage
        try:
            endpoint = await self._select_endpoint(client)
            await self._secure(client, endpoint)
            if s.username is not None:
                client.set_user(s.username)
                client.set_password(s.password or "")
            elif s.user_certificate is not None and s.user_private_key is not None:
                await client.load_client_certificate(str(s.user_certificate))
                await client.load_private_key(s.user_private_key)
            lost = asyncio.Event()
            client.connection_lost_callback = _on_lost(lost)
            await asyncio.wait_for(client.connect(), timeout=s.timeout * 3)
        except MachineError:
            await _discard(client)
            raise
        except Exception as err:
            await _discard(client)
            raise self._translate(err, "connect") from err
        try:
            await self._resolve(client)
            await self._subscribe(client)
        except Exception as err:
            await _discard(client)
            if isinstance(err, MachineError):
                raise
            raise self._translate(err, "reading the address space") from err
        self._client, self._lost = client, lost
        self.mismatch = None
        self.connect_ms = (time.perf_counter() - started) * 1000
        log.info(
            "connected",
            device=self.device,
            security=f"{s.security.policy}/{s.security.mode}",
            identity=s.identity,
            ms=round(self.connect_ms, 1),
        )

    async def _select_endpoint(self, client: Client) -> ua.EndpointDescription:
        sec = self.settings.security
        endpoints = await asyncio.wait_for(
            client.connect_and_get_server_endpoints(), timeout=self.settings.timeout * 2
        )
        policy_uri = _POLICY_NONE_URI if sec.policy == "None" else _POLICY[sec.policy].URI
        token = _token_type(self.settings)
        offered = []
        for ep in endpoints:
            offered.append(f"{ep.SecurityPolicyUri.rpartition('#')[2]}/{ep.SecurityMode.name}")
            if ep.SecurityPolicyUri == policy_uri and ep.SecurityMode == _MODE[sec.mode]:
                tokens = [t.TokenType for t in ep.UserIdentityTokens]
                if token not in tokens:
                    names = ", ".join(t.name for t in tokens) or "none"
                    raise MachineError(
                        f"endpoint {sec.policy}/{sec.mode} does not accept {token.name} "
                        f"identities (it accepts: {names})",
                        device=self.device,
                        retryable=False,
                    )
                return ep
        raise MachineError(
            f"the server offers no endpoint with security {sec.policy}/{sec.mode} "
            f"(offered: {', '.join(sorted(set(offered)))})",
            device=self.device,
            retryable=False,
        )

    async def _secure(self, client: Client, endpoint: ua.EndpointDescription) -> None:
        sec = self.settings.security
        if sec.policy == "None":
            return
        server_der = _first_certificate(endpoint.ServerCertificate)
        check_server_certificate(server_der, sec, self.device)
        cert, key, uri = await own_certificate(sec)
        client.application_uri = uri
        await client.set_security(
            _POLICY[sec.policy],
            certificate=str(cert),
            private_key=str(key),
            server_certificate=server_der,
            mode=_MODE[sec.mode],
        )

    async def _drop(self) -> None:
        client, self._client = self._client, None
        self._lost.set()
        if client is not None:
            await _discard(client)

    async def close(self) -> None:
        self._closed = True
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(BaseException):
                await supervisor
        with contextlib.suppress(Exception):
            await self._drop()

    # -- address space ------------------------------------------------------------------------

    async def _resolve(self, client: Client) -> None:
        """Resolve and check every node of the profile; MachineMismatch lists every problem."""
        namespaces = await client.get_namespace_array()
        problems: list[tuple[str, str]] = []  # (key path in the profile, message)
        nodes: dict[str, ua.NodeId] = {}
        paths: dict[str, Address] = {}
        for name, point in self._points.items():
            address = point.address
            if address.kind == "path":
                paths[name] = address
                continue
            node = _node_id(address, namespaces)
            if isinstance(node, str):
                problems.append((f"points.{name}", self._say(name, address, node)))
            else:
                nodes[name] = node
        method_paths = {k: a for k, a in self._method_addresses.items() if a.kind == "path"}
        for key, address in {**paths, **method_paths}.items():
            found = await self._translate_path(client, address, namespaces)
            if isinstance(found, str):
                where = f"points.{key}" if key in paths else f"handshake: call {key}"
                problems.append((where, self._say(key, address, found)))
            else:
                nodes[key] = found

        names = [n for n in self._points if n in nodes]
        attrs = (
            ua.AttributeIds.NodeClass,
            ua.AttributeIds.DataType,
            ua.AttributeIds.ValueRank,
            ua.AttributeIds.UserAccessLevel,
        )
        values = await _read(client, [(nodes[n], a) for n in names for a in attrs])
        for i, name in enumerate(names):
            node_class, data_type, rank, access = values[i * 4 : i * 4 + 4]
            problem = await self._check_variable(client, name, node_class, data_type, rank, access)
            if problem:
                problems.append(
                    (f"points.{name}", self._say(name, self._points[name].address, problem))
                )
        methods: dict[str, _Method] = {}
        for call, address in self._method_addresses.items():
            if address.kind != "path":
                found_id = _node_id(address, namespaces)
                if isinstance(found_id, str):
                    problems.append((f"handshake: call {call}", found_id))
                    continue
                nodes[call] = found_id
            if call not in nodes:
                continue
            method = await self._check_method(client, call, nodes[call], address)
            if isinstance(method, str):
                problems.append((f"handshake: call {call}", method))
            else:
                methods[call] = method
        if problems:
            raise MachineMismatch(self._problems(problems), device=self.device)
        self._nodes = {n: nodes[n] for n in self._points}
        self._names = {nodes[n]: n for n in self._points}  # notifications come for watched ones
        self._methods = methods

    def _say(self, name: str, address: Address, message: str) -> str:
        used = self._usage.get(name)
        return (
            f"profile {self.profile.name} {self.profile.version}, point '{name}'"
            f"{' (' + used + ')' if used else ''}, node {address}: {message}"
        )

    def _problems(self, found: list[tuple[str, str]]) -> list[ConfigProblem]:
        lines: dict[tuple[str | int, ...], int] = {}
        with contextlib.suppress(Exception):  # line numbers are a courtesy
            lines = load_yaml(self.profile.source)[1]
        out = []
        for key, message in found:
            parts = tuple(key.split(".")) if key.startswith("points.") else ("handshake",)
            out.append(ConfigProblem(self.profile.source, lines.get(parts), key, message))
        return out

    async def _translate_path(
        self,
        client: Client,
        address: Address,
        namespaces: list[str],
        start: ua.NodeId | None = None,
    ) -> ua.NodeId | str:
        elements = []
        for uri, name in address.path:
            if uri not in namespaces:
                return f"namespace {uri} is not on the server (it has: {', '.join(namespaces)})"
            element = ua.RelativePathElement()
            element.ReferenceTypeId = _HIERARCHICAL
            element.IsInverse = False
            element.IncludeSubtypes = True
            element.TargetName = ua.QualifiedName(name, namespaces.index(uri))
            elements.append(element)
        path = ua.BrowsePath()
        path.StartingNode = start or _OBJECTS_FOLDER
        path.RelativePath = ua.RelativePath(Elements=elements)
        (result,) = await client.uaclient.translate_browsepaths_to_nodeids([path])
        if not result.StatusCode.is_good() or not result.Targets:
            return f"no node at this browse path ({result.StatusCode.name})"
        target = result.Targets[0].TargetId
        return ua.NodeId(target.Identifier, target.NamespaceIndex)

    async def _check_variable(
        self,
        client: Client,
        name: str,
        node_class: ua.DataValue,
        data_type: ua.DataValue,
        rank: ua.DataValue,
        access: ua.DataValue,
    ) -> str | None:
        point = self._points[name]
        if not node_class.StatusCode.is_good():
            return f"no such node on the server ({node_class.StatusCode.name})"
        if node_class.Value.Value != ua.NodeClass.Variable:
            return f"is a {ua.NodeClass(node_class.Value.Value).name}, not a Variable"
        builtin = await _builtin_type(client, data_type.Value.Value)
        wanted_id, wanted = DATA_TYPES[point.type]
        if isinstance(builtin, str):
            return builtin
        if builtin in _ABSTRACT:
            label, allowed = _ABSTRACT[builtin]
            if point.type not in allowed:
                return f"DataType {label} cannot hold {point.type.value} ({wanted})"
        elif builtin != wanted_id:
            actual = _BUILTIN_NAMES.get(builtin, f"i={builtin}")
            hint = _PROFILE_TYPE.get(builtin)
            fix = f"; the profile should say type: {hint.value}" if hint else ""
            return f"DataType is {actual}, the profile says {point.type.value} ({wanted}){fix}"
        if rank.Value.Value not in _SCALAR_RANKS:
            return f"ValueRank {rank.Value.Value}: an array, the profile expects a scalar"
        level = int(access.Value.Value or 0)
        if not level & _READ:
            return "not readable by this session's user (UserAccessLevel lacks CurrentRead)"
        if name in self._usage_writes and not level & _WRITE:
            return "read-only on the server (UserAccessLevel lacks CurrentWrite), but the profile writes it"
        return None

    @property
    def _usage_writes(self) -> set[str]:
        return _written_points(self.profile)

    async def _check_method(
        self, client: Client, call: str, method_id: ua.NodeId, address: Address
    ) -> _Method | str:
        where = f"method {address}"
        (node_class, executable) = await _read(
            client,
            [(method_id, ua.AttributeIds.NodeClass), (method_id, ua.AttributeIds.UserExecutable)],
        )
        if not node_class.StatusCode.is_good():
            return f"{where}: no such node on the server ({node_class.StatusCode.name})"
        if node_class.Value.Value != ua.NodeClass.Method:
            return f"{where}: is a {ua.NodeClass(node_class.Value.Value).name}, not a Method"
        if executable.StatusCode.is_good() and executable.Value.Value is False:
            return f"{where}: not executable by this session's user"
        # The object the method is called on: its parent by HasComponent (spec Part 4, Call).
        desc = ua.BrowseDescription()
        desc.NodeId = method_id
        desc.BrowseDirection = ua.BrowseDirection.Inverse
        desc.ReferenceTypeId = _HAS_COMPONENT
        desc.IncludeSubtypes = True
        desc.ResultMask = ua.BrowseResultMask.All
        params = ua.BrowseParameters()
        params.NodesToBrowse = [desc]
        (browsed,) = await client.uaclient.browse(params)
        if not browsed.References:
            return f"{where}: no object owns this method (no inverse HasComponent reference)"
        parent = browsed.References[0].NodeId
        object_id = ua.NodeId(parent.Identifier, parent.NamespaceIndex)
        arguments: dict[str, list[Any]] = {}
        for prop in ("InputArguments", "OutputArguments"):
            found = await self._translate_path(
                client,
                Address("", "path", prop, ((STANDARD_NAMESPACE, prop),)),
                await client.get_namespace_array(),
                start=method_id,
            )
            if isinstance(found, str):
                arguments[prop] = []
                continue
            (value,) = await _read(client, [(found, ua.AttributeIds.Value)])
            arguments[prop] = list(value.Value.Value or []) if value.StatusCode.is_good() else []
        inputs = []
        for arg in arguments["InputArguments"]:
            builtin = await _builtin_type(client, arg.DataType)
            inputs.append(VARIANT.get(_PROFILE_TYPE[builtin]) if builtin in _PROFILE_TYPE else None)
        for step in (*self.profile.handshake, *self.profile.on_abort):
            if isinstance(step, CallMethod) and step.call == call:
                if len(step.args) != len(inputs):
                    return f"{where}: takes {len(inputs)} input argument(s), the profile passes {len(step.args)}"
                if len(step.results) > len(arguments["OutputArguments"]):
                    return (
                        f"{where}: returns {len(arguments['OutputArguments'])} output argument(s), "
                        f"the profile names {len(step.results)}"
                    )
        return _Method(object_id, method_id, tuple(inputs), len(arguments["OutputArguments"]))

    async def _subscribe(self, client: Client) -> None:
        self._values.clear()
        self._stamps.clear()
        for interval, names in self._pushed.items():
            await self._monitor(client, names, interval)
        if not self._watched:
            return
        interval_ms = self.settings.publishing_interval * 1000
        subscription = await client.create_subscription(interval_ms, _Changes(self))
        nodes = [client.get_node(self._nodes[n]) for n in self._watched]
        handles = await subscription.subscribe_data_change(nodes, sampling_interval=0.0)
        for name, handle in zip(self._watched, handles, strict=True):
            if isinstance(handle, ua.StatusCode):
                raise MachineError(
                    f"cannot monitor point '{name}' ({self._points[name].address}): {handle.name}",
                    device=self.device,
                )
        # The first notification carries the current value; read it too so that a wait right
        # after connect does not depend on the first publish.
        for name, value in zip(
            self._watched,
            await _read(client, [(self._nodes[n], ua.AttributeIds.Value) for n in self._watched]),
            strict=True,
        ):
            if value.StatusCode.is_good():
                self._values[name] = self._decode(name, value.Value.Value)

    async def _monitor(self, client: Client, names: Sequence[str], interval: float) -> None:
        """One subscription publishing every ``interval`` s, sampling ``names`` as often; the first
        notification of each carries its current value, so no Read is needed."""
        ms = interval * 1000
        subscription = await client.create_subscription(ms, _Changes(self))
        nodes = [client.get_node(self._nodes[n]) for n in names]
        handles = await subscription.subscribe_data_change(nodes, sampling_interval=ms)
        for name, handle in zip(names, handles, strict=True):
            if isinstance(handle, ua.StatusCode):
                raise MachineError(
                    f"cannot monitor point '{name}' ({self._points[name].address}): {handle.name}",
                    device=self.device,
                )

    def _changed(self, node_id: ua.NodeId, value: Any, stamp: float | None = None) -> None:
        name = self._names.get(node_id)
        if name is None:
            return
        with contextlib.suppress(ValueError):
            self._values[name] = self._decode(name, value)
            self._seq[name] = self._seq.get(name, 0) + 1
            self._stamps[name] = stamp if stamp is not None else time.time()
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()

    # -- encoding -----------------------------------------------------------------------------

    def _point(self, name: str) -> OpcUaPoint:
        try:
            return self._points[name]
        except KeyError:
            raise ValueError(f"{name}: no such point in profile {self.profile.name}") from None

    def encode(self, point: str, value: Any) -> RawValue:
        p = self._point(point)
        if self.mismatch is not None:
            raise ValueError(f"{point}: refused, {self.mismatch}")
        fmt = self._formats[point]
        raw: Any
        if p.type is PointType.BOOL:
            raw = codec.encode_bit(value, point)
        elif p.type is PointType.STRING:
            if not isinstance(value, str):
                raise ValueError(f"{point}: {value!r} is not a string")
            if p.length is not None and len(value) > p.length:
                raise ValueError(
                    f"{point}: {value!r} is {len(value)} characters long, the point holds at most {p.length}"
                )
            raw = value
        else:
            raw = codec._to_raw(fmt, value, point)
        return ua.Variant(raw, VARIANT[p.type])

    def raw_for_report(self, raw: RawValue) -> Any:
        return raw.Value if isinstance(raw, ua.Variant) else raw

    def _decode(self, name: str, raw: Any) -> Any:
        fmt = self._formats[name]
        if fmt.type in (PointType.BOOL, PointType.STRING) or raw is None:
            return raw
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError(f"{name}: the server sent {raw!r}, not a number")
        return codec._to_engineering(fmt, raw)

    # -- I/O ----------------------------------------------------------------------------------

    async def write(self, values: Mapping[str, RawValue]) -> None:
        items = []
        for name, raw in values.items():
            p = self._point(name)
            if not p.writable:
                raise ValueError(f"{name}: the profile declares node {p.address} read-only")
            if not isinstance(raw, ua.Variant) or raw.VariantType != VARIANT[p.type]:
                raise ValueError(
                    f"{name}: wire value {raw!r} is not a {VARIANT[p.type].name} Variant"
                )
            items.append((name, raw))
        if not items:
            return
        client = await self._ready()
        request = []
        for name, raw in items:
            wv = ua.WriteValue()
            wv.NodeId = self._nodes[name]
            wv.AttributeId = ua.AttributeIds.Value
            # Value only: many PLCs refuse writes that carry a status or timestamps.
            wv.Value = ua.DataValue(raw, StatusCode=None)
            request.append(wv)
        params = ua.WriteParameters()
        params.NodesToWrite = request
        names = ", ".join(n for n, _ in items)
        results = await self._call(client, f"Write ({names})", client.uaclient.write(params))
        bad = [
            f"{n} ({self._points[n].address}): {status.name}"
            for (n, _), status in zip(items, results, strict=True)
            if not status.is_good()
        ]
        if bad:
            written = [n for (n, _), s in zip(items, results, strict=True) if s.is_good()]
            raise MachineFault(
                f"Write refused for {'; '.join(bad)}"
                + (f" (written: {', '.join(written)})" if written else ""),
                device=self.device,
            )

    async def read(self, points: Sequence[str]) -> dict[str, Any]:
        names = list(dict.fromkeys(points))
        for n in names:
            self._point(n)
        client = await self._ready()
        values = await self._call(
            client,
            f"Read ({', '.join(names)})",
            _read(client, [(self._nodes[n], ua.AttributeIds.Value) for n in names]),
        )
        out = {}
        for name, dv in zip(names, values, strict=True):
            if not dv.StatusCode.is_good():
                raise MachineFault(
                    f"Read {name} ({self._points[name].address}): {dv.StatusCode.name}",
                    device=self.device,
                )
            try:
                out[name] = self._decode(name, dv.Value.Value if dv.Value is not None else None)
            except ValueError as err:
                raise MachineFault(str(err), device=self.device) from err
        return out

    async def wait_until(self, point: str, expected: Any, timeout: float) -> None:
        if point not in self._watched:  # the profile's waits are all watched; read anything else
            raise ValueError(f"{point}: only points named in a 'wait' step can be waited for")
        await self._ready()
        lost = self._lost
        deadline = time.monotonic() + timeout
        seen = self._seq.get(point, 0)
        while True:
            tick = self._tick
            value = self._values.get(point)
            if values_equal(value, expected):
                if self._seq.get(point, 0) != seen:
                    return  # notified during this wait: the server's value now
                # Known from before the wait: a change may still be on its way, so confirm it.
                value = (await self.read([point]))[point]
                if values_equal(value, expected):
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MachineFault(
                    f"{point} did not become {show_value(expected)} within {float(timeout)} s "
                    f"(last value {show_value(value)})",
                    device=self.device,
                )
            waiters = {asyncio.ensure_future(tick.wait()), asyncio.ensure_future(lost.wait())}
            try:
                await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
            if lost.is_set():
                raise MachineError(
                    f"connection lost while waiting for {point} to become {show_value(expected)}",
                    device=self.device,
                )

    # -- pushed telemetry (driver.PushingDriver) -----------------------------------------------

    async def watch(self, points: Sequence[str], interval: float) -> None:
        names = list(dict.fromkeys(points))
        for name in names:
            self._point(name)  # ValueError naming a point the profile does not have
        async with self._connect_lock:  # a connect under way either includes these or precedes
            watched = self._pushed.setdefault(interval, [])  # re-created at every reconnect
            names = [n for n in names if n not in watched]  # a restarted telemetry: once only
            watched.extend(names)
            if names and self.connected:
                assert self._client is not None
                client = self._client
                monitor = self._monitor(client, names, interval)
                await self._call(client, "CreateMonitoredItems", monitor)

    def latest(self, points: Sequence[str]) -> tuple[dict[str, Any], float] | None:
        if not self.connected:
            error = self._backoff.last_error or "connection lost"
            raise MachineError(f"no session ({error})", device=self.device)
        if any(n not in self._values for n in points):
            return None
        stamps = [self._stamps[n] for n in points if n in self._stamps]
        return {n: self._values[n] for n in points}, max(stamps, default=time.time())

    async def changed(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._tick.wait(), timeout)

    async def call(self, method: str, args: Sequence[RawValue]) -> list[Any]:
        """Call the method ``method`` (as the profile names it) and return its output arguments."""
        client = await self._ready()
        m = self._methods.get(method)
        if m is None:
            raise MachineError(f"method {method} was not resolved at connect", device=self.device)
        inputs = [
            _convert(raw, vtype, method, i)
            for i, (raw, vtype) in enumerate(zip(args, m.inputs, strict=True))
        ]
        request = ua.CallMethodRequest()
        request.ObjectId = m.object_id
        request.MethodId = m.method_id
        request.InputArguments = inputs
        (result,) = await self._call(client, f"Call {method}", client.uaclient.call([request]))
        if not result.StatusCode.is_good():
            detail = [
                f"argument {i + 1}: {s.name}"
                for i, s in enumerate(result.InputArgumentResults or [])
                if not s.is_good()
            ]
            raise MachineFault(
                f"Call {method}: {result.StatusCode.name}{' (' + ', '.join(detail) + ')' if detail else ''}",
                device=self.device,
            )
        return [v.Value for v in result.OutputArguments or []]

    async def _ready(self) -> Client:
        if not self.connected:
            await self.connect()
        assert self._client is not None
        return self._client

    async def _call(self, client: Client, what: str, request: Awaitable[_T]) -> _T:
        """Run one service request; the connection dropping is an answer too."""
        lost = self._lost
        task = asyncio.ensure_future(request)
        waiter = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            waiter.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
            raise MachineError(f"{what}: connection lost", device=self.device)
        try:
            return task.result()
        except Exception as err:
            raise self._translate(err, what) from err

    def _translate(self, err: BaseException, what: str) -> MachineError:
        if isinstance(err, MachineError):
            return err
        if isinstance(err, ua.UaStatusCodeError):
            name = ua.StatusCode(err.code).name
            hint = {
                "BadUserAccessDenied": f"the server refused {self.settings.identity}: wrong user name or password?",
                "BadIdentityTokenRejected": f"the server does not accept {self.settings.identity}",
                "BadIdentityTokenInvalid": f"the server does not accept {self.settings.identity}",
                "BadCertificateUntrusted": "the server does not trust this gateway's certificate: "
                f"add {self.settings.security.pki / 'own' / 'cert.der'} to the server's trusted certificates",
                "BadSecurityChecksFailed": "the server refused the gateway's certificate or signature",
            }.get(name, "")
            message = f"{what}: {name}" + (f" ({hint})" if hint else "")
            return MachineError(message, device=self.device, retryable=name not in _REFUSALS)
        if isinstance(err, TimeoutError | asyncio.TimeoutError):
            return MachineError(
                f"{what}: no response within {self.settings.timeout} s", device=self.device
            )
        if isinstance(err, OSError) and err.errno:
            return MachineError(f"{what}: {os.strerror(err.errno)}", device=self.device)
        return MachineError(f"{what}: {err or type(err).__name__}", device=self.device)


# -- helpers ----------------------------------------------------------------------------------


def _on_lost(lost: asyncio.Event) -> Callable[[Exception], Awaitable[None]]:
    async def callback(exc: Exception) -> None:
        lost.set()

    return callback


async def _discard(client: Client) -> None:
    client.connection_lost_callback = None
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(client.disconnect(), timeout=1)
    with contextlib.suppress(Exception):
        client.disconnect_socket()


async def _read(
    client: Client, items: list[tuple[ua.NodeId, ua.AttributeIds]]
) -> list[ua.DataValue]:
    if not items:
        return []
    params = ua.ReadParameters()
    for node, attr in items:
        rv = ua.ReadValueId()
        rv.NodeId = node
        rv.AttributeId = attr
        params.NodesToRead.append(rv)
    return list(await client.uaclient.read(params))


async def _builtin_type(client: Client, data_type: ua.NodeId) -> int | str:
    """The built-in (namespace 0) DataType ``data_type`` is or derives from."""
    current = data_type
    for _ in range(8):
        if current.NamespaceIndex == 0 and isinstance(current.Identifier, int):
            ident = current.Identifier
            if ident in _BUILTIN_NAMES or ident in _ABSTRACT:
                return ident
            if ident == _ENUMERATION:
                return DATA_TYPES[PointType.I32][0]
        desc = ua.BrowseDescription()
        desc.NodeId = current
        desc.BrowseDirection = ua.BrowseDirection.Inverse
        desc.ReferenceTypeId = _HAS_SUBTYPE
        desc.IncludeSubtypes = False
        desc.ResultMask = ua.BrowseResultMask.All
        params = ua.BrowseParameters()
        params.NodesToBrowse = [desc]
        (result,) = await client.uaclient.browse(params)
        if not result.References:
            break
        parent = result.References[0].NodeId
        current = ua.NodeId(parent.Identifier, parent.NamespaceIndex)
    return f"DataType {data_type.to_string()} is not one this driver writes (Boolean, Int16..UInt32, Float, Double, String)"


def _node_id(address: Address, namespaces: list[str]) -> ua.NodeId | str:
    if address.namespace not in namespaces:
        return (
            f"namespace {address.namespace} is not on the server (it has: {', '.join(namespaces)})"
        )
    index = namespaces.index(address.namespace)
    if address.kind == "i":
        return ua.NodeId(int(address.value), index, ua.NodeIdType.Numeric)
    if address.kind == "s":
        return ua.NodeId(address.value, index, ua.NodeIdType.String)
    if address.kind == "g":
        return ua.NodeId(uuid.UUID(address.value), index, ua.NodeIdType.Guid)
    try:
        return ua.NodeId(
            base64.b64decode(address.value, validate=True), index, ua.NodeIdType.ByteString
        )
    except ValueError:
        return f"b={address.value} is not base64"


def _split_call(call: str) -> tuple[str | None, str | None, str | None]:
    """``call:`` is a node id (``nsu=<uri>;s=Add``) or a browse path (``{<uri>}Machine/{<uri>}Add``)."""
    head = call.strip()
    if head.startswith(("nsu=", "ns=", "i=", "s=", "g=", "b=")):
        return head, None, None
    return None, head, None


def _token_type(settings: OpcUaSettings) -> ua.UserTokenType:
    if settings.username is not None:
        return ua.UserTokenType.UserName
    if settings.user_certificate is not None:
        return ua.UserTokenType.Certificate
    return ua.UserTokenType.Anonymous


def _first_certificate(der: bytes) -> bytes:
    # A server may send its certificate followed by its chain; the first DER SEQUENCE is its own.
    if len(der) > 4 and der[0] == 0x30 and der[1] == 0x82:
        return der[: int.from_bytes(der[2:4], "big") + 4]
    return der


def _convert(raw: RawValue, vtype: ua.VariantType | None, method: str, i: int) -> ua.Variant:
    value = raw.Value if isinstance(raw, ua.Variant) else raw
    if vtype is None:
        return raw if isinstance(raw, ua.Variant) else ua.Variant(value)
    kind = next(t for t, v in VARIANT.items() if v == vtype)
    try:
        if kind is PointType.BOOL:
            value = codec.encode_bit(value, f"{method} argument {i + 1}")
        elif kind is PointType.STRING:
            if not isinstance(value, str):
                raise ValueError(f"{method} argument {i + 1}: {value!r} is not a string")
        else:
            value = codec._to_raw(codec.Format(type=kind), value, f"{method} argument {i + 1}")
    except ValueError as err:
        raise MachineFault(str(err)) from err
    return ua.Variant(value, vtype)


def _written_points(profile: Profile) -> set[str]:
    out = {spec.point for op in profile.operations.values() for spec in op.parameters.values()}
    for step in (*profile.handshake, *profile.on_abort):
        if isinstance(step, WritePoint):
            out.add(step.write)
        elif isinstance(step, SetPoint):
            out.add(step.set)
        elif isinstance(step, ResetPoint):
            out.add(step.reset)
    return out


def _usage(profile: Profile) -> dict[str, str]:
    """Point name -> how the profile uses it, for error messages."""
    uses: dict[str, list[str]] = {}
    for op_name, op in profile.operations.items():
        for param, spec in op.parameters.items():
            uses.setdefault(spec.point, []).append(f"parameter {param} of operation {op_name}")
        for result in op.results:
            uses.setdefault(result, []).append(f"result of operation {op_name}")
    for step in profile.handshake:
        for attr in ("write", "set", "reset", "wait", "read_error"):
            name = getattr(step, attr, None)
            if isinstance(name, str):
                uses.setdefault(name, []).append(f"handshake '{attr}'")
    return {k: ", ".join(dict.fromkeys(v)) for k, v in uses.items()}
