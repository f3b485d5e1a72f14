"""Event time of one partition of the join: a watermark over two inputs, with idle advance.

The join reads spans (`apm.uprobe.events`) and network events (`apm.kprobe.events`) of one
partition number. Each input's event time is the newest timestamp seen on it; the watermark
is the older of the two minus the allowed lateness, because the slower input decides what
can still arrive (a consumer catching up on a backlog fetches the two topics at different
speeds). The watermark says: nothing older than this will arrive any more.

When an input goes quiet for `idle_advance_ns` of wall-clock time, its event time keeps
moving with the wall clock from the moment its last record arrived, so the last spans of a
burst are emitted without new traffic. The advance is measured from the arrival, not read
from the wall clock directly, so a node whose clock is off does not move the watermark.
An input that has never delivered anything stops holding the watermark back once it has been
quiet for `idle_advance_ns` (a process that does no network I/O).

Quiet only counts while the input is caught up (the consumer has read everything Kafka has
for it): a topic whose first fetch is slow, or that is behind on a backlog, is not idle.

Pure: wall-clock times are arguments, the clock is never read here.
"""

from __future__ import annotations

SPANS = 0
NET = 1
_INPUTS = (SPANS, NET)


class EventClock:
    """Watermark of one partition (see the module docstring); never moves backwards."""

    def __init__(self, allowed_lateness_ns: int, idle_advance_ns: int, now_ns: int) -> None:
        self._lateness_ns = allowed_lateness_ns
        self._idle_ns = idle_advance_ns
        self._newest: list[int | None] = [None, None]
        # An input that never delivered counts as quiet since the clock started.
        self._arrival_ns = [now_ns, now_ns]
        self._watermark: int | None = None

    def observe(self, source: int, newest_event_ns: int | None, now_ns: int) -> None:
        """A message arrived on `source` (SPANS or NET); `newest_event_ns` is its newest
        timestamp, None when it held no events."""
        self._arrival_ns[source] = now_ns
        if newest_event_ns is not None:
            current = self._newest[source]
            if current is None or newest_event_ns > current:
                self._newest[source] = newest_event_ns

    def _idle(self, source: int, now_ns: int, caught_up: bool) -> bool:
        return caught_up and now_ns - self._arrival_ns[source] >= self._idle_ns

    def event_time(self, source: int, now_ns: int, caught_up: bool = True) -> int | None:
        """The input's event time: its newest timestamp, extended by the wall-clock time
        since its last arrival once it is idle (caught up and quiet for the idle advance)."""
        newest = self._newest[source]
        if newest is None:
            return None
        if self._idle(source, now_ns, caught_up):
            return newest + now_ns - self._arrival_ns[source]
        return newest

    def watermark(self, now_ns: int, caught_up: tuple[bool, bool] = (True, True)) -> int | None:
        """Event time before which no record is expected any more; None until known.
        `caught_up[SPANS]`, `caught_up[NET]`: whether the consumer has read all there is."""
        times: list[int] = []
        for source in _INPUTS:
            time_ns = self.event_time(source, now_ns, caught_up[source])
            if time_ns is not None:
                times.append(time_ns)
            elif not self._idle(source, now_ns, caught_up[source]):
                return self._watermark  # an input that may still deliver holds it back
        if times:
            candidate = min(times) - self._lateness_ns
            if self._watermark is None or candidate > self._watermark:
                self._watermark = candidate
        return self._watermark
