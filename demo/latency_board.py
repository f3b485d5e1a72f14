"""The demo's live view: per-route latency of the newest window the aggregator closed, and
the last calls the join published.

Fed with events as `ebpf-apm tail --json` prints them:
- rows of apm.latency, one per series and closed window. Count, p50, p90 and p99 are shown
  as the aggregator published them (read off its sketches); nothing here recomputes them.
- joined spans of apm.spans: the ticker of the last calls, and the time of the newest, which
  tells when the aggregator has closed the window of the last call.

Pure: times are arguments, rendering returns lines.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

# (workload, operation, status class): a series as apm.latency names it
SeriesId = tuple[str, str, str | None]


def ms(ns: int) -> str:
    return f"{ns / 1e6:.3f}" if ns < 10_000_000 else f"{ns / 1e6:.1f}"


def clock(ns: int, millis: bool = False) -> str:
    text = time.strftime("%H:%M:%S", time.localtime(ns / 1e9))
    return f"{text}.{ns // 1_000_000 % 1000:03d}" if millis else text


@dataclass
class LatencyBoard:
    window_ns: int
    ticker_size: int = 4
    # window start -> series -> the apm.latency row (a replay overwrites with the same)
    windows: dict[int, dict[SeriesId, dict[str, Any]]] = field(default_factory=dict)
    recent: deque[dict[str, Any]] = field(default_factory=deque)
    spans: int = 0
    last_span_end_ns: int = 0
    last_span_seen: float = 0.0  # monotonic seconds
    last_row_seen: float = 0.0
    # The slowest request of the run (a server span with a trace id): the demo shows its tree.
    slowest_trace: tuple[int, str] | None = None

    # -- input ----------------------------------------------------------------------------

    def add_latency(self, row: dict[str, Any], now: float) -> None:
        key = (row["workload"], row["operation"], row["status_class"])
        self.windows.setdefault(row["window_start_ns"], {})[key] = row
        self.last_row_seen = now

    def add_span(self, span: dict[str, Any], now: float) -> None:
        self.spans += 1
        self.last_span_end_ns = max(self.last_span_end_ns, span["end_ns"])
        self.last_span_seen = now
        trace_id = span.get("trace_id")
        slowest = self.slowest_trace
        if (
            span.get("span_kind") == "server"
            and trace_id
            and (slowest is None or span["duration_ns"] > slowest[0])
        ):
            self.slowest_trace = (span["duration_ns"], trace_id)
        if span.get("http_method") is not None and span.get("span_kind") != "client":
            self.recent.append(span)
            while len(self.recent) > self.ticker_size:
                self.recent.popleft()

    # -- reading --------------------------------------------------------------------------

    @property
    def newest_window(self) -> int | None:
        return max(self.windows) if self.windows else None

    def table(self, start: int | None = None) -> list[str]:
        """The window's series (every series seen so far; `-` where the window had none)."""
        start = self.newest_window if start is None else start
        if start is None:
            return []
        rows = self.windows[start]
        known = sorted(
            {key for window in self.windows.values() for key in window},
            key=lambda k: (k[0], k[2] is None, k[1], k[2] or ""),  # routes, then functions
        )
        names = max(len("workload"), *(len(w) for w, _, _ in known)) + 1
        width = max(len("operation"), *(len(op) for _, op, _ in known)) + 1
        lines = [
            f"{'workload':<{names}}{'operation':<{width}}{'class':<6}{'count':>6}{'p50 ms':>8}"
            f"{'p90 ms':>8}{'p99 ms':>8}{'max ms':>8}"
        ]
        for key in known:
            workload, op, status = key
            row = rows.get(key)
            line = f"{workload:<{names}}{op:<{width}}{status or '-':<6}"
            if row is None:
                lines.append(f"{line}{0:>6}" + f"{'-':>8}" * 4)
                continue
            figures = (ms(row[name]) for name in ("p50", "p90", "p99", "max"))
            lines.append(f"{line}{row['count']:>6}" + "".join(f"{f:>8}" for f in figures))
        return lines

    def title(self, start: int | None = None) -> str:
        start = self.newest_window if start is None else start
        if start is None:
            return "waiting for the aggregator to close its first window ..."
        return (
            f"window {clock(start)}-{clock(start + self.window_ns)}, "
            f"closed by the aggregator ({len(self.windows)} so far)"
        )

    def ticker(self) -> list[str]:
        out = []
        for span in self.recent:
            out.append(
                f"  {clock(span['end_ns'], millis=True)}  {span['http_method']} "
                f"{span['http_path']:<16} {span['http_status']}  "
                f"{ms(span['duration_ns']):>7} ms  goroutine {span['goid']}"
            )
        return out
