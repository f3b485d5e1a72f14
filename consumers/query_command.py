"""`ebpf-apm query`: percentiles for any time range, from the windows in storage.

The windows whose start lies in [since, until) are merged per workload and operation (and
status class with --by-status) by adding their sketches: percentiles of a range are the
percentiles of all its spans, within the sketch's relative error, never an average of the
windows' percentiles. Count, sum, min and max are exact.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ebpf_apm.consumers.errors import ConsumerConfigError, ConsumerError
from ebpf_apm.consumers.latency_sketch import LatencySketch, SketchError
from ebpf_apm.consumers.latency_store import (
    DEFAULT_STORAGE,
    QUANTILES,
    STORAGE_ENV,
    LatencyRow,
    open_store,
    redact_url,
    storage_url,
)
from ebpf_apm.consumers.name_pattern import NamePattern
from ebpf_apm.consumers.time_spec import parse_time_ns

FIGURES = ("count", "sum", "min", "max", "p50", "p90", "p95", "p99", "p999")


@dataclass(frozen=True)
class RangeFigures:
    workload: str
    operation: str
    status_class: str | None
    windows: int
    figures: dict[str, int]  # FIGURES, durations in ns

    def as_json(self, by_status: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"workload": self.workload, "operation": self.operation}
        if by_status:
            out["status_class"] = self.status_class
        out.update(self.figures)
        out["windows"] = self.windows
        return out


def summarise(rows: Sequence[LatencyRow], *, by_status: bool = False) -> list[RangeFigures]:
    """Merge the rows per workload and operation (and status class)."""
    groups: dict[tuple[str, str, str | None], list[LatencyRow]] = {}
    for row in rows:
        key = (row.workload, row.operation, row.status_class if by_status else None)
        groups.setdefault(key, []).append(row)
    out = []
    for (workload, operation, status), members in sorted(
        groups.items(), key=lambda item: (item[0][0], item[0][1], item[0][2] or "")
    ):
        sketch = LatencySketch.from_bytes(members[0].sketch)
        for row in members[1:]:
            sketch.merge(LatencySketch.from_bytes(row.sketch))
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
        out.append(RangeFigures(workload, operation, status, len(members), figures))
    return out


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.3f}" if ns < 10_000_000 else f"{ns / 1e6:.1f}"


def table(results: Sequence[RangeFigures], *, by_status: bool) -> str:
    head = ["workload", "operation"] + (["status"] if by_status else [])
    head += ["count", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "p99.9 ms", "max ms"]
    lines = [head]
    for r in results:
        f = r.figures
        line = [r.workload, r.operation] + ([r.status_class or "-"] if by_status else [])
        line += [str(f["count"])] + [_ms(f[k]) for k in ("p50", "p90", "p95", "p99", "p999")]
        line.append(_ms(f["max"]))
        lines.append(line)
    text_columns = len(head) - 7
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(
            cell.ljust(widths[i]) if i < text_columns else cell.rjust(widths[i])
            for i, cell in enumerate(line)
        ).rstrip()
        for line in lines
    )


async def query(
    url: str,
    since_ns: int,
    until_ns: int,
    workload: NamePattern | None,
    operation: NamePattern | None,
) -> list[LatencyRow]:
    store = await open_store(url, create=False)
    try:
        rows = await store.rows(
            since_ns,
            until_ns,
            workload=workload.exact if workload else None,
            operation=operation.exact if operation else None,
        )
    finally:
        await store.close()
    return [
        r
        for r in rows
        if (workload is None or workload.matches(r.workload))
        and (operation is None or operation.matches(r.operation))
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage",
        metavar="URL",
        default=None,
        help=f"where the aggregator writes (default: ${STORAGE_ENV}, else {DEFAULT_STORAGE})",
    )
    parser.add_argument("--workload", metavar="W", help="only this workload (* wildcards)")
    parser.add_argument("--operation", metavar="OP", help="only this operation (* wildcards)")
    parser.add_argument(
        "--since",
        default="15m",
        help="start: a duration ago (15m, 2h), an ISO time or epoch seconds (default: 15m)",
    )
    parser.add_argument("--until", default="now", help="end, excluded (default: now)")
    parser.add_argument(
        "--by-status", action="store_true", help="one line per HTTP status class too"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="a JSON list of objects: workload, operation, count, sum, min, max, p50, p90, "
        "p95, p99, p999 (ns), windows",
    )


def run(args: argparse.Namespace) -> int:
    """0 (also when nothing matched), 2 bad arguments, 1 storage failure."""
    now_ns = time.time_ns()
    try:
        since_ns = parse_time_ns(args.since, now_ns)
        until_ns = parse_time_ns(args.until, now_ns)
    except ValueError as exc:
        raise ConsumerConfigError(str(exc)) from exc
    if since_ns >= until_ns:
        raise ConsumerConfigError(f"--since {args.since} is not before --until {args.until}")
    url = storage_url(args.storage)
    workload = NamePattern(args.workload) if args.workload else None
    operation = NamePattern(args.operation) if args.operation else None
    try:
        rows = asyncio.run(query(url, since_ns, until_ns, workload, operation))
        results = summarise(rows, by_status=args.by_status)
    except SketchError as exc:
        raise ConsumerError(
            f"a stored window's sketch is unreadable: {exc}; was it written by ebpf-apm?"
        ) from exc
    if args.json:
        print(json.dumps([r.as_json(args.by_status) for r in results], indent=None))
        return 0
    if not results:
        span = f"{_when(since_ns)} and {_when(until_ns)}"
        print(f"no windows between {span} in {redact_url(url)}", file=sys.stderr)
        return 0
    print(table(results, by_status=args.by_status))
    return 0


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
