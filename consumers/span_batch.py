"""apm.span.batches: many apm.spans records in one Kafka message, keyed by workload.

    value = b"APMB" 0x01 | count (uint32 LE) | count x size (uint32 LE) | the spans' values

Each span's bytes are exactly its apm.spans message value (an Avro single-object record of
schemas/span.avsc), so the two topics carry the same spans. The key is the spans' workload
(`workload_of`: what the aggregator's series start with), so every span of a series lands in
one partition: an aggregator that owns a partition owns complete windows of its series, and
any number of aggregate members store the same answers as one.

Why: aiokafka costs ~3 us per message consumed, more than the aggregation's whole budget per
span; one message per ~1,000 spans leaves only the columnar decode (span_columns).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAGIC = b"APMB\x01"
_HEAD = len(MAGIC) + 4
MAX_SPANS_PER_BATCH = 1024  # ~250 kB: well under Kafka's default 1 MB per message


def workload_of(namespace: str | None, workload: str | None, exe: str) -> str:
    """The series' workload (series_resolver.series_key_of takes it from here):
    `namespace/workload` from Kubernetes, else the executable's file name."""
    if workload:
        return f"{namespace}/{workload}" if namespace else workload
    return os.path.basename(exe) or exe or "unknown"


def encode_batch(values: Sequence[bytes]) -> bytes:
    """One batch message of span values (at most MAX_SPANS_PER_BATCH)."""
    sizes = np.fromiter(map(len, values), dtype="<u4", count=len(values))
    return b"".join([MAGIC, len(values).to_bytes(4, "little"), sizes.tobytes(), *values])


def is_batch(value: bytes | None) -> bool:
    return value is not None and value[: len(MAGIC)] == MAGIC


@dataclass(frozen=True)
class SpanSlices:
    """The spans of many messages in one buffer: span i is buf[starts[i]:starts[i] + sizes[i]]
    and came from message `message[i]`; a message that is not a readable batch or span gets
    one entry of size -1 (`problems` says why)."""

    buf: bytes
    starts: np.ndarray  # int64
    sizes: np.ndarray  # int64
    message: np.ndarray  # int64
    problems: dict[int, str]


def slice_messages(values: Sequence[bytes | None]) -> SpanSlices:
    """Batches expand to their spans; any other value is one span (a plain apm.spans record).
    Python work per message, numpy per span."""
    starts: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    problems: dict[int, str] = {}
    base = 0
    for index, value in enumerate(values):
        data = value or b""
        if data[: len(MAGIC)] != MAGIC:
            starts.append(np.array([base], dtype=np.int64))
            sizes.append(np.array([len(data)], dtype=np.int64))
        else:
            n = int.from_bytes(data[len(MAGIC) : _HEAD], "little") if len(data) >= _HEAD else -1
            body = _HEAD + 4 * n
            if n < 0 or body > len(data):
                problems[index] = f"span batch of {len(data)} bytes is truncated"
                starts.append(np.array([base], dtype=np.int64))
                sizes.append(np.array([-1], dtype=np.int64))
            else:
                own = np.frombuffer(data, dtype="<u4", count=n, offset=_HEAD).astype(np.int64)
                if int(own.sum()) != len(data) - body:
                    problems[index] = (
                        f"span batch sizes add up to {int(own.sum())} bytes, the batch holds "
                        f"{len(data) - body}"
                    )
                    starts.append(np.array([base], dtype=np.int64))
                    sizes.append(np.array([-1], dtype=np.int64))
                else:
                    starts.append(base + body + np.cumsum(own) - own)
                    sizes.append(own)
        base += len(data)
    counts = [len(s) for s in sizes]
    return SpanSlices(
        b"".join(v or b"" for v in values),
        np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64),
        np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64),
        np.repeat(np.arange(len(values), dtype=np.int64), counts),
        problems,
    )
