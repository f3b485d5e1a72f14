"""What the join reads of a message: a checked batch, or the dead letter that replaces it.

One decode-or-reject path for both input topics: a message that does not decode, or whose
batch fails the join's checks, becomes a `DeadLetter` (ebpf_apm.kafka.deadletter) with the
reason; the join sends it to `apm.deadletter` and carries on with the next message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ebpf_apm.kafka.deadletter import DeadLetter
from ebpf_apm.schemas.event_batch import (
    NetBatch,
    SpanBatch,
    check_net_times,
    check_span_times,
    decode_net_batch,
    decode_span_batch,
)
from ebpf_apm.schemas.input_limits import InputRejected, TimeBounds

T = TypeVar("T")


def _read_message(
    label: str,
    decode: Callable[[bytes], T],
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
) -> T | DeadLetter:
    if value is None:
        return DeadLetter.of(topic, partition, offset, key, value, "empty message (no value)")
    try:
        return decode(value)
    except InputRejected as exc:
        return DeadLetter.of(topic, partition, offset, key, value, f"{label}: {exc}")
    except Exception as exc:  # a hostile message must not stop the join: reject it too
        why = f"{label}: {type(exc).__name__}: {exc}"
        return DeadLetter.of(topic, partition, offset, key, value, why)


def read_span_message(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    now_ns: int,
    bounds: TimeBounds,
) -> SpanBatch | DeadLetter:
    """The checked span batch of a message, or the dead letter that replaces it."""

    def checked(value: bytes) -> SpanBatch:
        batch = decode_span_batch(value)
        check_span_times(batch, now_ns, bounds)
        return batch

    return _read_message("span batch", checked, topic, partition, offset, key, value)


def read_net_message(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    now_ns: int,
    bounds: TimeBounds,
) -> NetBatch | DeadLetter:
    """The checked net batch of a message, or the dead letter that replaces it."""

    def checked(value: bytes) -> NetBatch:
        batch = decode_net_batch(value)
        check_net_times(batch, now_ns, bounds)
        return batch

    return _read_message("net batch", checked, topic, partition, offset, key, value)
