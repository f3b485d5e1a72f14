"""Which input offsets the join may commit: at-least-once bookkeeping for one partition.

An input message is done when everything it contributed to is acknowledged by Kafka:
- a span batch, when each of its spans has been emitted to `apm.spans` and acknowledged
  (spans still waiting for the watermark hold the offset back);
- a dead-lettered message, when its copy in `apm.deadletter` is acknowledged;
- a net batch, when its events have left the join's store *and* every span emitted up to
  that moment is acknowledged: a span in flight may have counted them, and if it is lost a
  new owner must find the events again when it re-reads from the committed offset.

The committable offset of a topic-partition is that of its oldest message not done (or the
one after the newest message, when all are done). Pure bookkeeping, no I/O.
"""

from __future__ import annotations

from collections import deque


class InputMessage:
    """One consumed message; `outstanding` counts its unacknowledged outputs."""

    __slots__ = ("offset", "outstanding", "newest_kept_ns", "record")

    def __init__(
        self,
        offset: int,
        outstanding: int,
        newest_kept_ns: int | None,
        record: object | None = None,
    ) -> None:
        self.offset = offset
        self.outstanding = outstanding
        # Net batches: newest timestamp among the events the join kept (None: kept none).
        self.newest_kept_ns = newest_kept_ns
        # The consumed record itself while its spans wait: what is dead-lettered if they
        # cannot be processed.
        self.record = record


class TopicPartitionLedger:
    """Consumed messages of one input topic-partition, oldest first, until done."""

    def __init__(self) -> None:
        self._messages: deque[InputMessage] = deque()
        self._next_offset: int | None = None

    def track(
        self,
        offset: int,
        outstanding: int = 0,
        newest_kept_ns: int | None = None,
        record: object | None = None,
    ) -> InputMessage:
        message = InputMessage(offset, outstanding, newest_kept_ns, record)
        self._messages.append(message)
        self._next_offset = offset + 1
        return message

    def __len__(self) -> int:
        return len(self._messages)

    def committable(self, safe_kept_from_ns: int | None) -> int | None:
        """The offset to commit: every message before it is done. None before any message.

        `safe_kept_from_ns`: the store had dropped every event before this time at a
        moment after which all emitted spans are acknowledged (see EmitSteps)."""
        messages = self._messages
        while messages:
            head = messages[0]
            if head.outstanding > 0:
                break
            kept = head.newest_kept_ns
            if kept is not None and (safe_kept_from_ns is None or kept >= safe_kept_from_ns):
                break
            messages.popleft()
        return messages[0].offset if messages else self._next_offset


class EmitStep:
    """The outputs of one `advance()`: Kafka batches still unacknowledged, plus one
    reference held while the step is still being sent (see `EmitSteps.open`)."""

    __slots__ = ("outstanding", "kept_from_ns")

    def __init__(self, kept_from_ns: int | None) -> None:
        self.outstanding = 1
        self.kept_from_ns = kept_from_ns


class EmitSteps:
    """Emit steps of one partition in order, to know what net events are safe to forget."""

    def __init__(self) -> None:
        self._steps: deque[EmitStep] = deque()
        self.safe_kept_from_ns: int | None = None

    def open(self, kept_from_ns: int | None) -> EmitStep:
        """A new step, after the store dropped every event before `kept_from_ns`.
        Call `close(step)` once all its batches are handed to the producer."""
        step = EmitStep(kept_from_ns)
        self._steps.append(step)
        return step

    def close(self, step: EmitStep) -> None:
        self.acked(step)

    def acked(self, step: EmitStep) -> None:
        step.outstanding -= 1
        steps = self._steps
        while steps and steps[0].outstanding == 0:
            done = steps.popleft()
            if done.kept_from_ns is not None:
                self.safe_kept_from_ns = done.kept_from_ns

    def __len__(self) -> int:
        return len(self._steps)
