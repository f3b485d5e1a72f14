"""`ebpf-apm query`: percentiles for any time range, from the windows in storage.

The windows whose start lies in [since, until) are merged per workload and operation (and
status class with --by-status) by adding their sketches (consumers/range_figures.py, which
the dashboard shares: both show the same numbers). Count, sum, min and max are exact.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime

from ebpf_apm.consumers.errors import ConsumerConfigError
from ebpf_apm.consumers.latency_store import DEFAULT_STORAGE, STORAGE_ENV, redact_url, storage_url
from ebpf_apm.consumers.name_pattern import NamePattern
from ebpf_apm.consumers.range_figures import (
    RangeFigures,
    TimeRange,
    format_ms,
    read_rows,
    summarise,
)
from ebpf_apm.kafka.connection import add_connection_arguments, connection_from_args


def table(results: Sequence[RangeFigures], *, by_status: bool) -> str:
    head = ["workload", "operation"] + (["status"] if by_status else [])
    head += ["count", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "p99.9 ms", "max ms"]
    lines = [head]
    for r in results:
        f = r.figures
        line = [r.workload, r.operation] + ([r.status_class or "-"] if by_status else [])
        line += [str(f["count"])] + [format_ms(f[k]) for k in ("p50", "p90", "p95", "p99", "p999")]
        line.append(format_ms(f["max"]))
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
        "p95, p99, p999 (ns), windows, rate_per_s, errors and error_share (5xx; null "
        "without a status); with --trace, the trace's root spans with their `children`",
    )
    parser.add_argument(
        "--trace",
        metavar="TRACE_ID",
        help="show one trace as a tree of spans with durations, read from apm.spans on Kafka "
        "(published between --since and --until) instead of storage",
    )
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """0 (also when nothing matched), 2 bad arguments, 1 storage failure."""
    span = TimeRange.parse(args.since, args.until, time.time_ns())
    if args.trace is not None:
        return show_trace(args, span)
    url = storage_url(args.storage)
    workload = NamePattern(args.workload) if args.workload else None
    operation = NamePattern(args.operation) if args.operation else None
    rows = asyncio.run(read_rows(url, span, workload))
    results = summarise(rows, by_status=args.by_status, operation=operation)
    if args.json:
        print(json.dumps([r.as_json(args.by_status) for r in results], indent=None))
        return 0
    if not results:
        between = f"{_when(span.since_ns)} and {_when(span.until_ns)}"
        print(f"no windows between {between} in {redact_url(url)}", file=sys.stderr)
        return 0
    print(table(results, by_status=args.by_status))
    return 0


def show_trace(args: argparse.Namespace, span: TimeRange) -> int:
    """0 (also when no span of the trace was found), 2 a malformed id, 1 Kafka."""
    from ebpf_apm.consumers import trace_tree, trace_view  # Kafka only when a trace is asked

    try:
        trace_id = trace_tree.parse_trace_id(args.trace)
    except ValueError as exc:
        raise ConsumerConfigError(str(exc)) from None
    connection = connection_from_args(args)
    spans = asyncio.run(
        trace_view.read_trace(
            connection, trace_id, span.since_ns // 1_000_000, span.until_ns // 1_000_000
        )
    )
    roots = trace_tree.build_tree(spans)
    if args.json:
        print(json.dumps(trace_tree.as_json(roots), default=str))
        return 0
    if not roots:
        between = f"{_when(span.since_ns)} and {_when(span.until_ns)}"
        print(f"no span of trace {trace_id} published between {between}", file=sys.stderr)
        return 0
    print(trace_tree.render(roots))
    return 0


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
