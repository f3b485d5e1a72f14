"""A mergeable quantile sketch with a relative-error guarantee (DDSketch's log buckets).

A value x >= 1 goes to bucket i = ceil(log_gamma(x)), gamma = (1 + a) / (1 - a), which holds
(gamma^(i-1), gamma^i]; the bucket's estimate 2 gamma^i / (gamma + 1) is within a relative
error `a` of every value in it. Values <= 0 go to a zero bucket (estimate 0). So for every q
the estimate of the lower quantile - the value of rank floor(q (n - 1)) among the n sorted
values - is within `a` of it, and merging sketches (adding bucket counts) keeps that bound
exactly: a merge is the sketch of all the values.

Count, sum, min and max are kept exactly; estimates are clamped to [min, max] (the exact
quantile lies there, so clamping only moves an estimate closer).

Pure and vectorised: `add` takes a numpy array; the aggregator computes bucket indices for a
whole batch with `bucket_indices` and builds sketches from counts with `from_counts`.

Serialized form (`to_bytes`, little-endian), also documented in schemas/latency.avsc:
    b"LSK1", float64 relative accuracy, int64 count, sum, min, max, zero count,
    int32 index of the first bucket, uint32 number of buckets, uint8 width of a count
    (1, 2, 4 or 8 bytes), then zlib(bucket counts as unsigned integers of that width).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_RELATIVE_ACCURACY = 0.005  # 0.5%: a reported quantile in whole ns stays within 1%
MAGIC = b"LSK1"
_HEADER = struct.Struct("<4sdqqqqqiIB")
_WIDTHS: dict[int, np.dtype[Any]] = {
    1: np.dtype("<u1"),
    2: np.dtype("<u2"),
    4: np.dtype("<u4"),
    8: np.dtype("<u8"),
}


class SketchError(ValueError):
    """Bytes that are not a serialized sketch, or sketches that cannot be merged."""


def gamma_of(relative_accuracy: float) -> float:
    if not 0.0 < relative_accuracy < 1.0:
        raise SketchError(f"relative accuracy must be in (0, 1), got {relative_accuracy}")
    return (1.0 + relative_accuracy) / (1.0 - relative_accuracy)


def bucket_indices(values: np.ndarray, relative_accuracy: float) -> np.ndarray:
    """Bucket index (int64) of each value >= 1; callers route values <= 0 to the zero bucket."""
    inv_log_gamma = 1.0 / math.log(gamma_of(relative_accuracy))
    logs = np.log(values.astype(np.float64, copy=False))
    return np.ceil(logs * inv_log_gamma).astype(np.int64)


class LatencySketch:
    """Quantiles of non-negative integer durations (ns) within a relative error."""

    __slots__ = (
        "relative_accuracy",
        "counts",
        "offset",
        "zero_count",
        "count",
        "sum",
        "min",
        "max",
    )

    def __init__(self, relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY) -> None:
        gamma_of(relative_accuracy)  # validates
        self.relative_accuracy = relative_accuracy
        self.counts = np.zeros(0, dtype=np.int64)  # counts[k] is bucket offset + k
        self.offset = 0
        self.zero_count = 0
        self.count = 0
        self.sum = 0
        self.min = 0
        self.max = 0

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def from_counts(
        cls,
        relative_accuracy: float,
        counts: np.ndarray,
        offset: int,
        *,
        zero_count: int,
        count: int,
        total: int,
        minimum: int,
        maximum: int,
    ) -> LatencySketch:
        """A sketch from bucket counts (counts[k] is bucket offset + k) and exact figures."""
        sketch = cls(relative_accuracy)
        nonzero = np.flatnonzero(counts)
        if nonzero.size:
            first, last = int(nonzero[0]), int(nonzero[-1])
            sketch.counts = counts[first : last + 1].astype(np.int64, copy=True)
            sketch.offset = offset + first
        sketch.zero_count = zero_count
        sketch.count = count
        sketch.sum = total
        sketch.min = minimum
        sketch.max = maximum
        return sketch

    def add(self, values: np.ndarray) -> None:
        """Add many values at once (integers, ns)."""
        values = np.asarray(values, dtype=np.int64)
        if values.size == 0:
            return
        positive = values[values > 0]
        zeros = values.size - positive.size
        if positive.size:
            index = bucket_indices(positive, self.relative_accuracy)
            lo, hi = int(index.min()), int(index.max())
            self._cover(lo, hi)
            self.counts += np.bincount(index - self.offset, minlength=self.counts.size)
        lowest, highest = int(values.min()), int(values.max())
        if self.count == 0:
            self.min, self.max = lowest, highest
        else:
            self.min, self.max = min(self.min, lowest), max(self.max, highest)
        self.zero_count += zeros
        self.count += int(values.size)
        self.sum += int(values.sum(dtype=np.int64))

    def _cover(self, lo: int, hi: int) -> None:
        """Grow the dense bucket array to hold buckets lo..hi."""
        if self.counts.size == 0:
            self.counts = np.zeros(hi - lo + 1, dtype=np.int64)
            self.offset = lo
            return
        cur_lo, cur_hi = self.offset, self.offset + self.counts.size - 1
        if lo >= cur_lo and hi <= cur_hi:
            return
        new_lo, new_hi = min(lo, cur_lo), max(hi, cur_hi)
        grown = np.zeros(new_hi - new_lo + 1, dtype=np.int64)
        grown[cur_lo - new_lo : cur_lo - new_lo + self.counts.size] = self.counts
        self.counts, self.offset = grown, new_lo

    def merge(self, other: LatencySketch) -> None:
        """Add another sketch's values (same relative accuracy) into this one."""
        if other.relative_accuracy != self.relative_accuracy:
            raise SketchError(
                f"cannot merge a sketch of relative accuracy {other.relative_accuracy} into "
                f"one of {self.relative_accuracy}: their buckets differ"
            )
        if other.count == 0:
            return
        if other.counts.size:
            self._cover(other.offset, other.offset + other.counts.size - 1)
            start = other.offset - self.offset
            self.counts[start : start + other.counts.size] += other.counts
        if self.count == 0:
            self.min, self.max = other.min, other.max
        else:
            self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.zero_count += other.zero_count
        self.count += other.count
        self.sum += other.sum

    # -- reading ----------------------------------------------------------------------------

    def quantiles(self, qs: Sequence[float]) -> list[float]:
        """Estimates of the lower quantiles (rank floor(q (n - 1))); 0.0 for an empty sketch."""
        if self.count == 0:
            return [0.0 for _ in qs]
        gamma = gamma_of(self.relative_accuracy)
        cumulative = np.cumsum(self.counts)
        out: list[float] = []
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise SketchError(f"quantile must be in [0, 1], got {q}")
            rank = math.floor(q * (self.count - 1))
            if q == 0.0:
                out.append(float(self.min))
                continue
            if q == 1.0:
                out.append(float(self.max))
                continue
            if rank < self.zero_count:
                estimate = 0.0
            else:
                k = int(np.searchsorted(cumulative, rank - self.zero_count, side="right"))
                estimate = 2.0 * gamma ** (self.offset + k) / (gamma + 1.0)
            out.append(min(max(estimate, float(self.min)), float(self.max)))
        return out

    def quantile_ns(self, qs: Sequence[float]) -> list[int]:
        """`quantiles` rounded to whole nanoseconds, as rows and topics carry them."""
        return [round(v) for v in self.quantiles(qs)]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatencySketch):
            return NotImplemented
        return self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"LatencySketch(count={self.count}, min={self.min}, max={self.max}, "
            f"buckets={self.counts.size}, relative_accuracy={self.relative_accuracy})"
        )

    # -- bytes ------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        counts = self.counts
        nonzero = np.flatnonzero(counts)
        offset = self.offset
        if nonzero.size:
            first, last = int(nonzero[0]), int(nonzero[-1])
            counts, offset = counts[first : last + 1], offset + first
        else:
            counts, offset = counts[:0], 0
        largest = int(counts.max()) if counts.size else 0
        width = next(w for w in (1, 2, 4, 8) if largest < 1 << (8 * w))
        try:
            header = _HEADER.pack(
                MAGIC,
                self.relative_accuracy,
                self.count,
                self.sum,
                self.min,
                self.max,
                self.zero_count,
                offset,
                counts.size,
                width,
            )
        except struct.error as exc:
            raise SketchError(f"sketch figures do not fit 64 bits ({self!r}): {exc}") from exc
        return header + zlib.compress(counts.astype(_WIDTHS[width]).tobytes(), 1)

    @classmethod
    def from_bytes(cls, data: bytes) -> LatencySketch:
        if len(data) < _HEADER.size or data[:4] != MAGIC:
            raise SketchError("not a serialized latency sketch (no LSK1 header)")
        (_, accuracy, count, total, minimum, maximum, zeros, offset, size, width) = (
            _HEADER.unpack_from(data)
        )
        if width not in _WIDTHS:
            raise SketchError(f"bad count width {width} in a serialized sketch")
        try:
            raw = zlib.decompress(data[_HEADER.size :])
        except zlib.error as exc:
            raise SketchError(f"corrupt bucket counts in a serialized sketch: {exc}") from exc
        if len(raw) != size * width:
            raise SketchError(
                f"serialized sketch holds {len(raw)} bytes of counts, expected {size * width}"
            )
        sketch = cls(accuracy)
        sketch.counts = np.frombuffer(raw, dtype=_WIDTHS[width]).astype(np.int64)
        sketch.offset = offset
        sketch.zero_count = zeros
        sketch.count = count
        sketch.sum = total
        sketch.min = minimum
        sketch.max = maximum
        return sketch


def merged(sketches: Sequence[LatencySketch]) -> LatencySketch:
    """One sketch of all the values of `sketches` (at least one)."""
    if not sketches:
        raise SketchError("nothing to merge")
    out = LatencySketch(sketches[0].relative_accuracy)
    for sketch in sketches:
        out.merge(sketch)
    return out
