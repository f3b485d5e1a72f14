"""Input messages the join cannot read, and why: they go to `apm.deadletter` unchanged.

A dead letter keeps the original key and bytes, so it can be replayed once its producer is
fixed, with headers saying why it was rejected (`reason`) and where it came from (`source`:
topic/partition/offset). The join carries on with the next message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from consumers.span_joiner import check_net_batch, check_span_batch
from schemas.event_batch import (
    BatchDecodeError,
    NetBatch,
    SpanBatch,
    decode_net_batch,
    decode_span_batch,
)

T = TypeVar("T")

REASON_HEADER = "reason"
SOURCE_HEADER = "source"


@dataclass(frozen=True)
class DeadLetter:
    key: bytes | None
    value: bytes | None
    reason: str
    source: str  # topic/partition/offset

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        return [(REASON_HEADER, self.reason.encode()), (SOURCE_HEADER, self.source.encode())]


def _rejected(
    topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, why: str
) -> DeadLetter:
    return DeadLetter(key, value, why, f"{topic}/{partition}/{offset}")


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
        return _rejected(topic, partition, offset, key, value, "empty message (no value)")
    try:
        return decode(value)
    except BatchDecodeError as exc:
        return _rejected(topic, partition, offset, key, value, f"{label}: {exc}")
    except Exception as exc:  # a hostile message must not stop the join: reject it too
        why = f"{label}: {type(exc).__name__}: {exc}"
        return _rejected(topic, partition, offset, key, value, why)


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
