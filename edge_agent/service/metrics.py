"""Prometheus text format (version 0.0.4), written by hand.

The daemon's figures are few and mostly read at scrape time from the components that hold them;
only cycles are counted here (by status and reason, and their durations by phase). A client
library would add about 1.6 MiB of resident memory for what fits in this file.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Mapping

from ..station.report import CycleReport

#: Upper bounds (seconds) of the duration histograms: a tag read in a millisecond up to a press
#: cycle of a minute.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Histogram:
    __slots__ = ("counts", "sum", "total")

    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)  # per bucket, not cumulative (made so when rendered)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(BUCKETS, value)
        if i < len(BUCKETS):
            self.counts[i] += 1
        self.total += 1
        self.sum += value


class CycleMetrics:
    """Counts every cycle report, paused refusals included. Bounded: reasons are stable codes."""

    def __init__(self) -> None:
        self.cycles: dict[tuple[str, str], int] = {}
        self.durations: dict[str, Histogram] = {}

    def observe(self, report: CycleReport) -> None:
        key = (report.status.value, report.reason.value if report.reason is not None else "")
        self.cycles[key] = self.cycles.get(key, 0) + 1
        for phase, ms in report.durations_ms.items():
            if phase in self.durations or len(self.durations) < 32:  # phases are a fixed few
                self.durations.setdefault(phase, Histogram()).observe(ms / 1000)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return repr(value) if isinstance(value, float) else str(value)


class Writer:
    """Collects metric families and renders them, each HELP and TYPE once."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_: str,
        samples: Iterable[tuple[Mapping[str, str], float]],
    ) -> None:
        if kind == "counter":  # format 0.0.4: HELP, TYPE and samples share the _total name
            name += "_total"
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def histogram(self, name: str, help_: str, by: str, hists: Mapping[str, Histogram]) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} histogram")
        for key, h in sorted(hists.items()):
            running = 0
            for bound, count in zip(BUCKETS, h.counts, strict=True):
                running += count
                self.lines.append(f'{name}_bucket{{{by}="{_escape(key)}",le="{bound}"}} {running}')
            self.lines.append(f'{name}_bucket{{{by}="{_escape(key)}",le="+Inf"}} {h.total}')
            self.lines.append(f'{name}_sum{{{by}="{_escape(key)}"}} {_number(round(h.sum, 6))}')
            self.lines.append(f'{name}_count{{{by}="{_escape(key)}"}} {h.total}')

    def text(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()


def resident_bytes() -> int | None:
    """The process's resident memory (Linux), or None where /proc is not there."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
