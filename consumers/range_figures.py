"""The figures of a time range, from the stored windows: what `ebpf-apm query` prints and
what `ebpf-apm dashboard` shows, computed here once so the two can never differ.

    store.rows(since, until) -> summarise -> RangeFigures per operation
                             -> window_points -> one WindowPoint per window of one operation

The windows whose start lies in [since, until) are merged per workload and operation (and
status class with `by_status`) by adding their sketches: percentiles of a range are the
percentiles of all its spans, within the sketch's relative error, never an average of the
windows' percentiles. Count, sum, min and max are exact. Rate is calls per second of the
workload's stored time in the range (its first window's start to its last window's end: a
range that reaches past the stored data does not dilute it); error share is the share of
calls answered with a 5xx status, for operations that have one (None for functions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ebpf_apm.consumers.errors import ConsumerConfigError, ConsumerError
from ebpf_apm.consumers.latency_sketch import LatencySketch, SketchError
from ebpf_apm.consumers.latency_store import QUANTILES, LatencyRow, open_store
from ebpf_apm.consumers.name_pattern import NamePattern
from ebpf_apm.consumers.time_spec import parse_time_ns

FIGURES = ("count", "sum", "min", "max", "p50", "p90", "p95", "p99", "p999")
ERROR_CLASSES = frozenset({"5xx"})  # a 4xx is the client's mistake, not the service's


def format_ms(ns: int) -> str:
    """A duration in ms as the query table and the dashboard print it."""
    return f"{ns / 1e6:.3f}" if ns < 10_000_000 else f"{ns / 1e6:.1f}"


@dataclass(frozen=True)
class TimeRange:
    """[since_ns, until_ns), Unix epoch ns."""

    since_ns: int
    until_ns: int

    @classmethod
    def parse(cls, since: str, until: str, now_ns: int) -> TimeRange:
        """From the command line's spelling (`15m`, `now`, ISO, epoch seconds); `now_ns` is
        the time both are relative to. ConsumerConfigError if bad or empty."""
        try:
            span = cls(parse_time_ns(since, now_ns), parse_time_ns(until, now_ns))
        except ValueError as exc:
            raise ConsumerConfigError(str(exc)) from exc
        if span.since_ns >= span.until_ns:
            raise ConsumerConfigError(f"since {since} is not before until {until}")
        return span


@dataclass(frozen=True)
class RangeFigures:
    workload: str
    operation: str
    status_class: str | None
    windows: int
    figures: dict[str, int]  # FIGURES, durations in ns
    errors: int | None  # calls answered with a 5xx; None when the operation has no status
    rate_per_s: float

    @property
    def error_share(self) -> float | None:
        if self.errors is None:
            return None
        return self.errors / self.figures["count"] if self.figures["count"] else 0.0

    def as_json(self, by_status: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"workload": self.workload, "operation": self.operation}
        if by_status:
            out["status_class"] = self.status_class
        out.update(self.figures)
        out["windows"] = self.windows
        out["rate_per_s"] = self.rate_per_s
        out["errors"] = self.errors
        out["error_share"] = self.error_share
        return out


@dataclass(frozen=True)
class WindowPoint:
    """One stored window of one operation, its status classes merged."""

    start_ns: int
    end_ns: int
    sketch: LatencySketch
    p50: int
    p90: int
    p99: int


def merged_sketch(rows: Sequence[LatencyRow]) -> LatencySketch:
    """The sketch of every span of the rows (at least one); ConsumerError if one is unreadable."""
    try:
        sketch = LatencySketch.from_bytes(rows[0].sketch)
        for row in rows[1:]:
            sketch.merge(LatencySketch.from_bytes(row.sketch))
    except SketchError as exc:
        raise ConsumerError(
            f"a stored window's sketch is unreadable: {exc}; was it written by ebpf-apm?"
        ) from exc
    return sketch


def summarise(
    rows: Sequence[LatencyRow],
    *,
    by_status: bool = False,
    operation: NamePattern | None = None,
) -> list[RangeFigures]:
    """Merge the rows per workload and operation (and status class), sorted by those.

    `rows` are all the stored windows of the range of each workload shown: a workload's rate
    is per second of its stored time, from the start of its first window in the range to the
    end of its last, whichever operations are shown (`operation` picks those)."""
    stored: dict[str, tuple[int, int]] = {}
    groups: dict[tuple[str, str, str | None], list[LatencyRow]] = {}
    for row in rows:
        first, last = stored.get(row.workload, (row.window_start_ns, row.window_end_ns))
        stored[row.workload] = (min(first, row.window_start_ns), max(last, row.window_end_ns))
        if operation is None or operation.matches(row.operation):
            key = (row.workload, row.operation, row.status_class if by_status else None)
            groups.setdefault(key, []).append(row)
    out = []
    for (workload, op, status), members in sorted(
        groups.items(), key=lambda item: (item[0][0], item[0][1], item[0][2] or "")
    ):
        sketch = merged_sketch(members)
        p50, p90, p95, p99, p999 = sketch.quantile_ns(QUANTILES)
        figures = {
            "count": sketch.count,
            "sum": sketch.sum,
            "min": sketch.min,
            "max": sketch.max,
            "p50": p50,
            "p90": p90,
            "p95": p95,
            "p99": p99,
            "p999": p999,
        }
        has_status = any(r.status_class is not None for r in members)
        errors = sum(r.count for r in members if r.status_class in ERROR_CLASSES)
        windows = len({r.window_start_ns for r in members})
        first, last = stored[workload]
        out.append(
            RangeFigures(
                workload,
                op,
                status,
                windows,
                figures,
                errors if has_status else None,
                sketch.count / ((last - first) / 1e9),
            )
        )
    return out


def window_points(rows: Sequence[LatencyRow]) -> list[WindowPoint]:
    """One point per stored window of the rows (one operation's), by start time."""
    by_start: dict[int, list[LatencyRow]] = {}
    for row in rows:
        by_start.setdefault(row.window_start_ns, []).append(row)
    out = []
    for start in sorted(by_start):
        members = by_start[start]
        sketch = merged_sketch(members)
        p50, p90, p99 = sketch.quantile_ns((0.5, 0.9, 0.99))
        out.append(WindowPoint(start, max(r.window_end_ns for r in members), sketch, p50, p90, p99))
    return out


async def read_rows(
    url: str, span: TimeRange, workload: NamePattern | None = None
) -> list[LatencyRow]:
    """The stored windows of the range, of the workloads that match (all their operations:
    `summarise` picks those); StorageError if the storage cannot be read."""
    store = await open_store(url, create=False)
    try:
        rows = await store.rows(
            span.since_ns, span.until_ns, workload=workload.exact if workload else None
        )
    finally:
        await store.close()
    return [r for r in rows if workload is None or workload.matches(r.workload)]
