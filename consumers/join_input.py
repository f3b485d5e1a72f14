"""What the join reads of a message: a checked batch, or the dead letter that replaces it.

One decode-or-reject path for both input topics: a message that does not decode, or whose
batch fails the join's checks, becomes a `DeadLetter` (ebpf_apm.kafka.deadletter) with the
reason; the join sends it to `apm.deadletter` and carries on with the next message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ebpf_apm.consumers.span_joiner import check_net_batch, check_span_batch
from ebpf_apm.kafka.deadletter import DeadLetter
from ebpf_apm.schemas.event_batch import (
    BatchDecodeError,
    NetBatch,
    SpanBatch,
    decode_net_batch,
    decode_span_batch,
)

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
    except BatchDecodeError as exc:
        return DeadLetter.of(topic, partition, offset, key, value, f"{label}: {exc}")
    except Exception as exc:  # a hostile message must not stop the join: reject it too
        why = f"{label}: {type(exc).__name__}: {exc}"
        return DeadLetter.of(topic, partition, offset, key, value, why)


def _checked_span_batch(value: bytes) -> SpanBatch:
    batch = decode_span_batch(value)
    check_span_batch(batch)
    return batch


def _checked_net_batch(value: bytes) -> NetBatch:
    batch = decode_net_batch(value)
    check_net_batch(batch)
    return batch


def read_span_message(
    topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
) -> SpanBatch | DeadLetter:
    """The checked span batch of a message, or the dead letter that replaces it."""
    return _read_message("span batch", _checked_span_batch, topic, partition, offset, key, value)


def read_net_message(
    topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
) -> NetBatch | DeadLetter:
    """The checked net batch of a message, or the dead letter that replaces it."""
    return _read_message("net batch", _checked_net_batch, topic, partition, offset, key, value)
