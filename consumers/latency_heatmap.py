"""How many calls of each window fell in each latency band, read from the stored sketches.

A sketch keeps a count per log bucket (bucket i holds (gamma^(i-1), gamma^i]); the heatmap
groups neighbouring buckets into at most `bands` bands of equal log width, covering the
lowest to the highest bucket any window used, so every call of every window is in exactly
one cell: a window's column adds up to its count. Calls of 0 ns (the zero bucket) go to the
lowest band. Pure: sketches in, counts out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ebpf_apm.consumers.latency_sketch import LatencySketch, gamma_of

DEFAULT_BANDS = 16


@dataclass(frozen=True)
class Heatmap:
    """Band b holds durations in (edges_ns[b], edges_ns[b + 1]] (band 0 also those of 0 ns);
    counts[w][b] is the number of calls of window w in band b."""

    edges_ns: list[float]
    counts: list[list[int]]

    @property
    def most(self) -> int:
        return max((max(column) for column in self.counts if column), default=0)


def latency_heatmap(sketches: Sequence[LatencySketch], bands: int = DEFAULT_BANDS) -> Heatmap:
    """Sketches of one relative accuracy (the windows of one operation), oldest first."""
    used = [s for s in sketches if s.counts.size]
    if not used:  # nothing but zero durations, or no windows
        return Heatmap([0.0, 1.0], [[s.zero_count] for s in sketches])
    gamma = gamma_of(used[0].relative_accuracy)
    lowest = min(s.offset for s in used)
    highest = max(s.offset + s.counts.size - 1 for s in used)
    per_band = math.ceil((highest - lowest + 1) / bands)
    n = math.ceil((highest - lowest + 1) / per_band)
    edges = [gamma ** (lowest + b * per_band - 1) for b in range(n + 1)]
    counts = []
    for sketch in sketches:
        column = np.zeros(n, dtype=np.int64)
        if sketch.counts.size:
            band = (np.arange(sketch.counts.size) + sketch.offset - lowest) // per_band
            np.add.at(column, band, sketch.counts)
        column[0] += sketch.zero_count
        counts.append([int(c) for c in column])
    return Heatmap(edges, counts)
