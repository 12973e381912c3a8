"""Modbus TCP driver on pymodbus's asyncio client.

A profile point names a table (holding, input, coil, discrete), an address and a type; values are
converted by ``codec`` and requests are planned by ``modbus_plan`` (as few as the protocol allows).
Every failure is a ``MachineError`` that names the device, the Modbus function, the address range
and the points involved; exception responses carry the Modbus exception code's name.

Connection policy: one TCP connection, opened on demand. When it is lost the next call reconnects
at once; when connecting fails, further attempts back off exponentially (``link.Link``: with
jitter, capped at ``reconnect_max``) and calls in between fail fast instead of hammering a PLC
that is down, unless a part is waiting (``attempt_now()``).
pymodbus's own background reconnect is disabled (``reconnect_delay=0``) so that it does not race ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, Self

import structlog
from pydantic import Field, ValidationInfo, field_validator, model_validator
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from ..errors import MachineError, MachineFault
from ..link import Link, LinkState, LinkWaiting
from ..yamlfile import StrictModel
from . import codec
from .driver import (
    MachineDriver,
    RawValue,
    Wait,
    check_profile_constants,
    point_named,
    points_of,
)
from .modbus_plan import (
    BIT_TABLES,
    MAX_WRITE_REGISTERS,
    Request,
    Span,
    Table,
    plan_reads,
    plan_writes,
)
from .profile import PointType, Profile
from .profile_schema import BasePoint

log = structlog.get_logger("modbus")

__all__ = [
    "POINT_MODEL",
    "SETTINGS_MODEL",
    "ModbusDriver",
    "ModbusPoint",
    "ModbusSettings",
    "create",
]


class ModbusPoint(BasePoint):
    """One value in one of the four Modbus tables."""

    table: Table
    address: int = Field(ge=0, le=65535)
    byte_order: codec.Order = "big"  # bytes inside each 16-bit register
    word_order: codec.Order = "big"  # registers of a 32/64-bit value
    encoding: codec.Encoding = "ascii"  # string points only
    read_only: bool = False  # e.g. a 'done' coil the PLC owns: the handshake must not write it

    @field_validator("table")
    @classmethod
    def _bits_hold_bools(cls, v: Table, info: ValidationInfo) -> Table:
        type_ = info.data.get("type")  # absent when the type itself was invalid
        if v in BIT_TABLES and type_ is not None and type_ is not PointType.BOOL:
            raise ValueError(
                f"a {v} holds one bit: the point's type must be bool, not {type_.value}"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.type is PointType.STRING:
            if self.length is None:
                raise ValueError("string points need 'length' (characters)")
            if self.registers > MAX_WRITE_REGISTERS:
                raise ValueError(
                    f"length {self.length} needs {self.registers} registers; at most "
                    f"{MAX_WRITE_REGISTERS} fit one request"
                )
        elif self.length is not None:
            raise ValueError("'length' applies to string points only")
        if self.type in (PointType.BOOL, PointType.STRING) and (
            self.scale != 1.0 or self.offset != 0.0
        ):
            raise ValueError(f"{self.type.value} points cannot have a scale or offset")
        if self.address + self.registers - 1 > 65535:
            raise ValueError(
                f"address {self.address} + {self.registers} registers runs past address 65535"
            )
        return self

    @property
    def writable(self) -> bool:
        return self.table in ("holding", "coil") and not self.read_only

    @property
    def registers(self) -> int:
        """Addresses the point occupies (bits: one)."""
        return 1 if self.table in BIT_TABLES else self.register_format().registers

    def cells(self) -> frozenset[tuple[str, int | str]]:
        return frozenset(
            (self.table, a) for a in range(self.address, self.address + self.registers)
        )

    def register_format(self) -> codec.Format:
        return codec.Format(
            type=self.type,
            byte_order=self.byte_order,
            word_order=self.word_order,
            scale=self.scale,
            offset=self.offset,
            length=self.length,
            encoding=self.encoding,
        )


class ModbusSettings(StrictModel):
    """The ``machine:`` section of the config for a Modbus TCP machine."""

    host: str = Field(min_length=1)
    port: int = Field(502, ge=1, le=65535)
    unit_id: int = Field(1, ge=0, le=255)
    timeout: float = Field(1.0, gt=0, le=60, description="seconds per request and per connect")
    retries: int = Field(1, ge=0, le=10, description="resends of a request that got no answer")
    poll_interval: float = Field(0.005, gt=0, le=10, description="seconds between reads in a wait")
    reconnect_min: float = Field(
        0.1, gt=0, le=60, description="first backoff after a failed connect"
    )
    reconnect_max: float = Field(30.0, gt=0, le=3600, description="longest backoff")
    max_gap: int = Field(0, ge=0, le=120, description="unused registers a read may bridge")

    @model_validator(mode="after")
    def _backoff_order(self) -> Self:
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min must not exceed reconnect_max")
        return self


POINT_MODEL = ModbusPoint
SETTINGS_MODEL = ModbusSettings


def create(settings: ModbusSettings | Mapping[str, Any], profile: Profile) -> ModbusDriver:
    """A driver for ``profile``; ConfigError when a constant in the profile cannot be written."""
    if not isinstance(settings, ModbusSettings):
        settings = ModbusSettings.model_validate(dict(settings))
    driver = ModbusDriver(settings, profile)
    check_profile_constants(driver, profile)
    return driver


_MAX_PLANS = 256  # point sets whose requests are kept planned (a read command may name any)
_READ_FUNCTION: dict[Table, str] = {
    "holding": "read_holding_registers",
    "input": "read_input_registers",
    "coil": "read_coils",
    "discrete": "read_discrete_inputs",
}

_EXCEPTION_NAMES = {c.value: c.name for c in ExcCodes}
# The device is there but busy: worth another try later, unlike e.g. ILLEGAL_ADDRESS.
_TRANSIENT_CODES = {
    ExcCodes.ACKNOWLEDGE,
    ExcCodes.DEVICE_BUSY,
    ExcCodes.GATEWAY_PATH_UNAVIABLE,
    ExcCodes.GATEWAY_NO_RESPONSE,
}


class ModbusDriver(MachineDriver):
    """A Modbus TCP connection to one machine, addressed through a profile's points."""

    def __init__(self, settings: ModbusSettings, profile: Profile) -> None:
        self.settings = settings
        self.profile = profile
        self.device = f"modbus {settings.host}:{settings.port} unit {settings.unit_id}"
        self._points = points_of(profile, ModbusPoint)
        self._formats = {n: p.register_format() for n, p in self._points.items()}
        self._spans = {n: Span(n, p.table, p.address, p.registers) for n, p in self._points.items()}
        self._plans: dict[tuple[Any, ...], list[Request]] = {}
        self._client: AsyncModbusTcpClient | None = None
        self._lost: asyncio.Future[None] | None = None  # resolved when the peer drops us
        self._connect_lock = asyncio.Lock()
        self._link = Link(
            "machine", self.device, settings.reconnect_min, settings.reconnect_max, logger=log
        )

    # -- connection ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    async def connect(self) -> None:
        async with self._connect_lock:
            if self.connected:
                return
            try:
                await self._link.attempt(self._open)
            except LinkWaiting as err:
                raise MachineError(str(err), device=self.device) from None
            self.sessions += 1

    def attempt_now(self) -> None:
        self._link.attempt_now()

    async def _open(self) -> None:
        await self._drop()
        s = self.settings
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        client = AsyncModbusTcpClient(
            s.host,
            port=s.port,
            name=self.device,
            timeout=s.timeout,
            retries=s.retries,
            reconnect_delay=0,  # 0 disables pymodbus's background reconnect; we do our own
            reconnect_delay_max=0,
            trace_connect=functools.partial(self._on_connection, lost),
        )
        # client.connect() swallows the reason (it returns False); open the transport the same way
        # it does so that "connection refused" or a DNS failure reaches the error message.
        reason = ""
        try:
            await asyncio.wait_for(client.ctx.call_create(), timeout=s.timeout)
        except TimeoutError:
            reason = f"no answer within {s.timeout} s"
        except socket.gaierror as err:
            reason = f"cannot resolve host name: {err.strerror}"
        except OSError as err:
            # asyncio's strerror is "Connect call failed (...)"; the errno says why.
            reason = os.strerror(err.errno) if err.errno else str(err) or type(err).__name__
        if reason or not client.connected:
            with contextlib.suppress(Exception):
                client.close()
            raise MachineError(
                f"cannot connect to {s.host}:{s.port}: {reason or 'connection failed'}",
                device=self.device,
            )
        self._client, self._lost = client, lost

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _on_connection(self, lost: asyncio.Future[None], up: bool) -> None:
        if not up and not lost.done():
            lost.set_result(None)
            if self._link.state is LinkState.CONNECTED:
                self._link.lost()  # the next call reconnects at once

    async def close(self) -> None:
        self._link.stop()
        await self._drop()  # never raises, whatever state the client is in

    # -- encoding -----------------------------------------------------------------------------

    def _point(self, name: str) -> ModbusPoint:
        return point_named(self._points, name, self.profile)

    def encode(self, point: str, value: Any) -> RawValue:
        p = self._point(point)
        if p.table in BIT_TABLES:
            return codec.encode_bit(value, point)
        return codec.encode(self._formats[point], value, point)

    def raw_for_report(self, raw: RawValue) -> Any:
        return bool(raw) if isinstance(raw, bool) else [int(w) for w in raw]

    def _planned(self, key: tuple[Any, ...], plan: Callable[[], list[Request]]) -> list[Request]:
        # Each point set is planned once (a station asks for the same ones every cycle), within a bound.
        requests = self._plans.get(key)
        if requests is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            requests = self._plans[key] = plan()
        return requests

    def _span(self, name: str) -> Span:
        self._point(name)  # the error for an unknown name
        return self._spans[name]

    # -- I/O ----------------------------------------------------------------------------------

    async def write(self, values: Mapping[str, RawValue]) -> None:
        for name, raw in values.items():
            p = self._point(name)
            if not p.writable:
                raise ValueError(f"{name}: {p.table} {p.address} is read-only")
            _check_raw(self._spans[name], raw)
        for req in self._planned(("w", *values), lambda: plan_writes(map(self._span, values))):
            if req.table == "coil":
                bits = [bool(values[s.name]) for s in req.spans]
                await self._execute("write_coil" if len(bits) == 1 else "write_coils", req, bits)
            else:
                words = [w for s in req.spans for w in values[s.name]]
                await self._execute("write_registers", req, words)

    async def read(self, points: Sequence[str], *, max_gap: int | None = None) -> dict[str, Any]:
        """``max_gap``: unused addresses a request may bridge (default: the connection's setting);
        telemetry groups pass the gap their profile declares for that memory area."""
        out: dict[str, Any] = {}
        gap = self.settings.max_gap if max_gap is None else max_gap
        plan = self._planned(
            ("r", gap, *points),
            lambda: plan_reads(map(self._span, dict.fromkeys(points)), max_gap=gap),
        )
        for req in plan:
            function = _READ_FUNCTION[req.table]
            response = await self._execute(function, req, None)
            bits = req.table in BIT_TABLES
            data: Sequence[Any] = response.bits if bits else response.registers
            if len(data) < req.count:
                raise MachineFault(
                    f"{self._where(function, req)}: short response, {len(data)} of {req.count}",
                    device=self.device,
                )
            for span in req.spans:
                at = span.address - req.address
                if bits:
                    out[span.name] = bool(data[at])
                    continue
                try:
                    out[span.name] = codec.decode(
                        self._formats[span.name], data[at : at + span.count], span.name
                    )
                except ValueError as err:
                    raise MachineFault(
                        f"{self._where(function, req)}: {err}", device=self.device
                    ) from err
        return {n: out[n] for n in points}  # each name once, in the order first asked

    async def wait_until(self, point: str, expected: Any, timeout: float) -> None:
        wait = Wait(self.device, point, expected, timeout)
        while True:  # Modbus has no notifications: poll
            if wait.met((await self.read([point]))[point]):
                return
            await asyncio.sleep(min(self.settings.poll_interval, wait.remaining()))

    # -- requests -----------------------------------------------------------------------------

    def _where(self, function: str, req: Request) -> str:
        names = ", ".join(s.name for s in req.spans)
        return f"{function} address {req.address} count {req.count} ({names})"

    async def _execute(self, function: str, req: Request, payload: list[Any] | None) -> ModbusPDU:
        if not self.connected:
            await self.connect()
        client, lost = self._client, self._lost
        assert client is not None and lost is not None
        # pymodbus keeps waiting for an answer on a dropped connection until its timeout; the peer
        # closing the socket is an answer too. The request is awaited in this task (no extra task
        # per request: this is the hot path) and a lost connection cancels it.
        current = asyncio.current_task()
        assert current is not None
        pending = True
        cut = False

        def on_lost(_: asyncio.Future[None]) -> None:
            nonlocal cut
            if pending:  # a callback that runs after the answer arrived must not cancel anything
                cut = True
                current.cancel()

        lost.add_done_callback(on_lost)
        failure: BaseException | None = None
        response: ModbusPDU
        try:
            call = getattr(client, function)  # pymodbus's methods carry the functions' names
            if payload is None:
                response = await call(req.address, count=req.count, device_id=self.settings.unit_id)
            else:
                value = payload[0] if function == "write_coil" else payload
                response = await call(req.address, value, device_id=self.settings.unit_id)
        except (asyncio.CancelledError, ModbusException) as err:
            failure = err
        finally:
            pending = False
            lost.remove_done_callback(on_lost)
        if failure is not None:
            await self._fail(self._where(function, req), failure, cut=cut, task=current)
        if response.isError():
            code = response.exception_code
            label = _EXCEPTION_NAMES.get(code, "UNKNOWN_EXCEPTION")
            message = f"{self._where(function, req)}: device answered {label} (Modbus exception code {code})"
            if code in _TRANSIENT_CODES:
                raise MachineError(message, device=self.device, retryable=True)
            raise MachineFault(message, device=self.device, code=code)
        return response

    async def _fail(
        self, where: str, err: BaseException, *, cut: bool, task: asyncio.Task[Any]
    ) -> NoReturn:
        """Translate a failed request into MachineError; close so no late answer is misread."""
        if isinstance(err, asyncio.CancelledError):
            if not cut:
                raise err  # shutdown or another cancellation: not ours to swallow
            if task.uncancel() > 0:
                raise err  # someone else cancelled too (shutdown): that one wins
            await self._drop()
            raise MachineError(f"{where}: connection lost", device=self.device) from None
        await self._drop()
        if isinstance(err, ModbusIOException):
            s = self.settings
            raise MachineError(
                f"{where}: no response within {s.timeout} s ({s.retries} retries)",
                device=self.device,
            ) from err
        if isinstance(err, ConnectionException):
            raise MachineError(f"{where}: not connected", device=self.device) from err
        raise MachineError(f"{where}: {err}", device=self.device) from err


def _check_raw(span: Span, raw: RawValue) -> None:
    # The wire form comes from encode(); refuse anything else rather than guess.
    if span.table in BIT_TABLES:
        if not isinstance(raw, bool):
            raise ValueError(f"{span.name}: wire value {raw!r} for a {span.table} must be a bool")
        return
    ok = (
        isinstance(raw, list | tuple)
        and len(raw) == span.count
        and all(isinstance(w, int) and not isinstance(w, bool) and 0 <= w <= 0xFFFF for w in raw)
    )
    if not ok:
        raise ValueError(f"{span.name}: wire value {raw!r} is not {span.count} register word(s)")
