"""The one interface every machine driver implements; the station cycle knows no other.

A driver is found by the name a firmware profile gives (``driver: modbus``), see ``registry.py``.
Encoding is pure and happens before any I/O, so every value of a step is checked against the
profile (type, scale, limits) before the first byte goes to the machine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

RawValue = Any  # driver-specific wire form: Modbus register words or bools, an OPC UA Variant, ...


class MachineDriver(ABC):
    """A connection to one machine, addressed through the points of one firmware profile."""

    #: A short human name for logs and errors, e.g. "modbus 10.0.0.5:502 unit 1".
    device: str

    @abstractmethod
    async def connect(self) -> None:
        """Open the connection; raise MachineError when the machine cannot be reached."""

    @abstractmethod
    async def close(self) -> None:
        """Close the connection. Never raises."""

    @property
    @abstractmethod
    def connected(self) -> bool: ...

    @abstractmethod
    def encode(self, point: str, value: Any) -> RawValue:
        """Turn an engineering value into the wire form of ``point``. Pure, no I/O.

        Raises ValueError with a message naming the point when the value does not fit the type.
        """

    @abstractmethod
    def raw_for_report(self, raw: RawValue) -> Any:
        """A JSON-serialisable rendering of an encoded value (e.g. the list of register words)."""

    @abstractmethod
    async def write(self, values: Mapping[str, RawValue]) -> None:
        """Write encoded values in as few requests as the protocol allows."""

    @abstractmethod
    async def read(self, points: Sequence[str]) -> dict[str, Any]:
        """Read points and return engineering values, in as few requests as the protocol allows."""

    @abstractmethod
    async def wait_until(self, point: str, expected: Any, timeout: float) -> None:
        """Return once ``point`` equals ``expected``; raise MachineFault after ``timeout`` s."""
