"""OPC UA driver on asyncua's client, written against the specification's services.

The session, its reconnects, reads, writes and method calls live here; the endpoint and trust
(``security.py``), the address space checks (``address_space.py``) and the subscriptions
(``subscriptions.py``) are parts of the same driver class, one module each.

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
(``link.Link``) reconnects with capped exponential backoff, resolving nodes anew (a restarted server may number its
namespaces differently) and re-creating the subscription. asyncua's own reconnect is off: it
would reuse the old node ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import structlog
from asyncua import Client, ua

from ...errors import MachineError, MachineFault, MachineRefused
from ...link import Link, LinkWaiting
from .. import codec
from ..driver import MachineDriver, RawValue, Wait, point_named, points_of
from ..profile import PointType, Profile
from ..steps import CallMethod, WaitFor
from .address_space import VARIANT, AddressSpace, _Method, _read, _split_call, _usage
from .models import MachineMismatch, OpcUaPoint, OpcUaSettings, parse_address
from .security import SecureChannel
from .subscriptions import Subscriptions

log = structlog.get_logger("opcua")

_T = TypeVar("_T")

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
# The server refused the user identity itself (name, password, user certificate).
_AUTHENTICATION = {"BadUserAccessDenied", "BadIdentityTokenInvalid", "BadIdentityTokenRejected"}


class OpcUaDriver(SecureChannel, AddressSpace, Subscriptions, MachineDriver):
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
        # A wrong password, an untrusted certificate, a profile mismatch: the link waits longest.
        self._link = Link(
            "machine", self.device, settings.reconnect_min, settings.reconnect_max, logger=log
        )
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
            try:
                await self._link.attempt(self._open)
            except LinkWaiting as err:
                retryable = not self._link.refused
                raise MachineError(str(err), device=self.device, retryable=retryable) from None
            except MachineMismatch as err:
                self.mismatch = err  # parts are refused until the server matches again
                raise
            self.sessions += 1

    def attempt_now(self) -> None:
        self._link.attempt_now()

    async def _supervise(self) -> None:
        """Reconnect in the background, so that the next part finds the session ready."""
        await self._link.run(self._hold)

    async def _hold(self) -> None:
        await self.connect()
        await self._lost.wait()
        await self._drop()

    async def _open(self) -> dict[str, Any]:
        """Open a session and check the address space; returns fields for the log line."""
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
        return {
            "security": f"{s.security.policy}/{s.security.mode}",
            "identity": s.identity,
            "ms": round(self.connect_ms, 1),
        }

    async def _drop(self) -> None:
        client, self._client = self._client, None
        self._lost.set()
        if client is not None:
            await _discard(client)

    async def close(self) -> None:
        self._closed = True
        self._link.stop()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(BaseException):
                await supervisor
        with contextlib.suppress(Exception):
            await self._drop()

    # -- encoding -----------------------------------------------------------------------------

    def _point(self, name: str) -> OpcUaPoint:
        return point_named(self._points, name, self.profile)

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
        wait = Wait(self.device, point, expected, timeout)
        seen = self._seq.get(point, 0)
        while True:
            tick = self._tick
            if wait.met(self._values.get(point)):
                if self._seq.get(point, 0) != seen:
                    return  # notified during this wait: the server's value now
                # Known from before the wait: a change may still be on its way, so confirm it.
                if wait.met((await self.read([point]))[point]):
                    return
            remaining = wait.remaining()
            waiters = {asyncio.ensure_future(tick.wait()), asyncio.ensure_future(lost.wait())}
            try:
                await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
            if lost.is_set():
                raise MachineError(f"connection lost while waiting for {wait}", device=self.device)

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
            if name in _AUTHENTICATION:
                return MachineRefused(
                    f"{what}: authentication refused ({name}): {hint}", device=self.device
                )
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
