"""HTTP paths -> routes, and the cap on series per workload.

A path segment that is a number, a UUID or a hex id becomes `{id}`:
`/api/user/123` -> `/api/user/{id}`, `/orders/5f1c0e7a9b2d4c3e8f6a7b1c/items` ->
`/orders/{id}/items`. A hex id is at least 8 hex digits with at least one decimal digit (so
that words such as `deadbeef` or `facade` stay). Segments are what `str.split("/")` gives.

The rules exist twice: `route_of` for one path (readable; used to name a series), and
`route_hashes` for many paths at once in numpy (the aggregator's hot path, which only needs
to know which paths share a route). tests/test_route_template.py keeps them equal.

Cardinality: `SeriesRegistry` gives each new series of a workload an id until the workload
has `max_series_per_workload`; after that the workload's new series all go to one overflow
series (operation `{overflow}`), and the registry counts the series it refused. Two global
caps bound it whatever the input: past `max_workloads` workloads, a new workload's series
all go to the series `{overflow}|{overflow}|`; past `max_series` series in all, every new
series goes to its workload's overflow series. The set of refused keys (kept so that each
is counted once) is capped too; past it, refusals are still counted.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ebpf_apm.consumers.byte_hash import hash_ranges, mix64, xor_by_range

log = logging.getLogger(__name__)

ID = "{id}"
OVERFLOW_OPERATION = "{overflow}"
OVERFLOW_WORKLOAD = "{overflow}"
# Global caps (aggregate --max-workloads, --max-series): a few hundred bytes of registry and
# one sketch per open window each.
DEFAULT_MAX_WORKLOADS = 5_000
DEFAULT_MAX_SERIES = 200_000
MIN_HEX_ID = 8
UUID_LENGTH = 36
UUID_DASHES = (8, 13, 18, 23)

_NUMBER = re.compile(r"[0-9]+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEX_ID = re.compile(rf"(?=[a-fA-F]*[0-9])[0-9a-fA-F]{{{MIN_HEX_ID},}}")


def is_id(segment: str) -> bool:
    return bool(
        _NUMBER.fullmatch(segment) or _UUID.fullmatch(segment) or _HEX_ID.fullmatch(segment)
    )


def route_of(path: str) -> str:
    """The route of one URL path (no query string)."""
    return "/".join(ID if is_id(segment) else segment for segment in path.split("/"))


# -- the same rules over many paths ---------------------------------------------------------

_SLASH = ord("/")
# Per byte: 1 if not a decimal digit, plus 1 << 32 if not a hex digit; prefix sums of these
# count both in any segment at once.
_NOT_DIGIT = np.ones(256, dtype=np.int64)
_NOT_DIGIT[ord("0") : ord("9") + 1] = 0
_NOT_HEX = np.ones(256, dtype=np.int64)
for _lo, _hi in (("0", "9"), ("a", "f"), ("A", "F")):
    _NOT_HEX[ord(_lo) : ord(_hi) + 1] = 0
_CLASS = _NOT_DIGIT + (_NOT_HEX << 32)
_LOW32 = (1 << 32) - 1
_UUID_HEX = np.array([i not in UUID_DASHES for i in range(UUID_LENGTH)])
# Segment contents hash as a polynomial, sum(R[byte] * P**offset) mod 2**64, read off prefix
# sums; R and P are secret per process. Past LONG_SEGMENT bytes a polynomial modulo 2**64
# has known collisions (Thue-Morse strings), so such segments use hash_ranges instead.
LONG_SEGMENT = 1024
_random = np.random.default_rng(secrets.randbits(128))
_R = _random.integers(1, 2**63, size=256, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
_P = int(_random.integers(1, 2**62)) * 2 + 1
_P_INV = _P
for _ in range(6):  # Newton's iteration doubles the correct low bits: 6 -> 64+
    _P_INV = _P_INV * (2 - _P * _P_INV) % 2**64
_SEGMENT_KEYS = _random.integers(0, 2**63, size=256, dtype=np.uint64)
_ID_HASH = np.uint64(secrets.randbits(64))
_LENGTH_KEY = np.uint64(secrets.randbits(64) | 1)
_MUL = np.uint64(0xBF58476D1CE4E5B9)
_powers: list[np.ndarray] = [np.ones(1, dtype=np.uint64), np.ones(1, dtype=np.uint64)]


def _powers_of_p(count: int) -> tuple[np.ndarray, np.ndarray]:
    """P**i and P**-i mod 2**64 for i < count (cached, grown by doubling)."""
    if _powers[0].size < count:
        size = max(count, 2 * _powers[0].size, 4096)
        for k, base in ((0, _P), (1, _P_INV)):
            steps = np.full(size, base, dtype=np.uint64)
            steps[0] = 1
            _powers[k] = np.multiply.accumulate(steps)  # wraps modulo 2**64
    return _powers[0], _powers[1]


def route_hashes(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """A uint64 per path (buf[start:start+length], length >= 0) that is equal for two paths
    exactly when their routes are (up to 64-bit hash collisions)."""
    first = np.cumsum(lengths) - lengths  # each path's offset in the flat byte array
    path_ends = first + lengths
    total = int(lengths.sum())
    positions = np.arange(total) + np.repeat(starts - first, lengths)
    data = np.take(buf, positions)
    # Segments end at a slash or at a path's end. On a doubled scale (slash at i -> 2i, end
    # of a path at e -> 2e - 1) the ends of all paths sort into segment order.
    slashes = np.flatnonzero(data == _SLASH)
    cuts = np.sort(np.concatenate((2 * slashes, 2 * path_ends - 1)))
    seg_end = (cuts + 1) >> 1
    seg_start = (np.concatenate(([-1], cuts[:-1])) >> 1) + 1
    seg_len = seg_end - seg_start
    seg_count = (
        np.bincount(np.searchsorted(path_ends, slashes, side="right"), minlength=lengths.size) + 1
    )
    # Which segments are ids.
    classes = np.concatenate(([0], np.cumsum(np.take(_CLASS, data))))
    counts = classes[seg_end] - classes[seg_start]
    not_digit, not_hex = counts & _LOW32, counts >> 32
    is_id = (seg_len > 0) & (not_digit == 0)  # a number
    is_id |= (seg_len >= MIN_HEX_ID) & (not_hex == 0) & (not_digit < seg_len)  # a hex id
    uuid = np.flatnonzero((seg_len == UUID_LENGTH) & (not_hex == 4))
    if uuid.size:
        text = data[seg_start[uuid, None] + np.arange(UUID_LENGTH)]
        hexes = np.take(_NOT_HEX, text) == 0
        is_id[uuid] = (hexes == _UUID_HEX).all(axis=1) & (text[:, ~_UUID_HEX] == ord("-")).all(
            axis=1
        )
    # The other segments' contents.
    power, inverse = _powers_of_p(total + 1)
    weighted = np.concatenate(([np.uint64(0)], np.cumsum(np.take(_R, data) * power[:total])))
    seg_hash = (weighted[seg_end] - weighted[seg_start]) * inverse[seg_start]
    seg_hash += seg_len.astype(np.uint64) * _LENGTH_KEY
    long = np.flatnonzero(seg_len > LONG_SEGMENT)
    if long.size:
        seg_hash[long] = hash_ranges(buf, positions[seg_start[long]], seg_len[long])
    seg_hash[is_id] = _ID_HASH
    # A route: its segments, each keyed by its place in the path.
    index_in_path = np.arange(seg_len.size) - np.repeat(np.cumsum(seg_count) - seg_count, seg_count)
    placed = (seg_hash ^ np.take(_SEGMENT_KEYS, index_in_path & 255)) * _MUL
    placed ^= placed >> np.uint64(31)
    return mix64(xor_by_range(placed, seg_count) ^ seg_count.astype(np.uint64))


# -- series and the cardinality cap ---------------------------------------------------------


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace("|", "%7C")


@dataclass(frozen=True, order=True)
class SeriesKey:
    """What one latency series measures. status_class is "2xx".."5xx" or "unknown" for
    HTTP spans, the gRPC code's name ("OK", "NOT_FOUND", ...) or "unknown" for gRPC calls,
    None otherwise."""

    workload: str
    operation: str
    status_class: str | None = None

    @property
    def series(self) -> str:
        """The series as one string (row key, Kafka key): `workload|operation|status`."""
        parts = (self.workload, self.operation, self.status_class or "")
        return "|".join(_escape(p) for p in parts)

    @property
    def is_overflow(self) -> bool:
        return self.operation == OVERFLOW_OPERATION


class SeriesRegistry:
    """Series ids, at most `max_series_per_workload` per workload plus one overflow series."""

    def __init__(
        self,
        max_series_per_workload: int,
        max_workloads: int = DEFAULT_MAX_WORKLOADS,
        max_series: int = DEFAULT_MAX_SERIES,
        max_refused_keys: int = 100_000,
    ) -> None:
        for what, value in (
            ("series cap per workload", max_series_per_workload),
            ("workload cap", max_workloads),
            ("series cap", max_series),
        ):
            if value < 1:
                raise ValueError(f"the {what} must be at least 1, got {value}")
        self.max_series_per_workload = max_series_per_workload
        self.max_workloads = max_workloads
        self.max_series = max_series
        self.max_refused_keys = max_refused_keys
        # Series refused by the global caps (new workloads past max_workloads; new series
        # past max_series).
        self.refused_workloads = 0
        self.refused_global = 0
        self.keys: list[SeriesKey] = []
        self._ids: dict[SeriesKey, int] = {}
        self._per_workload: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # workload -> distinct series sent to overflow
        self._refused_keys: set[SeriesKey] = set()

    def __len__(self) -> int:
        return len(self.keys)

    def _add(self, key: SeriesKey) -> int:
        self._ids[key] = len(self.keys)
        self.keys.append(key)
        if not key.is_overflow:
            self._per_workload[key.workload] += 1
        return self._ids[key]

    def _room(self, key: SeriesKey) -> bool:
        """Whether a new series may have an id of its own."""
        count = self._per_workload.get(key.workload)
        if count is None and len(self._per_workload) >= self.max_workloads:
            return False
        return (count or 0) < self.max_series_per_workload and len(self.keys) < self.max_series

    def seed(self, keys: Iterable[SeriesKey]) -> None:
        """Series already stored count against the cap (they keep their slots on restart)."""
        for key in sorted(set(keys)):
            if key not in self._ids and not key.is_overflow and self._room(key):
                self._add(key)

    def resolve(self, key: SeriesKey) -> int:
        """The series id of a key; the workload's overflow series once it is full."""
        found = self._ids.get(key)
        if found is not None:
            return found
        if self._room(key):
            return self._add(key)
        if key.workload not in self._per_workload:  # past the cap on workloads
            self.refused_workloads += 1
            if self.refused_workloads == 1:
                log.warning(
                    "%d workloads: series of new workloads such as %r go to the %s series "
                    "(raise --max-workloads if they are real)",
                    self.max_workloads,
                    key.workload,
                    OVERFLOW_WORKLOAD,
                )
            overflow = SeriesKey(OVERFLOW_WORKLOAD, OVERFLOW_OPERATION, None)
            found = self._ids.get(overflow)
            return found if found is not None else self._add(overflow)
        if len(self.keys) >= self.max_series:
            self.refused_global += 1
            if self.refused_global == 1:
                log.warning(
                    "%d series in all: new series go to their workload's %s series (raise "
                    "--max-series if they are real)",
                    self.max_series,
                    OVERFLOW_OPERATION,
                )
        if key not in self._refused_keys:
            if len(self._refused_keys) < self.max_refused_keys:
                self._refused_keys.add(key)
            if not self.refused[key.workload]:
                log.warning(
                    "workload %r has reached %d series; new operations go to its %s series "
                    "(raise --max-series-per-workload if they are real routes, or check the "
                    "route templating of paths such as %r)",
                    key.workload,
                    self.max_series_per_workload,
                    OVERFLOW_OPERATION,
                    key.operation,
                )
            self.refused[key.workload] += 1
        overflow = SeriesKey(key.workload, OVERFLOW_OPERATION, None)
        found = self._ids.get(overflow)
        return found if found is not None else self._add(overflow)
