"""The reference PLC: a small Modbus TCP machine served by pymodbus's own server, in-process.

Memory (any unit id answers):

* holding registers 0..9 - parameters, written by the gateway;
* input registers 0..9 - the parameters as the last cycle ran them, input register 10 - cycle count;
* coil 0 - trigger, coil 1 - done (owned by the PLC: writes to it are ignored), coils 2..15 spare;
* discrete input 0 - ready (always on), discrete inputs 1..15 off.

The machine cycle: on the rising edge of coil 0 the PLC copies holding 0..9 to input 0..9, adds one
to input 10 and, ``done_delay`` seconds later, sets coil 1. Coil 0 going back to 0 clears coil 1.
Addresses outside these tables answer ILLEGAL_ADDRESS.

The memory lives in this object, not in pymodbus's datastore: the datastore's ``action`` hook,
called on every access, copies it in before a request is served and records what a write changes.
That keeps ``snapshot()`` exact and lets a restart keep the memory, as a real PLC's retentive memory
would.

Run standalone (for ``edge-agent demo --machine HOST:PORT``)::

    python -m edge_agent.sim.reference_plc --port 5020
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

from pymodbus.constants import ExcCodes
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simutils import SimUtils

TableName = Literal["coil", "discrete", "holding", "input"]

HOLDING = 10
INPUT = 11
BITS = 16
TRIGGER, DONE = 0, 1
CYCLE_COUNT = 10

# Function code -> table, as the Modbus specification assigns them.
_TABLE_OF: dict[int, TableName] = {1: "coil", 5: "coil", 15: "coil", 2: "discrete", 4: "input"}
_TABLE_OF.update(dict.fromkeys((3, 6, 16, 22, 23), "holding"))


class ReferencePlc:
    """The reference PLC. ``await start()``, talk Modbus to ``host:port``, ``await stop()``."""

    def __init__(
        self,
        *,
        done_delay: float = 0.0,
        on_request: Callable[[int, int, int, list[Any] | None], None] | None = None,
    ) -> None:
        self.done_delay = done_delay  # seconds from the trigger's rising edge to done
        #: Called with (function code, address, count, values written or None) for every request:
        #: the benchmark records the agent's exact request sequence with it.
        self.on_request = on_request
        self.host = "127.0.0.1"
        self.port = 0
        #: Function codes of every request received (e.g. ``requests[16]``: write_registers).
        self.requests: Counter[int] = Counter()
        self.cycles = 0  # rising edges of the trigger seen (equals input 10 until it wraps)
        self._memory: dict[TableName, list[Any]] = {
            "coil": [False] * BITS,
            "discrete": [True] + [False] * (BITS - 1),
            "holding": [0] * HOLDING,
            "input": [0] * INPUT,
        }
        self._server: ModbusTcpServer | None = None
        self._answering = asyncio.Event()
        self._answering.set()
        self._stopping = False
        self._done_timer: asyncio.TimerHandle | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int | None = None) -> tuple[str, int]:
        """Listen on ``host:port`` (0: a free port; None: the previous port, else a free one)."""
        if self._server is not None:
            raise RuntimeError("the reference PLC is already running")
        self._stopping = False
        self._answering.set()
        device = SimDevice(
            id=0,  # 0: answers every unit id
            simdata=(
                [SimData(0, count=BITS, values=False, datatype=DataType.BITS)],
                [SimData(0, count=BITS, values=False, datatype=DataType.BITS)],
                [SimData(0, count=HOLDING, values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=INPUT, values=0, datatype=DataType.REGISTERS)],
            ),
            action=self._action,
        )
        server = ModbusTcpServer(
            device,
            address=(host, self.port if port is None else port),
            trace_pdu=self._trace_pdu,
        )
        self.host, self.port = await listen(server, f"the reference PLC on {host}:{port}")
        self._server = server
        return self.host, self.port

    async def stop(self) -> None:
        """Stop listening and drop every connection, as a PLC that is switched off."""
        server, self._server = self._server, None
        self._stopping = True
        self._answering.set()  # release stalled requests; they answer nothing (see _action)
        self._cancel_done()
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]
            await asyncio.sleep(0)  # let the transports run their connection_lost callbacks

    async def restart(self) -> None:
        """Stop and start again on the same port; the memory is kept."""
        await self.stop()
        await self.start(self.host, self.port)

    @property
    def running(self) -> bool:
        return self._server is not None

    def set_unreachable(self, unreachable: bool = True) -> None:
        """Keep connections open but stop answering (a PLC hung mid-cycle); False answers again."""
        if unreachable:
            self._answering.clear()
        else:
            self._answering.set()

    def drop_connections(self) -> None:
        """Close every client connection but keep listening (a PLC that rebooted its stack)."""
        if self._server is not None:
            for connection in list(self._server.active_connections.values()):
                connection.close()

    # -- inspection ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, list[Any]]:
        """A copy of the memory: ``{"coil": [...], "discrete": [...], "holding": [...], "input": [...]}``."""
        return {table: list(values) for table, values in self._memory.items()}

    def poke(self, table: TableName, address: int, values: list[Any]) -> None:
        """Set memory directly, as the PLC's own program would (e.g. a result or a fault code)."""
        memory = self._memory[table]
        if address < 0 or address + len(values) > len(memory):
            raise IndexError(
                f"{table} {address}..{address + len(values) - 1} is outside 0..{len(memory) - 1}"
            )
        memory[address : address + len(values)] = values

    # -- the machine --------------------------------------------------------------------------

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.requests[pdu.function_code] += 1
            if self.on_request is not None:
                fc = pdu.function_code
                values: list[Any] | None = None
                if fc in (5, 15):
                    values = [bool(b) for b in pdu.bits[: max(1, pdu.count)]]
                elif fc in (6, 16):
                    values = list(pdu.registers)
                self.on_request(fc, pdu.address, pdu.count, values)
        return pdu

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        # Called by pymodbus before it serves a request (for a write: before it stores the values).
        if not self._answering.is_set():
            await self._answering.wait()
        if self._stopping:
            return ExcCodes.DEVICE_FAILURE  # the answer goes nowhere: the connection is closed
        table = _TABLE_OF[function_code]
        memory = self._memory[table]
        if set_values is not None:
            if table == "coil":
                self._write_coils(address, [bool(v) for v in set_values])
                # Done belongs to the PLC: make pymodbus store what the PLC decided.
                for i in range(len(set_values)):
                    if address + i == DONE:
                        set_values[i] = memory[DONE]
            else:
                memory[address : address + len(set_values)] = [int(v) for v in set_values]
        # Copy the memory in; pymodbus serves the request from ``registers``.
        if table in ("coil", "discrete"):
            words = SimUtils.bitsToRegisters(list(memory))
        else:
            words = list(memory)
        registers[: len(words)] = words
        return None

    def _write_coils(self, address: int, values: list[bool]) -> None:
        coils = self._memory["coil"]
        was = coils[TRIGGER]
        for i, value in enumerate(values):
            if address + i != DONE:
                coils[address + i] = value
        now = coils[TRIGGER]
        if now and not was:
            self._run_cycle()
        elif was and not now:
            self._cancel_done()
            coils[DONE] = False

    def _run_cycle(self) -> None:
        holding, inputs = self._memory["holding"], self._memory["input"]
        inputs[:HOLDING] = holding
        inputs[CYCLE_COUNT] = (inputs[CYCLE_COUNT] + 1) & 0xFFFF
        self.cycles += 1
        if self.done_delay <= 0:
            self._set_done()
        else:
            self._cancel_done()
            self._done_timer = asyncio.get_running_loop().call_later(
                self.done_delay, self._set_done
            )

    def _set_done(self) -> None:
        self._done_timer = None
        if self._memory["coil"][TRIGGER]:
            self._memory["coil"][DONE] = True

    def _cancel_done(self) -> None:
        if self._done_timer is not None:
            self._done_timer.cancel()
            self._done_timer = None


async def listen(server: ModbusTcpServer, what: str) -> tuple[str, int]:
    """Start ``server`` in the background; the address it listens on (port 0: the one it got)."""
    await server.serve_forever(background=True)
    sockets = getattr(server.transport, "sockets", None)
    if not sockets:
        raise RuntimeError(f"{what} could not listen")
    host, port = sockets[0].getsockname()[:2]
    return str(host), int(port)


async def _serve(host: str, port: int, done_delay: float) -> None:
    plc = ReferencePlc(done_delay=done_delay)
    host, port = await plc.start(host, port)
    print(
        f"reference PLC listening on {host}:{port} (Modbus TCP, any unit id); Ctrl-C stops",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # not on Windows
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await plc.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m edge_agent.sim.reference_plc", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, default=5020, help="TCP port (default 5020, 0: any free)"
    )
    parser.add_argument(
        "--done-delay", type=float, default=0.0, help="seconds from trigger to done (default 0)"
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, args.done_delay))


if __name__ == "__main__":
    main()
