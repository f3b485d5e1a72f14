"""What a consumer does with an input message it cannot use: `apm.deadletter`, unchanged.

A dead letter keeps the original key and bytes, so it can be replayed once its producer is
fixed, with headers saying why it was rejected (`reason`) and where it came from (`source`:
topic/partition/offset). The consumer counts it and carries on with the next message.
"""

from __future__ import annotations

from dataclasses import dataclass

REASON_HEADER = "reason"
SOURCE_HEADER = "source"


@dataclass(frozen=True)
class DeadLetter:
    key: bytes | None
    value: bytes | None
    reason: str
    source: str  # topic/partition/offset

    @classmethod
    def of(
        cls,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        reason: str,
    ) -> DeadLetter:
        return cls(key, value, reason, f"{topic}/{partition}/{offset}")

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        return [(REASON_HEADER, self.reason.encode()), (SOURCE_HEADER, self.source.encode())]
