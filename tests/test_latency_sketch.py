"""The latency sketch: relative accuracy on heavy tails, exact merges, bytes round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ebpf_apm.consumers.latency_sketch import (
    DEFAULT_RELATIVE_ACCURACY,
    LatencySketch,
    SketchError,
    merged,
)

QS = (0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 1.0)
N = 1_000_000


def lower_quantile(sorted_values: np.ndarray, q: float) -> int:
    """The sketch's definition: the value of rank floor(q (n - 1)) among the sorted values."""
    return int(sorted_values[math.floor(q * (sorted_values.size - 1))])


def worst_error(sketch: LatencySketch, values: np.ndarray) -> float:
    ordered = np.sort(values)
    errors = []
    for q, estimate in zip(QS, sketch.quantile_ns(QS), strict=True):
        exact = lower_quantile(ordered, q)
        errors.append(abs(estimate - exact) / exact)
    return max(errors)


def heavy_tailed(kind: str) -> np.ndarray:
    rng = np.random.default_rng(20240501)
    if kind == "lognormal":  # ~2 ms median, tail to seconds
        values = rng.lognormal(math.log(2e6), 1.5, N)
    else:  # pareto, alpha 1.2: an infinite-variance tail from 50 us
        values = (rng.pareto(1.2, N) + 1.0) * 50_000
    return np.round(values).astype(np.int64)


@pytest.mark.parametrize("kind", ["lognormal", "pareto"])
def test_every_quantile_within_one_percent_on_a_million_heavy_tailed_durations(
    kind: str,
) -> None:
    values = heavy_tailed(kind)
    sketch = LatencySketch()
    sketch.add(values)
    error = worst_error(sketch, values)
    print(f"{kind}: worst relative error over {len(QS)} quantiles of {N:,}: {error:.4%}")
    assert error <= 0.01
    # The sketch's own bound, with the rounding to whole ns the values are >= 50 us for.
    assert error <= DEFAULT_RELATIVE_ACCURACY + 1e-9
    assert (sketch.count, sketch.sum) == (N, int(values.sum()))
    assert (sketch.min, sketch.max) == (int(values.min()), int(values.max()))


@pytest.mark.parametrize("kind", ["lognormal", "pareto"])
def test_merging_windows_is_the_sketch_of_all_values(kind: str) -> None:
    values = heavy_tailed(kind)
    # Uneven windows, including an empty one, added in several batches each.
    cuts = [0, 17, 250_000, 250_000, 640_001, 999_999, N]
    windows = []
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        window = LatencySketch()
        for part in np.array_split(values[lo:hi], 3):
            window.add(part)
        windows.append(window)
    whole = LatencySketch()
    whole.add(values)
    merged_windows = merged(windows)
    assert merged_windows == whole  # same buckets, count, sum, min and max
    assert worst_error(merged_windows, values) <= 0.01
    # Through bytes, as the query command merges stored windows.
    from_storage = merged([LatencySketch.from_bytes(w.to_bytes()) for w in windows])
    assert from_storage.quantile_ns(QS) == whole.quantile_ns(QS)


def test_zeros_small_values_and_clamping() -> None:
    sketch = LatencySketch()
    sketch.add(np.array([0, 0, 0, 1, 2, 3, 1000], dtype=np.int64))
    assert sketch.zero_count == 3
    assert sketch.quantile_ns([0.0, 0.25, 0.5, 1.0]) == [0, 0, 1, 1000]
    one = LatencySketch()
    one.add(np.array([123_456_789]))
    assert one.quantile_ns([0.0, 0.5, 0.99, 1.0]) == [123_456_789] * 4  # clamped to min/max


def test_empty_sketch_and_round_trip() -> None:
    empty = LatencySketch()
    assert empty.quantiles([0.5, 0.99]) == [0.0, 0.0]
    assert LatencySketch.from_bytes(empty.to_bytes()) == empty
    sketch = LatencySketch()
    sketch.add(np.array([5, 10**12, 7_000], dtype=np.int64))
    copy = LatencySketch.from_bytes(sketch.to_bytes())
    assert copy == sketch
    assert (copy.count, copy.sum, copy.min, copy.max) == (3, 10**12 + 7_005, 5, 10**12)


def test_count_widths_round_trip() -> None:
    for repeat in (1, 300, 70_000):
        sketch = LatencySketch()
        sketch.add(np.repeat(np.array([1_000, 50_000], dtype=np.int64), repeat))
        assert LatencySketch.from_bytes(sketch.to_bytes()) == sketch


def test_bad_inputs_are_refused_with_a_reason() -> None:
    with pytest.raises(SketchError, match="LSK1"):
        LatencySketch.from_bytes(b"nope")
    good = LatencySketch()
    good.add(np.array([1, 2, 3]))
    data = good.to_bytes()
    with pytest.raises(SketchError, match="corrupt"):
        LatencySketch.from_bytes(data[:-3] + b"xyz")
    with pytest.raises(SketchError, match="relative accuracy"):
        merged([LatencySketch(0.01), LatencySketch(0.02)])
    with pytest.raises(SketchError, match=r"\[0, 1\]"):
        good.quantiles([1.5])
    with pytest.raises(SketchError):
        LatencySketch(1.5)
