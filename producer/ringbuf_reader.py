"""Bulk reader of a BPF ring buffer of fixed-size records.

BCC's reader calls back into Python once per record, which tops out near a million
records a second with no work done. This reader maps the ring buffer itself and, because
every record in one ring has the same size, views everything committed between the consumer
and producer positions as one numpy array: a drain is a few array operations however many
records wait. The kernel offers the data pages twice back to back, so that a run wrapping
around the end reads as one; this reader maps them once and joins the two pieces of a
wrapped run itself (one copy, which the drain makes anyway): the second mapping would double
the ring's share of the agent's resident size once every page has been read through both.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np

BUSY_BIT = 1 << 31  # reserved, not yet submitted
DISCARD_BIT = 1 << 30  # reserved, then discarded
HEADER_SIZE = 8


class RecordLayoutError(RuntimeError):
    """A record's size differs from the layout the reader was built for."""


def _round8(n: int) -> int:
    return (n + 7) & ~7


class RingBufReader:
    """Reads records of `record` dtype from the ring buffer map behind `map_fd`."""

    def __init__(self, map_fd: int, data_pages: int, record: np.dtype[Any]) -> None:
        page = mmap.PAGESIZE
        self.record = record
        self.data_size = data_pages * page
        if self.data_size & (self.data_size - 1):
            raise ValueError(f"ring buffer size {self.data_size} is not a power of two")
        self._mask = self.data_size - 1
        self._stride = _round8(HEADER_SIZE + record.itemsize)
        self._slot = np.dtype(
            {
                "names": ["rb_len", "record"],
                "formats": ["<u4", record],
                "offsets": [0, HEADER_SIZE],
                "itemsize": self._stride,
            }
        )
        self._consumer_map = mmap.mmap(
            map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
        )
        self._producer_map = mmap.mmap(
            map_fd, page + self.data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
        )
        self._consumer_pos = np.frombuffer(self._consumer_map, dtype="<u8", count=1)
        self._producer_pos = np.frombuffer(self._producer_map, dtype="<u8", count=1)
        self._data = np.frombuffer(self._producer_map, dtype=np.uint8, offset=page)

    def drain(self, max_records: int | None = None) -> np.ndarray:
        """Copy out every committed record and release its space to the kernel."""
        consumer = int(self._consumer_pos[0])
        available = int(self._producer_pos[0]) - consumer
        count = available // self._stride
        if max_records is not None:
            count = min(count, max_records)
        if count <= 0:
            return np.empty(0, dtype=self.record)
        start = consumer & self._mask
        end = start + count * self._stride
        if end <= self.data_size:
            run = self._data[start:end]
        else:  # wraps: the tail of the data area, then its head
            run = np.concatenate((self._data[start:], self._data[: end - self.data_size]))
        slots = run.view(self._slot)
        lengths = slots["rb_len"]
        busy = np.flatnonzero(lengths & BUSY_BIT)
        if len(busy):
            # Records are released in order: stop at the first one still being written.
            count = int(busy[0])
            slots = slots[:count]
            lengths = lengths[:count]
        sizes = lengths & ~np.uint32(BUSY_BIT | DISCARD_BIT)
        live = (lengths & DISCARD_BIT) == 0
        if np.any(sizes[live] != self.record.itemsize):
            bad = int(sizes[live][sizes[live] != self.record.itemsize][0])
            raise RecordLayoutError(
                f"ring buffer record of {bad} bytes, expected {self.record.itemsize}: "
                "the BPF program and producer/event_layout.py disagree"
            )
        records = slots["record"][live] if not live.all() else slots["record"].copy()
        # Publish the new position only after the copy: the kernel may reuse the space then.
        self._consumer_pos[0] = consumer + count * self._stride
        return records

    def pending_bytes(self) -> int:
        return int(self._producer_pos[0]) - int(self._consumer_pos[0])

    def close(self) -> None:
        del self._consumer_pos, self._producer_pos, self._data
        self._consumer_map.close()
        self._producer_map.close()
