"""The address space checks of the OPC UA driver: every node of a profile resolved and checked.

At connect, namespace URIs are mapped to today's indexes, browse paths to node ids, and the
NodeClass, DataType, ValueRank and UserAccessLevel of every point are read in one Read; methods are
checked for their owner and arguments. Anything that does not match the profile is one
``MachineMismatch`` naming profile, point, parameter and node.
"""

from __future__ import annotations

import base64
import contextlib
import uuid
from dataclasses import dataclass
from typing import Any

from asyncua import Client, ua

from ...errors import ConfigProblem
from ...yamlfile import load_yaml
from ..profile import PointType, Profile
from ..steps import CallMethod
from .models import DATA_TYPES, STANDARD_NAMESPACE, Address, MachineMismatch, OpcUaPoint

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


@dataclass(frozen=True)
class _Method:
    object_id: ua.NodeId
    method_id: ua.NodeId
    inputs: tuple[ua.VariantType | None, ...]  # None: a DataType this driver does not convert to
    outputs: int


class AddressSpace:
    """Part of ``OpcUaDriver``: resolves and checks the profile's nodes on a fresh session."""

    profile: Profile
    device: str
    _points: dict[str, OpcUaPoint]
    _method_addresses: dict[str, Address]
    _usage: dict[str, str]
    _nodes: dict[str, ua.NodeId]
    _names: dict[ua.NodeId, str]
    _methods: dict[str, _Method]

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


def _written_points(profile: Profile) -> set[str]:
    hs = profile.handshake_points
    parameters = {
        spec.point for op in profile.operations.values() for spec in op.parameters.values()
    }
    return parameters | hs.write | hs.set | hs.reset


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
