"""Which Modbus requests to send for a set of points: grouping and merging, without I/O.

Each point occupies ``count`` consecutive addresses of one table. Points of a table are sorted by
address and merged into as few requests as the protocol allows:

* writes merge only **strictly contiguous** points: a request never covers an address that was not
  asked to be written, so no register outside the step is ever touched;
* reads may also bridge gaps of up to ``max_gap`` unused addresses (reading a few registers too many
  is cheaper than another round trip, but only the caller knows whether the device allows it).

Limits per request come from the Modbus specification (function codes 1-4, 15, 16).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Table = Literal["holding", "input", "coil", "discrete"]

BIT_TABLES: frozenset[str] = frozenset({"coil", "discrete"})

#: Registers go before bits: a trigger coil written in the same call as its parameters goes last.
TABLE_ORDER: tuple[Table, ...] = ("holding", "input", "coil", "discrete")

MAX_READ_REGISTERS = 125  # FC3/FC4
MAX_READ_BITS = 2000  # FC1/FC2
MAX_WRITE_REGISTERS = 123  # FC16
MAX_WRITE_BITS = 1968  # FC15


@dataclass(frozen=True)
class Span:
    """Where one point lives: ``count`` addresses of ``table`` from ``address``."""

    name: str
    table: Table
    address: int
    count: int

    @property
    def end(self) -> int:
        """One past the last address."""
        return self.address + self.count


@dataclass(frozen=True)
class Request:
    """One Modbus request covering ``count`` addresses from ``address``, and the points in it."""

    table: Table
    address: int
    count: int
    spans: tuple[Span, ...]

    def offset(self, span: Span) -> int:
        """Where ``span``'s first word/bit sits in this request's data."""
        return span.address - self.address


def plan_reads(
    spans: Iterable[Span],
    *,
    max_gap: int = 0,
    max_registers: int = MAX_READ_REGISTERS,
    max_bits: int = MAX_READ_BITS,
) -> list[Request]:
    """Requests that read every span; gaps of up to ``max_gap`` addresses are read through."""
    if max_gap < 0:
        raise ValueError("max_gap must be >= 0")
    return _plan(spans, max_gap, max_registers, max_bits, overlap_ok=True)


def plan_writes(
    spans: Iterable[Span],
    *,
    max_registers: int = MAX_WRITE_REGISTERS,
    max_bits: int = MAX_WRITE_BITS,
) -> list[Request]:
    """Requests that write every span; only strictly contiguous spans share a request.

    Raises ValueError when two spans overlap: the outcome would depend on the order of writes.
    """
    return _plan(spans, 0, max_registers, max_bits, overlap_ok=False)


def _plan(
    spans: Iterable[Span], max_gap: int, max_registers: int, max_bits: int, *, overlap_ok: bool
) -> list[Request]:
    by_table: dict[Table, list[Span]] = {}
    for span in spans:
        if span.count < 1:
            raise ValueError(f"{span.name}: count must be >= 1")
        by_table.setdefault(span.table, []).append(span)

    requests: list[Request] = []
    for table in sorted(by_table, key=TABLE_ORDER.index):
        limit = max_bits if table in BIT_TABLES else max_registers
        ordered = sorted(by_table[table], key=lambda s: (s.address, s.count, s.name))
        group: list[Span] = []
        start = end = 0
        for span in ordered:
            if span.count > limit:
                raise ValueError(
                    f"{span.name}: {span.count} addresses do not fit one request (limit {limit})"
                )
            if group and span.address < end and not overlap_ok:
                raise ValueError(
                    f"{span.name} overlaps {group[-1].name} at {table} address {span.address}"
                )
            fits = group and span.address <= end + max_gap and max(end, span.end) - start <= limit
            if fits:
                group.append(span)
                end = max(end, span.end)
                continue
            if group:
                requests.append(Request(table, start, end - start, tuple(group)))
            group, start, end = [span], span.address, span.end
        if group:
            requests.append(Request(table, start, end - start, tuple(group)))
    return requests
