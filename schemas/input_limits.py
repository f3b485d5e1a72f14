"""What every reader of a topic rejects, and the one exception it rejects with.

Anyone who can write to a topic can send anything, so each format has one decoder that
checks types, sizes and value ranges before anything else looks at a message
(`event_batch` for the msgpack event batches, `avro_codec` and `span_columns` for the Avro
result topics, `latency_input` for apm.latency). Each raises `InputRejected` (or a subclass)
and nothing else; its text is the reason a consumer writes into the dead letter's `reason`
header. Limits and reasons are listed in schemas/uprobe_events.md and kprobe_events.md.

Timestamps (Unix epoch ns) must lie within `TimeBounds` of the reader's wall clock: no
older than `max_age_ns` (Kafka's default retention: nothing older can be a real backlog) and
no newer than `max_skew_ns` ahead (node clocks are synchronized; a far-future time would
pin a watermark or mute an alert).
"""

from __future__ import annotations

from dataclasses import dataclass

S = 1_000_000_000
MiB = 1 << 20

# The agent's producer sends at most 4 MiB per request (producer/kafka_publisher.py).
MAX_MESSAGE_BYTES = 4 * MiB

DEFAULT_MAX_AGE_NS = 7 * 24 * 3600 * S
DEFAULT_MAX_SKEW_NS = 60 * S


class InputRejected(ValueError):
    """A message a reader will not use; str(exc) says why (the dead letter's reason)."""

    @property
    def reason(self) -> str:
        return str(self)


@dataclass(frozen=True)
class TimeBounds:
    """How far from the reader's wall clock an event's time may be."""

    max_age_ns: int = DEFAULT_MAX_AGE_NS
    max_skew_ns: int = DEFAULT_MAX_SKEW_NS

    def __post_init__(self) -> None:
        if self.max_age_ns <= 0 or self.max_skew_ns < 0:
            raise ValueError(
                f"time bounds must be positive: max age {self.max_age_ns} ns, "
                f"max skew {self.max_skew_ns} ns"
            )

    def check(self, oldest_ns: int, newest_ns: int, now_ns: int, what: str) -> None:
        """Raise InputRejected unless [oldest_ns, newest_ns] is within the bounds at now_ns."""
        if oldest_ns < now_ns - self.max_age_ns:
            raise InputRejected(
                f"{what} {oldest_ns} is {(now_ns - oldest_ns) / S:.0f} s in the past, more "
                f"than the maximum age {self.max_age_ns / S:.0f} s (--max-event-age)"
            )
        if newest_ns > now_ns + self.max_skew_ns:
            raise InputRejected(
                f"{what} {newest_ns} is {(newest_ns - now_ns) / S:.0f} s in the future, more "
                f"than the allowed clock skew {self.max_skew_ns / S:.0f} s (--max-clock-skew)"
            )


def check_size(value: bytes, what: str, limit: int = MAX_MESSAGE_BYTES) -> None:
    if len(value) > limit:
        raise InputRejected(f"{what}: {len(value)} bytes, more than the limit of {limit}")
