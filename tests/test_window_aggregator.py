"""Tumbling event-time windows: assignment, watermark, lateness, idle advance, positions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ebpf_apm.consumers.window_aggregator import ClosedWindow, WindowAggregator

S = 1_000_000_000
T0 = 1_700_000_000 * S  # a window boundary (10 s windows)


def arrays(*columns: list[int]) -> list[np.ndarray]:
    return [np.array(c, dtype=np.int64) for c in columns]


def figures(windows: list[ClosedWindow]) -> list[tuple[int, int, int, int, int, int, int]]:
    return [
        (
            w.start_ns,
            w.series_id,
            w.sketch.count,
            w.sketch.sum,
            w.sketch.min,
            w.sketch.max,
            w.sketch.quantile_ns([0.5])[0],
        )
        for w in windows
    ]


def test_windows_close_once_the_watermark_passes_them() -> None:
    agg = WindowAggregator(10 * S, 2 * S, 5 * S)
    series, ends, durations = arrays([0, 1, 0], [T0 + 1, T0 + 9 * S, T0 + 5 * S], [10, 20, 30])
    agg.add(series, ends, durations, arrival_ns=0)
    assert agg.close_ready() == []
    agg.add(*arrays([0], [T0 + 11 * S], [40]), arrival_ns=1)  # watermark T0 + 9 s
    assert agg.close_ready() == []
    agg.add(*arrays([1], [T0 + 12 * S], [50]), arrival_ns=2)  # watermark T0 + 10 s: closes
    closed = agg.close_ready()
    assert figures(closed) == [
        (T0, 0, 2, 40, 10, 30, 10),
        (T0, 1, 1, 20, 20, 20, 20),
    ]
    assert all(w.end_ns == T0 + 10 * S for w in closed)
    assert agg.open_windows == [T0 + 10 * S]
    assert agg.close_ready() == []  # closed once


def test_late_spans_are_counted_not_added() -> None:
    agg = WindowAggregator(10 * S, 0, 5 * S)
    agg.add(*arrays([0, 0], [T0 + 1, T0 + 10 * S]), np.array([5, 6]), arrival_ns=0)
    assert len(agg.close_ready()) == 1
    agg.add(*arrays([0, 0], [T0 + 3 * S, T0 + 15 * S], [7, 8]), arrival_ns=1)
    assert agg.stats.late == 1
    assert agg.stats.spans == 3
    agg.add(*arrays([0], [T0 + 40 * S], [1]), arrival_ns=2)
    (second,) = agg.close_ready()
    assert (second.start_ns, second.sketch.count, second.sketch.sum) == (T0 + 10 * S, 2, 14)


def test_idle_input_advances_the_watermark_with_the_wall_clock() -> None:
    agg = WindowAggregator(10 * S, 3 * S, idle_timeout_ns=2 * S)
    wall = 5_000 * S  # the wall clock need not match event time
    agg.add(*arrays([0], [T0 + 4 * S], [9]), arrival_ns=wall)
    agg.advance_idle(wall + 1 * S)  # not idle long enough
    assert agg.close_ready() == []
    agg.advance_idle(wall + 8 * S)  # as if event time reached T0 + 12 s: watermark T0 + 9 s
    assert agg.close_ready() == []
    agg.advance_idle(wall + 9 * S)  # watermark T0 + 10 s
    (closed,) = agg.close_ready()
    assert closed.start_ns == T0 and closed.sketch.count == 1
    # New input re-arms the timer; the watermark never goes back.
    before = agg.watermark_ns
    agg.add(*arrays([0], [T0 + 10 * S + 1], [9]), arrival_ns=wall + 20 * S)
    assert agg.watermark_ns == before
    agg.advance_idle(wall + 21 * S)
    assert agg.watermark_ns == before


def test_nothing_to_advance_before_any_input() -> None:
    agg = WindowAggregator(10 * S, 0, 0)
    agg.advance_idle(10**18)
    assert agg.watermark_ns is None and agg.close_ready() == []


def test_same_windows_whatever_the_batching_and_order() -> None:
    rng = np.random.default_rng(5)
    n = 50_000
    ends = T0 + np.sort(rng.integers(0, 60 * S, n))
    ends += rng.integers(-2 * S, 2 * S, n)  # disorder within the allowed lateness
    series = rng.integers(0, 40, n)
    durations = np.round(rng.lognormal(math.log(5e6), 1.0, n)).astype(np.int64)
    durations[::97] = 0

    def run(batches: int, shuffle: bool) -> list[tuple[int, int, int, bytes]]:
        agg = WindowAggregator(10 * S, 5 * S, S)  # disorder is at most 4 s
        order = np.arange(n)
        if shuffle:  # shuffled within 1 s of event time only
            order = np.argsort(ends // S * S + rng.integers(0, S, n), kind="stable")
        out = []
        for part in np.array_split(order, batches):
            agg.add(series[part], ends[part], durations[part], arrival_ns=0)
            out += agg.close_ready()
        agg.advance_idle(10**12)
        out += agg.close_ready()
        assert agg.stats.late == 0
        return [(w.start_ns, w.series_id, w.end_ns, w.sketch.to_bytes()) for w in out]

    reference = run(1, False)
    assert run(7, False) == reference
    assert run(333, True) == reference
    assert len(reference) == 8 * 40  # windows T0 - 10 s ... T0 + 60 s hold spans
    # Against exact figures.
    by_key = {(start, sid): blob for start, sid, _, blob in reference}
    from ebpf_apm.consumers.latency_sketch import LatencySketch

    for (start, sid), blob in list(by_key.items())[:50]:
        chosen = (series == sid) & (ends // (10 * S) * (10 * S) == start)
        exact = np.sort(durations[chosen])
        sketch = LatencySketch.from_bytes(blob)
        assert (sketch.count, sketch.sum, sketch.min, sketch.max) == (
            exact.size,
            int(exact.sum()),
            int(exact.min()),
            int(exact.max()),
        )
        for q, estimate in zip((0.5, 0.99), sketch.quantile_ns((0.5, 0.99)), strict=True):
            truth = int(exact[math.floor(q * (exact.size - 1))])
            assert abs(estimate - truth) <= 0.01 * truth


def test_safe_positions_are_the_oldest_offsets_open_windows_hold() -> None:
    agg = WindowAggregator(10 * S, 0, S)
    series, ends, durations = arrays(
        [0, 0, 1, 0], [T0 + 1, T0 + 12 * S, T0 + 2, T0 + 13 * S], [1, 1, 1, 1]
    )
    sources, positions = arrays([0, 0, 1, 1], [100, 101, 7, 8])
    agg.add(
        series[:1],
        ends[:1],
        durations[:1],
        arrival_ns=0,
        sources=sources[:1],
        positions=positions[:1],
    )
    agg.add(
        series[2:3],
        ends[2:3],
        durations[2:3],
        arrival_ns=0,
        sources=sources[2:3],
        positions=positions[2:3],
    )
    assert agg.safe_positions() == {0: 100, 1: 7}
    agg.add(
        series[1::2],
        ends[1::2],
        durations[1::2],
        arrival_ns=0,
        sources=sources[1::2],
        positions=positions[1::2],
    )  # watermark T0 + 13 s: the first window closes
    assert {w.start_ns for w in agg.close_ready()} == {T0}
    assert agg.safe_positions() == {0: 101, 1: 8}
    agg.forget()
    assert agg.safe_positions() == {} and agg.open_windows == []


def test_a_restored_watermark_closes_written_windows() -> None:
    agg = WindowAggregator(10 * S, 2 * S, S, watermark_ns=T0 + 10 * S)
    agg.add(*arrays([0, 0], [T0 + 5 * S, T0 + 15 * S], [1, 2]), arrival_ns=0)
    assert agg.stats.late == 1  # its window was written before the restart
    assert agg.open_windows == [T0 + 10 * S]


def test_spans_from_a_clock_far_ahead_are_left_out() -> None:
    agg = WindowAggregator(10 * S, 2 * S, S, max_future_ns=60 * S)
    arrival = T0 + 5 * S
    agg.add(*arrays([0, 0, 0], [T0, T0 + 64 * S, T0 + 3600 * S], [1, 2, 3]), arrival_ns=arrival)
    assert (agg.stats.spans, agg.stats.future) == (2, 1)
    # The span from the far future moved nothing; the one 59 s ahead counts in its window
    # but moves event time only to its arrival, so real spans after it are not late.
    assert agg.max_event_ns == arrival
    assert agg.open_windows == [T0, T0 + 60 * S]
    agg.add(*arrays([0], [T0 + 3600 * S], [3]), arrival_ns=arrival)
    assert agg.stats.future == 2
    agg.add(*arrays([0], [T0 + 6 * S], [4]), arrival_ns=arrival + S)
    assert (agg.stats.spans, agg.stats.late) == (3, 0)


def test_negative_durations_count_as_zero() -> None:
    agg = WindowAggregator(10 * S, 0, S)
    agg.add(*arrays([0, 0], [T0, T0 + 1], [-5, 10]), arrival_ns=0)
    agg.advance_idle(100 * S)
    (window,) = agg.close_ready()
    assert agg.stats.negative == 1
    assert (window.sketch.min, window.sketch.zero_count, window.sketch.sum) == (0, 1, 10)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="window > 0"):
        WindowAggregator(0, 0, 0)
