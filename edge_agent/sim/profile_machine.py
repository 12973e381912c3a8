"""A Modbus machine that serves exactly the registers a firmware profile names.

For machine models the reference PLC does not speak (e.g. ``acme-press-x200-fw3``): the tables are
sized from the profile's points, the handshake's first ``set`` point is the trigger, its first
``wait ... equals: true`` point is done, its ``read_error`` point reads 0. On the trigger's rising
edge the machine copies parameters into results (``ECHO``), counts the cycle and, after
``done_delay``, sets done; the trigger going back to 0 clears done. Values are encoded with the
agent's own register codec, so word and byte order are the profile's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simutils import SimUtils

from ..machine import codec
from ..machine.modbus import ModbusPoint
from ..machine.profile import Profile
from ..machine.steps import ReadError, SetPoint, WaitFor
from .reference_plc import listen

#: Per profile: result point <- parameter point copied at the cycle's start, and the cycle counter.
ECHO: dict[str, tuple[dict[str, str], str | None, dict[str, Any]]] = {
    "acme-press-x200-fw3": (
        {"peak_force": "press_force", "final_position": "stroke_offset", "cycle_time": "hold_time"},
        "press_count",
        {"firmware": "3.2.1"},
    ),
}

_TABLE_OF = {1: "coil", 5: "coil", 15: "coil", 2: "discrete", 4: "input"}
_TABLE_OF.update(dict.fromkeys((3, 6, 16, 22, 23), "holding"))
_ORDER = ("coil", "discrete", "holding", "input")


class ProfileMachine:
    """``await start()``, talk Modbus to ``host:port`` as the profile says, ``await stop()``."""

    def __init__(self, profile: Profile, *, done_delay: float = 0.0) -> None:
        if profile.driver != "modbus":
            raise ValueError(f"profile {profile.name} is for {profile.driver}, not modbus")
        self.profile = profile
        self.done_delay = done_delay
        self.cycles = 0
        self.points: dict[str, ModbusPoint] = {
            name: p for name, p in profile.points.items() if isinstance(p, ModbusPoint)
        }
        steps = profile.handshake
        self.trigger = next(s.set for s in steps if isinstance(s, SetPoint))
        self.done = next(s.wait for s in steps if isinstance(s, WaitFor) and s.equals is True)
        self.error = next((s.read_error for s in steps if isinstance(s, ReadError)), None)
        self.echo, self.counter, constants = ECHO.get(profile.name, ({}, None, {}))
        self.busy = "busy" if "busy" in self.points else None
        self.memory: dict[str, list[Any]] = {}
        for table in _ORDER:
            size = max(
                (p.address + p.registers for p in self.points.values() if p.table == table),
                default=1,
            )
            if table in ("coil", "discrete"):
                size = -(-size // 16) * 16  # pymodbus packs bits into whole registers
            self.memory[table] = [False if table in ("coil", "discrete") else 0] * size
        for name, value in constants.items():
            self.put(name, value)
        self.host, self.port = "127.0.0.1", 0
        self._server: ModbusTcpServer | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- values -------------------------------------------------------------------------------

    def get(self, name: str) -> Any:
        p = self.points[name]
        memory = self.memory[p.table]
        if p.table in ("coil", "discrete"):
            return memory[p.address]
        return codec.decode(p.register_format(), memory[p.address : p.address + p.registers], name)

    def put(self, name: str, value: Any) -> None:
        p = self.points[name]
        memory = self.memory[p.table]
        if p.table in ("coil", "discrete"):
            memory[p.address] = bool(value)
        else:
            memory[p.address : p.address + p.registers] = codec.encode(
                p.register_format(), value, name
            )

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        def table(t: str) -> list[SimData]:
            bits = t in ("coil", "discrete")
            return [
                SimData(
                    0,
                    count=len(self.memory[t]),
                    values=False if bits else 0,
                    datatype=DataType.BITS if bits else DataType.REGISTERS,
                )
            ]

        simdata = (table("coil"), table("discrete"), table("holding"), table("input"))
        device = SimDevice(id=0, simdata=simdata, action=self._action)
        server = ModbusTcpServer(device, address=(host, port))
        self.host, self.port = await listen(server, f"machine {self.profile.name} on {host}:{port}")
        self._server = server
        return self.host, self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if self._timer is not None:
            self._timer.cancel()
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]

    # -- the machine --------------------------------------------------------------------------

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        table = _TABLE_OF[function_code]
        memory = self.memory[table]
        if address + count > len(memory):
            return ExcCodes.ILLEGAL_ADDRESS
        if set_values is not None:
            was = self.get(self.trigger)
            if table == "coil":
                memory[address : address + len(set_values)] = [bool(v) for v in set_values]
            else:
                memory[address : address + len(set_values)] = [int(v) for v in set_values]
            now = self.get(self.trigger)
            if now and not was:
                self._run_cycle()
            elif was and not now:
                self._finish(False)
        words = SimUtils.bitsToRegisters(list(memory)) if table in ("coil", "discrete") else memory
        registers[: len(words)] = words
        return None

    def _run_cycle(self) -> None:
        self.cycles += 1
        for result, parameter in self.echo.items():
            self.put(result, self.get(parameter))
        if self.counter:
            self.put(self.counter, (int(self.get(self.counter)) + 1) & 0xFFFFFFFF)
        if self.error:
            self.put(self.error, 0)
        if self.busy:
            self.put(self.busy, True)
        if self.done_delay <= 0:
            self._finish(True)
        else:
            self._timer = asyncio.get_running_loop().call_later(self.done_delay, self._finish, True)

    def _finish(self, done: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.busy:
            self.put(self.busy, False)
        self.put(self.done, done and bool(self.get(self.trigger)))
