"""The join of one partition: each function span gets the network I/O of its goroutine.

A network event belongs to every span running on the same (process, goroutine) — the same
(process, thread) outside Go — whose [start_ns, end_ns] contains its timestamp: an HTTP
span `net/http.serverHandler.ServeHTTP` and the handler span inside it both count the bytes
the handler wrote. Spans wait until the watermark (consumers/event_clock.py) passes their
end, then are emitted with their totals, so out-of-order and late input within the allowed
lateness gives the same result as sorted input.

What arrives after the watermark is counted: a late network event is dropped (the spans it
belonged to may be out already), a late span is still emitted, with the events still kept.
Network events are kept for `max_span_ns` behind the watermark; a longer span gets only the
I/O of its last `max_span_ns` and is counted as truncated.

An HTTP/1 span's I/O runs to its `flushed_ns`: net/http writes the buffered response (often
all of it) in finishRequest, just after ServeHTTP returns, on the same goroutine; the agent
reports when that was done. Such a span waits for the watermark to pass that time.

Pure: wall-clock times are arguments (`now_ns`), the clock is never read here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import numpy as np

from ebpf_apm.consumers.event_clock import NET, SPANS, EventClock
from ebpf_apm.consumers.net_event_store import IoSums, NetEventStore, Peers, thread_codes
from ebpf_apm.schemas.event_batch import DIRECTION_RECV, NetBatch, SpanBatch

MS = 1_000_000


@dataclass(frozen=True)
class JoinSettings:
    allowed_lateness_ns: int = 2000 * MS
    idle_advance_ns: int = 1000 * MS
    # How long network events wait for the span that contains them to end.
    max_span_ns: int = 30_000 * MS
    # Spans leave in steps of this much event time (fewer, larger numpy steps).
    emit_step_ns: int = 100 * MS
    # Event time never runs ahead of the wall clock (`now_ns`): a batch from a clock that is
    # ahead, or a forged one, cannot push the watermark past what is real and make every
    # real event late. Off for tests whose event times are not tied to now_ns.
    event_time_at_most_now: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value < 0 or (f.name == "emit_step_ns" and value == 0):
                raise ValueError(f"JoinSettings.{f.name} must be positive, got {value}")


@dataclass
class JoinCounters:
    spans_in: int = 0
    spans_emitted: int = 0
    # Arrived after the watermark passed their end (emitted anyway).
    spans_late: int = 0
    # Started before network events were dropped (max_span_ns): their I/O may be partial.
    spans_truncated: int = 0
    net_in: int = 0
    # Arrived after the watermark passed them: dropped, not counted in any span.
    net_late: int = 0

    def add(self, other: JoinCounters) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(eq=False)
class JoinedSpans:
    """Spans `rows` of `batch`, ready to publish, with the I/O each contained."""

    batch: SpanBatch
    rows: np.ndarray
    io: IoSums
    token: object
    # The socket peer of each span's last network event (family 0: none).
    peers: Peers | None = None

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(eq=False)
class _WaitingSpans:
    batch: SpanBatch
    rows: np.ndarray
    end_ns: np.ndarray  # where the I/O of `rows` ends: end_ns, or an HTTP span's flushed_ns
    proc: int
    token: object


def io_end_ns(batch: SpanBatch) -> np.ndarray:
    """Per span, where its I/O ends: its end, or its response flush for HTTP/1 spans."""
    end = batch.columns["end_ns"]
    http = batch.http
    if http is None or http.flushed_ns is None or not len(http.rows):
        return end
    out = end.copy()
    out[http.rows] = np.maximum(end[http.rows], http.flushed_ns)
    return out


class PartitionJoiner:
    """Join state of one partition number (both topics); see the module docstring."""

    def __init__(self, settings: JoinSettings, now_ns: int) -> None:
        self.settings = settings
        self._clock = EventClock(settings.allowed_lateness_ns, settings.idle_advance_ns, now_ns)
        self._store = NetEventStore()
        self._waiting: list[_WaitingSpans] = []
        # Every event before this is frozen into the store and every span ending before it
        # has been emitted: the effective watermark.
        self._bound: int | None = None
        self.counters = JoinCounters()

    # -- input ----------------------------------------------------------------------------

    @staticmethod
    def _proc(node: str, pid: int) -> int:
        """The process's number in the store: a 63-bit hash of node/pid, so that no table
        grows with every process ever seen (a collision needs ~2**31 live processes)."""
        digest = hashlib.blake2b(f"{node}/{pid}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    def _event_time(self, newest_ns: int, now_ns: int) -> int:
        return min(newest_ns, now_ns) if self.settings.event_time_at_most_now else newest_ns

    def add_spans(self, batch: SpanBatch, token: object, now_ns: int) -> None:
        """Queue a (checked) span batch; `token` comes back with its joined spans."""
        n = len(batch)
        end = batch.columns["end_ns"]
        self._clock.observe(SPANS, self._event_time(int(end.max()), now_ns) if n else None, now_ns)
        if not n:
            return
        self.counters.spans_in += n
        end = io_end_ns(batch)
        if self._bound is not None:
            self.counters.spans_late += int(np.count_nonzero(end < self._bound))
        rows = np.arange(n)
        proc = self._proc(batch.node, batch.pid)
        self._waiting.append(_WaitingSpans(batch, rows, end, proc, token))

    def add_net(self, batch: NetBatch, now_ns: int) -> int | None:
        """Keep a (checked) net batch's events; returns the newest kept timestamp (None if
        none was kept: all late, or an empty batch)."""
        n = len(batch)
        cols = batch.columns
        ts = cols["ts_ns"]
        self._clock.observe(NET, self._event_time(int(ts.max()), now_ns) if n else None, now_ns)
        if not n:
            return None
        self.counters.net_in += n
        thread = thread_codes(cols["tid"], cols["goid"])
        nbytes, is_recv = cols["bytes"], cols["direction"] == DIRECTION_RECV
        family, port = cols["family"].astype(np.int64), cols["dport"].astype(np.int64)
        peers = Peers(family, cols["daddr"], port)
        if self._bound is not None:
            keep = ts >= self._bound
            kept = int(np.count_nonzero(keep))
            self.counters.net_late += n - kept
            if not kept:
                return None
            if kept < n:
                ts, thread, nbytes, is_recv = ts[keep], thread[keep], nbytes[keep], is_recv[keep]
                peers = peers.take(keep)
        self._store.add(self._proc(batch.node, batch.pid), thread, ts, nbytes, is_recv, peers)
        return int(ts.max())

    # -- output ---------------------------------------------------------------------------

    @property
    def watermark_ns(self) -> int | None:
        """Spans ending before this have been emitted; events before it are late."""
        return self._bound

    @property
    def kept_from_ns(self) -> int | None:
        """Every kept network event is at or after this (all older ones are dropped)."""
        return self._store.kept_from_ns

    @property
    def waiting_spans(self) -> int:
        return sum(len(w.rows) for w in self._waiting)

    @property
    def retained_events(self) -> int:
        return self._store.retained

    @property
    def unmatched_events(self) -> int:
        """Network events dropped from the store without any span containing them."""
        return self._store.unmatched

    def advance(
        self, now_ns: int, caught_up: tuple[bool, bool] = (True, True)
    ) -> list[JoinedSpans]:
        """Move the watermark to `now_ns`; return the spans it releases, with their I/O.
        `caught_up`: (spans, net) inputs fully read, so that quiet means idle."""
        watermark = self._clock.watermark(now_ns, caught_up)
        if watermark is None:
            return []
        step = self.settings.emit_step_ns
        bound = watermark - watermark % step
        if self._bound is None or bound > self._bound:
            self._store.freeze(bound)
            self._bound = bound
        ready = self._take_ready(self._bound)
        joined = self._join(ready) if ready else []
        self._store.evict(self._bound - self.settings.max_span_ns)
        return joined

    def _take_ready(self, bound: int) -> list[_WaitingSpans]:
        ready: list[_WaitingSpans] = []
        still: list[_WaitingSpans] = []
        for w in self._waiting:
            done = w.end_ns < bound
            if done.all():
                ready.append(w)
            elif done.any():
                ready.append(_WaitingSpans(w.batch, w.rows[done], w.end_ns[done], w.proc, w.token))
                rest = ~done
                still.append(_WaitingSpans(w.batch, w.rows[rest], w.end_ns[rest], w.proc, w.token))
            else:
                still.append(w)
        self._waiting = still
        return ready

    def _join(self, ready: list[_WaitingSpans]) -> list[JoinedSpans]:
        sizes = [len(w.rows) for w in ready]
        proc = np.repeat(np.array([w.proc for w in ready], dtype=np.int64), sizes)
        thread = np.concatenate(
            [thread_codes(w.batch.columns["tid"][w.rows], w.batch.columns["goid"][w.rows])
             for w in ready]
        )  # fmt: skip
        start = np.concatenate([w.batch.columns["start_ns"][w.rows] for w in ready])
        end = np.concatenate([w.end_ns for w in ready])
        peers = Peers.none(len(start))
        sums = self._store.sums(proc, thread, start, end, peers)
        dropped_through = self._store.dropped_through_ns
        if dropped_through is not None:
            self.counters.spans_truncated += int(np.count_nonzero(start < dropped_through))
        self.counters.spans_emitted += len(start)
        joined: list[JoinedSpans] = []
        offset = 0
        for w, size in zip(ready, sizes, strict=True):
            part = slice(offset, offset + size)
            io = IoSums(
                sums.bytes_sent[part],
                sums.bytes_received[part],
                sums.sends[part],
                sums.recvs[part],
            )
            joined.append(JoinedSpans(w.batch, w.rows, io, w.token, peers.take(part)))
            offset += size
        return joined
