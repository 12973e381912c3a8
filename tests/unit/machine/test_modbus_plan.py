"""The Modbus request planner: grouping, merging, limits, gaps. No I/O."""

from __future__ import annotations

import pytest

from edge_agent.machine.modbus_plan import Request, Span, plan_reads, plan_writes


def regs(*spans: tuple[str, int, int], table: str = "holding") -> list[Span]:
    return [Span(name, table, address, count) for name, address, count in spans]  # type: ignore[arg-type]


def shape(requests: list[Request]) -> list[tuple[str, int, int, list[str]]]:
    return [(r.table, r.address, r.count, [s.name for s in r.spans]) for r in requests]


def test_contiguous_points_merge_into_one_request_in_address_order() -> None:
    spans = regs(("c", 3, 2), ("a", 0, 1), ("b", 1, 2), ("d", 5, 1))
    for plan in (plan_writes, plan_reads):
        assert shape(plan(spans)) == [("holding", 0, 6, ["a", "b", "c", "d"])]


def test_writes_split_at_any_gap() -> None:
    spans = regs(("a", 0, 1), ("b", 2, 1), ("c", 3, 1))
    assert shape(plan_writes(spans)) == [
        ("holding", 0, 1, ["a"]),
        ("holding", 2, 2, ["b", "c"]),
    ]


def test_reads_split_at_gaps_unless_bridged() -> None:
    spans = regs(("a", 0, 1), ("b", 3, 1), ("c", 10, 2))
    assert shape(plan_reads(spans)) == [
        ("holding", 0, 1, ["a"]),
        ("holding", 3, 1, ["b"]),
        ("holding", 10, 2, ["c"]),
    ]
    assert shape(plan_reads(spans, max_gap=2)) == [
        ("holding", 0, 4, ["a", "b"]),
        ("holding", 10, 2, ["c"]),
    ]
    assert shape(plan_reads(spans, max_gap=6)) == [("holding", 0, 12, ["a", "b", "c"])]


def test_request_offsets_locate_each_point() -> None:
    (request,) = plan_reads(regs(("a", 100, 2), ("b", 104, 1)), max_gap=2)
    a, b = request.spans
    assert (request.offset(a), request.offset(b)) == (0, 4)


def test_tables_never_share_a_request_and_registers_come_before_bits() -> None:
    spans = [
        Span("trigger", "coil", 0, 1),
        Span("p0", "holding", 0, 1),
        Span("r0", "input", 1, 1),
        Span("ready", "discrete", 0, 1),
        Span("p1", "holding", 1, 1),
    ]
    assert shape(plan_reads(spans)) == [
        ("holding", 0, 2, ["p0", "p1"]),
        ("input", 1, 1, ["r0"]),
        ("coil", 0, 1, ["trigger"]),
        ("discrete", 0, 1, ["ready"]),
    ]


def test_write_limit_is_123_registers() -> None:
    spans = regs(*[(f"r{i}", i, 1) for i in range(250)])
    plan = plan_writes(spans)
    assert [(r.address, r.count) for r in plan] == [(0, 123), (123, 123), (246, 4)]


def test_read_limit_is_125_registers() -> None:
    spans = regs(*[(f"r{i}", i, 1) for i in range(250)])
    plan = plan_reads(spans)
    assert [(r.address, r.count) for r in plan] == [(0, 125), (125, 125)]


def test_a_multi_register_point_is_never_split_across_requests() -> None:
    # 61 two-register values: 122 registers fit, the 62nd would make 124 > 123.
    spans = regs(*[(f"f{i}", 2 * i, 2) for i in range(62)])
    plan = plan_writes(spans)
    assert [(r.address, r.count) for r in plan] == [(0, 122), (122, 2)]


def test_bit_limits() -> None:
    coils = [Span(f"c{i}", "coil", i, 1) for i in range(2100)]
    assert [(r.address, r.count) for r in plan_writes(coils)] == [(0, 1968), (1968, 132)]
    assert [(r.address, r.count) for r in plan_reads(coils)] == [(0, 2000), (2000, 100)]


def test_gap_bridging_respects_the_limit() -> None:
    spans = regs(("a", 0, 1), ("b", 124, 1), ("c", 126, 1))
    assert shape(plan_reads(spans, max_gap=200)) == [
        ("holding", 0, 125, ["a", "b"]),
        ("holding", 126, 1, ["c"]),
    ]


def test_overlapping_writes_are_refused_overlapping_reads_share() -> None:
    spans = regs(("whole", 0, 2), ("low_word", 1, 1))
    with pytest.raises(ValueError, match="low_word overlaps whole at holding address 1"):
        plan_writes(spans)
    assert shape(plan_reads(spans)) == [("holding", 0, 2, ["whole", "low_word"])]


def test_too_large_point_is_refused() -> None:
    with pytest.raises(ValueError, match="big: 126 addresses do not fit one request"):
        plan_reads(regs(("big", 0, 126)))


def test_empty_plan() -> None:
    assert plan_reads([]) == []
    assert plan_writes([]) == []


def test_negative_gap_is_refused() -> None:
    with pytest.raises(ValueError, match="max_gap"):
        plan_reads([], max_gap=-1)
