"""Input messages the join cannot read, and why: they go to `apm.deadletter` unchanged.

A dead letter keeps the original key and bytes, so it can be replayed once its producer is
fixed, with headers saying why it was rejected (`reason`) and where it came from (`source`:
topic/partition/offset). The join carries on with the next message.
"""

from __future__ import annotations

from dataclasses import dataclass

from consumers.span_joiner import check_net_batch, check_span_batch
from schemas.event_batch import (
    BatchDecodeError,
    NetBatch,
    SpanBatch,
    decode_net_batch,
    decode_span_batch,
)

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


def read_span_message(
    topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
) -> SpanBatch | DeadLetter:
    """The checked span batch of a message, or the dead letter that replaces it."""
    if value is None:
        return _rejected(topic, partition, offset, key, value, "empty message (no value)")
    try:
        batch = decode_span_batch(value)
        check_span_batch(batch)
    except BatchDecodeError as exc:
        return _rejected(topic, partition, offset, key, value, f"span batch: {exc}")
    except Exception as exc:  # a hostile message must not stop the join: reject it too
        why = f"span batch: {type(exc).__name__}: {exc}"
        return _rejected(topic, partition, offset, key, value, why)
    return batch


def read_net_message(
    topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
) -> NetBatch | DeadLetter:
    """The checked net batch of a message, or the dead letter that replaces it."""
    if value is None:
        return _rejected(topic, partition, offset, key, value, "empty message (no value)")
    try:
        batch = decode_net_batch(value)
        check_net_batch(batch)
    except BatchDecodeError as exc:
        return _rejected(topic, partition, offset, key, value, f"net batch: {exc}")
    except Exception as exc:  # a hostile message must not stop the join: reject it too
        why = f"net batch: {type(exc).__name__}: {exc}"
        return _rejected(topic, partition, offset, key, value, why)
    return batch
