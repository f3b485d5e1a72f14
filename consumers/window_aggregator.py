"""Spans -> closed tumbling event-time windows of latency per series (pure; no clock, no I/O).

A span belongs to the window [start, start + window) that holds its event time (epoch ns;
windows are aligned to the epoch, so every run cuts the same windows). The watermark is
the largest event time seen minus the allowed lateness; a window closes once the watermark
reaches its end, that is once a span has been seen `allowed lateness` past it. A span whose
window has already closed is late: it is counted and left out.

When the input goes quiet the watermark would stall and hold the last window open. The
caller passes the wall clock (`advance_idle(now_ns)`) when it has nothing left to read;
after `idle_timeout_ns` without input, the watermark moves on as if event time had followed
the wall clock since the last span arrived.

One span from a node whose clock runs far ahead would move the watermark past everyone
else's windows; with `max_future_ns`, spans whose event time is further than that past
their arrival (wall clock) are counted and left out instead, and event time never runs
ahead of the arrival for the watermark.

For offset commits the aggregator remembers, per open window, the lowest position (Kafka
offset) each source (partition) contributed: replaying every source from
`safe_positions()` rebuilds all open windows. After a restart, pass the stored watermark:
windows that end at or before it are closed, and their spans count as late.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ebpf_apm.consumers.latency_sketch import (
    DEFAULT_RELATIVE_ACCURACY,
    LatencySketch,
    bucket_indices,
)

_NO_POSITION = np.iinfo(np.int64).max


@dataclass(frozen=True)
class ClosedWindow:
    series_id: int
    start_ns: int
    end_ns: int
    sketch: LatencySketch  # also holds the exact count, sum, min and max


@dataclass
class AggregatorStats:
    spans: int = 0  # accepted into a window
    late: int = 0  # left out: their window had closed
    future: int = 0  # left out: event time too far past their arrival (a clock ahead)
    negative: int = 0  # durations below zero, counted as 0
    windows_closed: int = 0


class _OpenWindow:
    """Per-series figures and bucket counts of one window, as growable arrays."""

    def __init__(self) -> None:
        self.row_of = np.full(0, -1, dtype=np.int64)  # series id -> row
        self.series = np.zeros(0, dtype=np.int64)  # row -> series id
        self.rows = 0
        self.count = np.zeros(0, dtype=np.int64)
        self.total = np.zeros(0, dtype=np.int64)
        self.min = np.zeros(0, dtype=np.int64)
        self.max = np.zeros(0, dtype=np.int64)
        self.zeros = np.zeros(0, dtype=np.int64)
        self.buckets = np.zeros((0, 0), dtype=np.int64)  # row x (bucket - lo)
        self.lo = 0
        self.positions: dict[int, int] = {}  # source -> lowest position seen

    def _rows_for(self, series: np.ndarray) -> np.ndarray:
        top = int(series.max()) + 1
        if top > self.row_of.size:
            grown = np.full(max(top, 2 * self.row_of.size), -1, dtype=np.int64)
            grown[: self.row_of.size] = self.row_of
            self.row_of = grown
        rows = self.row_of[series]
        if (rows < 0).any():
            new = np.unique(series[rows < 0])
            self._grow_rows(self.rows + new.size)
            self.row_of[new] = np.arange(self.rows, self.rows + new.size)
            self.series[self.rows : self.rows + new.size] = new
            self.rows += new.size
            rows = self.row_of[series]
        return rows

    def _grow_rows(self, needed: int) -> None:
        if needed <= self.count.size:
            return
        size = max(needed, 2 * self.count.size, 8)
        for name, fill in (
            ("series", 0),
            ("count", 0),
            ("total", 0),
            ("zeros", 0),
            ("min", _NO_POSITION),
            ("max", -1),
        ):
            old = getattr(self, name)
            grown = np.full(size, fill, dtype=np.int64)
            grown[: old.size] = old
            setattr(self, name, grown)
        buckets = np.zeros((size, self.buckets.shape[1]), dtype=np.int64)
        buckets[: self.buckets.shape[0]] = self.buckets
        self.buckets = buckets

    def _cover(self, lo: int, hi: int) -> None:
        width = self.buckets.shape[1]
        if width and lo >= self.lo and hi < self.lo + width:
            return
        new_lo = lo if not width else min(lo, self.lo)
        new_hi = hi if not width else max(hi, self.lo + width - 1)
        grown = np.zeros((self.buckets.shape[0], new_hi - new_lo + 1), dtype=np.int64)
        if width:
            grown[:, self.lo - new_lo : self.lo - new_lo + width] = self.buckets
        self.buckets, self.lo = grown, new_lo

    def add(self, series: np.ndarray, durations: np.ndarray, buckets: np.ndarray) -> None:
        rows = self._rows_for(series)
        np.add.at(self.count, rows, 1)
        np.add.at(self.total, rows, durations)
        np.minimum.at(self.min, rows, durations)
        np.maximum.at(self.max, rows, durations)
        zero = durations == 0
        if zero.any():
            np.add.at(self.zeros, rows[zero], 1)
            rows, buckets = rows[~zero], buckets[~zero]
        if rows.size:
            self._cover(int(buckets.min()), int(buckets.max()))
            width = self.buckets.shape[1]
            np.add.at(self.buckets.reshape(-1), rows * width + (buckets - self.lo), 1)

    def note_positions(self, sources: np.ndarray, positions: np.ndarray) -> None:
        for source in np.unique(sources).tolist():
            lowest = int(positions[sources == source].min())
            self.positions[source] = min(self.positions.get(source, lowest), lowest)

    def close(self, start_ns: int, end_ns: int, accuracy: float) -> list[ClosedWindow]:
        out = []
        for row in np.argsort(self.series[: self.rows], kind="stable").tolist():
            sketch = LatencySketch.from_counts(
                accuracy,
                self.buckets[row],
                self.lo,
                zero_count=int(self.zeros[row]),
                count=int(self.count[row]),
                total=int(self.total[row]),
                minimum=int(self.min[row]),
                maximum=int(self.max[row]),
            )
            out.append(ClosedWindow(int(self.series[row]), start_ns, end_ns, sketch))
        return out


class WindowAggregator:
    def __init__(
        self,
        window_ns: int,
        allowed_lateness_ns: int,
        idle_timeout_ns: int,
        *,
        relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY,
        watermark_ns: int | None = None,
        max_future_ns: int | None = None,
    ) -> None:
        if window_ns <= 0 or allowed_lateness_ns < 0 or idle_timeout_ns < 0:
            raise ValueError(
                f"need window > 0, lateness >= 0 and idle timeout >= 0 (ns), got {window_ns}, "
                f"{allowed_lateness_ns} and {idle_timeout_ns}"
            )
        self.window_ns = window_ns
        self.allowed_lateness_ns = allowed_lateness_ns
        self.idle_timeout_ns = idle_timeout_ns
        self.relative_accuracy = relative_accuracy
        self.max_future_ns = max_future_ns
        self.watermark_ns = watermark_ns
        self.max_event_ns = None if watermark_ns is None else watermark_ns + allowed_lateness_ns
        self.last_arrival_ns: int | None = None
        self.stats = AggregatorStats()
        self._open: dict[int, _OpenWindow] = {}

    @property
    def open_windows(self) -> list[int]:
        return sorted(self._open)

    def add(
        self,
        series: np.ndarray,
        event_ns: np.ndarray,
        durations: np.ndarray,
        *,
        arrival_ns: int,
        sources: np.ndarray | None = None,
        positions: np.ndarray | None = None,
    ) -> None:
        """Spans of one batch (arrays of equal length). `sources`/`positions`: where each
        span came from (partition, offset), for safe_positions()."""
        self.last_arrival_ns = arrival_ns
        if series.size == 0:
            return
        starts = (event_ns // self.window_ns) * self.window_ns
        keep = np.ones(series.size, dtype=np.bool_)
        if self.watermark_ns is not None:
            keep = starts + self.window_ns > self.watermark_ns
            self.stats.late += int(series.size - np.count_nonzero(keep))
        if self.max_future_ns is not None:
            future = keep & (event_ns > arrival_ns + self.max_future_ns)
            if future.any():
                self.stats.future += int(np.count_nonzero(future))
                keep &= ~future
        negative = durations < 0
        if negative.any():
            self.stats.negative += int(np.count_nonzero(negative & keep))
            durations = np.maximum(durations, 0)
        buckets = np.zeros(series.size, dtype=np.int64)
        positive = durations > 0
        buckets[positive] = bucket_indices(durations[positive], self.relative_accuracy)
        for start in np.unique(starts[keep]).tolist():
            chosen = keep & (starts == start)
            window = self._open.get(start)
            if window is None:
                window = self._open[start] = _OpenWindow()
            window.add(series[chosen], durations[chosen], buckets[chosen])
            if sources is not None and positions is not None:
                window.note_positions(sources[chosen], positions[chosen])
        self.stats.spans += int(np.count_nonzero(keep))
        if not keep.any():
            return
        newest = int(event_ns[keep].max())
        if self.max_future_ns is not None:
            # Event time is tied to the wall clock: a span a little ahead (within
            # max_future_ns) counts in its window, but moves the watermark no further than its
            # arrival, or a forged one would make every real span late until then.
            newest = min(newest, arrival_ns)
        if self.max_event_ns is None or newest > self.max_event_ns:
            self.max_event_ns = newest
        self._raise_watermark(self.max_event_ns - self.allowed_lateness_ns)

    def advance_idle(self, now_ns: int) -> None:
        """The caller has nothing left to read at wall-clock time now_ns."""
        if self.last_arrival_ns is None or self.max_event_ns is None:
            return
        quiet = now_ns - self.last_arrival_ns
        if quiet >= self.idle_timeout_ns:
            self._raise_watermark(self.max_event_ns + quiet - self.allowed_lateness_ns)

    def _raise_watermark(self, candidate: int) -> None:
        if self.watermark_ns is None or candidate > self.watermark_ns:
            self.watermark_ns = candidate

    def close_ready(self) -> list[ClosedWindow]:
        """Remove and return the windows the watermark has passed, oldest first."""
        if self.watermark_ns is None:
            return []
        out: list[ClosedWindow] = []
        for start in sorted(self._open):
            end = start + self.window_ns
            if end > self.watermark_ns:
                break
            out.extend(self._open.pop(start).close(start, end, self.relative_accuracy))
            self.stats.windows_closed += 1
        return out

    def safe_positions(self) -> dict[int, int]:
        """Per source, the lowest position an open window holds (sources absent: none)."""
        out: dict[int, int] = {}
        for window in self._open.values():
            for source, position in window.positions.items():
                out[source] = min(out.get(source, position), position)
        return out

    def forget(self) -> None:
        """Drop the open windows (partitions were revoked: their spans will be replayed)."""
        self._open.clear()
