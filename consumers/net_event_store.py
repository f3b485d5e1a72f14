"""Network events of one join partition, kept until no span that contains them can arrive.

A span reaches the join only when its function returns, so the sends and receives it
contains arrive first and must wait. Events come in unsorted (`recent`); once the watermark
passes them they are frozen into immutable *pieces*: each piece holds one slice of event
time, sorted by (process, thread, time), with running sums of bytes and calls. The sum over
any span's events is then two `searchsorted` lookups and a subtraction, for all spans of a
step at once: no Python call per event or per span.

Inside a piece, one sortable int64 per event says where it is: `segment * scale + (ts -
t_lo)`, where `segment` numbers the piece's (process, thread) pairs in order and `scale` is
the piece's time width. Small pieces are merged with their older neighbour (sizes as in a
binary counter, so each event is merged O(log n) times) up to a time width and size cap;
whole pieces are dropped once they are older than the longest span the join waits for.

Events that no emitted span contained when their piece is dropped are counted as unmatched
(for example what a keep-alive connection's goroutine reads between two requests).

Each event also keeps its socket's remote end (`Peers`); a span's peer is that of the last
event inside it on its goroutine: for a client that does its I/O on the calling goroutine
(database/sql drivers such as lib/pq), the server it talked to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ebpf_apm.schemas import event_batch

# A thread code is one int64 per event or span: the goroutine (goid + 2**32) in Go, else the
# kernel thread id. The (process, thread) code of a piece keeps it in the low 48 bits.
GOID_BASE = 1 << 32
THREAD_BITS = 48
MAX_GOID = (1 << THREAD_BITS) - GOID_BASE - 1
assert MAX_GOID == event_batch.MAX_GOID, "the batch decoders' goroutine limit"
_THREAD_MASK = (1 << THREAD_BITS) - 1
# segment * scale must stay below this (int64 keys).
_KEY_LIMIT = 1 << 62

I64 = np.int64


def thread_codes(tid: np.ndarray, goid: np.ndarray) -> np.ndarray:
    """The join key inside a process: goroutine when known (goid >= 0), else thread id."""
    return np.where(goid >= 0, goid.astype(I64) + GOID_BASE, tid.astype(I64))


def _with_zero(values: np.ndarray) -> np.ndarray:
    out = np.zeros(len(values) + 1, dtype=I64)
    np.cumsum(values, out=out[1:])
    return out


@dataclass(frozen=True)
class IoSums:
    """Per-span totals of the events it contains, aligned with the spans queried (in the
    order of the last four fields of schemas/span.avsc, which span_avro relies on)."""

    bytes_sent: np.ndarray
    bytes_received: np.ndarray
    sends: np.ndarray
    recvs: np.ndarray

    @classmethod
    def zeros(cls, n: int) -> IoSums:
        return cls(*(np.zeros(n, dtype=I64) for _ in range(4)))


@dataclass
class Peers:
    """Remote ends of sockets, one per event or span: `family` 0 (none or unknown), 2 (IPv4,
    the address in the first 4 bytes of `addr`) or 10 (IPv6)."""

    family: np.ndarray  # int64
    addr: np.ndarray  # S16
    port: np.ndarray  # int64

    @classmethod
    def none(cls, n: int) -> Peers:
        return cls(np.zeros(n, dtype=I64), np.zeros(n, dtype="S16"), np.zeros(n, dtype=I64))

    def take(self, index: np.ndarray | slice) -> Peers:
        return Peers(self.family[index], self.addr[index], self.port[index])

    @staticmethod
    def concat(parts: list[Peers]) -> Peers:
        return Peers(
            np.concatenate([p.family for p in parts]),
            np.concatenate([p.addr for p in parts]),
            np.concatenate([p.port for p in parts]),
        )


@dataclass(eq=False)
class _Events:
    """Unsorted events: one chunk of `recent`, or a piece's events taken apart for a merge."""

    proc: np.ndarray  # int64 process number (per partition)
    thread: np.ndarray  # int64 thread code
    ts: np.ndarray
    nbytes: np.ndarray
    is_recv: np.ndarray  # bool
    matched: np.ndarray | None = None
    peers: Peers | None = None

    def take(self, index: np.ndarray) -> _Events:
        matched = None if self.matched is None else self.matched[index]
        return _Events(
            self.proc[index],
            self.thread[index],
            self.ts[index],
            self.nbytes[index],
            self.is_recv[index],
            matched,
            None if self.peers is None else self.peers.take(index),
        )

    def all_peers(self) -> Peers:
        return self.peers if self.peers is not None else Peers.none(len(self.ts))

    @staticmethod
    def concat(parts: list[_Events]) -> _Events:
        if len(parts) == 1:
            return parts[0]
        matched = None
        if any(p.matched is not None for p in parts):
            matched = np.concatenate(
                [p.matched if p.matched is not None else np.zeros(len(p.ts), bool) for p in parts]
            )
        return _Events(
            np.concatenate([p.proc for p in parts]),
            np.concatenate([p.thread for p in parts]),
            np.concatenate([p.ts for p in parts]),
            np.concatenate([p.nbytes for p in parts]),
            np.concatenate([p.is_recv for p in parts]),
            matched,
            Peers.concat([p.all_peers() for p in parts]),
        )


class NetPiece:
    """Immutable, sorted events of one slice of event time (see the module docstring)."""

    def __init__(self, events: _Events, order: np.ndarray, procs: np.ndarray) -> None:
        """`order` sorts `events` by (process, thread, ts); `procs` are their sorted
        distinct process numbers."""
        self.procs = procs
        code = self._codes(events.proc[order], events.thread[order])
        ts = events.ts[order]
        n = len(ts)
        first = np.empty(n, dtype=bool)
        first[0] = True
        np.not_equal(code[1:], code[:-1], out=first[1:])
        self.seg_codes = code[first]
        self.t_lo = int(ts.min())
        self.t_hi = int(ts.max())
        self.scale = self.t_hi - self.t_lo + 1
        self.keys = (np.cumsum(first) - 1) * self.scale + (ts - self.t_lo)
        nbytes = events.nbytes[order]
        is_recv = events.is_recv[order]
        self.cum_sent = _with_zero(np.where(is_recv, 0, nbytes))
        self.cum_received = _with_zero(np.where(is_recv, nbytes, 0))
        self.cum_recvs = _with_zero(is_recv)
        self._matched = None if events.matched is None else events.matched[order]
        self.peers = events.all_peers().take(order)
        self._cover_lo: list[np.ndarray] = []
        self._cover_hi: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.keys)

    def _codes(self, proc: np.ndarray, thread: np.ndarray) -> np.ndarray:
        rank = np.searchsorted(self.procs, proc).astype(I64)
        return (rank << THREAD_BITS) | thread

    @staticmethod
    def fits(segments: int, t_lo: int, t_hi: int) -> bool:
        return segments * (t_hi - t_lo + 1) < _KEY_LIMIT

    def add_sums(
        self,
        proc: np.ndarray,
        thread: np.ndarray,
        start: np.ndarray,
        end: np.ndarray,
        sums: IoSums,
        peers: Peers | None = None,
    ) -> None:
        """Add the I/O of this piece's events inside each span [start, end] to `sums`; in
        `peers`, the peer of each span's last event here (a later piece overwrites it)."""
        idx = np.flatnonzero((start <= self.t_hi) & (end >= self.t_lo))
        if not len(idx):
            return
        p = proc[idx]
        rank = np.minimum(np.searchsorted(self.procs, p), len(self.procs) - 1)
        found = self.procs[rank] == p
        code = (rank.astype(I64) << THREAD_BITS) | thread[idx]
        seg = np.minimum(np.searchsorted(self.seg_codes, code), len(self.seg_codes) - 1)
        found &= self.seg_codes[seg] == code
        idx, seg = idx[found], seg[found]
        if not len(idx):
            return
        base = seg * self.scale
        lo = np.searchsorted(self.keys, base + np.clip(start[idx] - self.t_lo, 0, self.scale))
        hi = np.searchsorted(self.keys, base + np.clip(end[idx] - self.t_lo + 1, 0, self.scale))
        received = self.cum_received[hi] - self.cum_received[lo]
        recvs = self.cum_recvs[hi] - self.cum_recvs[lo]
        sums.bytes_sent[idx] += self.cum_sent[hi] - self.cum_sent[lo]
        sums.bytes_received[idx] += received
        sums.recvs[idx] += recvs
        sums.sends[idx] += (hi - lo) - recvs
        hit = hi > lo
        if peers is not None and hit.any():
            spans, last = idx[hit], hi[hit] - 1
            peers.family[spans] = self.peers.family[last]
            peers.addr[spans] = self.peers.addr[last]
            peers.port[spans] = self.peers.port[last]
        self._cover_lo.append(lo[hit])
        self._cover_hi.append(hi[hit])

    def matched(self) -> np.ndarray:
        """Which events some queried span contained (bool per event, in piece order)."""
        n = len(self)
        if self._cover_lo:
            lo = np.concatenate(self._cover_lo)
            hi = np.concatenate(self._cover_hi)
            depth = np.cumsum(np.bincount(lo, minlength=n + 1) - np.bincount(hi, minlength=n + 1))
            covered = depth[:n] > 0
            self._matched = covered if self._matched is None else covered | self._matched
            self._cover_lo, self._cover_hi = [], []
        return self._matched if self._matched is not None else np.zeros(n, dtype=bool)

    def unmatched(self) -> int:
        return int(len(self) - np.count_nonzero(self.matched()))

    def events(self) -> _Events:
        """The piece's events back as columns (in piece order), for a merge."""
        seg = self.keys // self.scale
        code = self.seg_codes[seg]
        recvs = np.diff(self.cum_recvs).astype(bool)
        nbytes = np.diff(self.cum_sent) + np.diff(self.cum_received)
        return _Events(
            self.procs[code >> THREAD_BITS],
            code & _THREAD_MASK,
            self.keys - seg * self.scale + self.t_lo,
            nbytes,
            recvs,
            self.matched(),
            self.peers,
        )


def build_pieces(events: _Events, procs: np.ndarray) -> list[NetPiece]:
    """Sort events into one piece, or several by time if one would overflow its keys."""
    order = np.lexsort((events.ts, events.thread, events.proc))
    piece = NetPiece(events, order, procs)
    if NetPiece.fits(len(piece.seg_codes), piece.t_lo, piece.t_hi) or len(events.ts) < 2:
        return [piece]
    # Only with absurd timestamps (hours apart inside one slice): split the slice in time.
    by_time = np.argsort(events.ts, kind="stable")
    half = len(by_time) // 2
    return [
        p
        for part in (by_time[:half], by_time[half:])
        for p in build_pieces(events.take(part), procs)
    ]


def merge_pieces(older: NetPiece, newer: NetPiece) -> NetPiece:
    """One piece from two adjacent ones (every event of `older` is before `newer`'s)."""
    events = _Events.concat([older.events(), newer.events()])
    procs = np.union1d(older.procs, newer.procs)
    rank = np.searchsorted(procs, events.proc).astype(I64)
    # Both halves are sorted by (process, thread, ts) and older's times come first, so a
    # stable sort on (process, thread) alone is a merge of two runs.
    order = np.argsort((rank << THREAD_BITS) | events.thread, kind="stable")
    return NetPiece(events, order, procs)


class NetEventStore:
    """Retained network events of one partition: recent (unsorted) and frozen pieces."""

    def __init__(self, max_piece_ns: int = 1 << 31, max_piece_events: int = 1 << 21) -> None:
        self._max_piece_ns = max_piece_ns
        self._max_piece_events = max_piece_events
        self._recent: list[_Events] = []
        self._pieces: list[NetPiece] = []
        self.frozen_through_ns: int | None = None
        # Every dropped event was before this (a span starting earlier may miss some).
        self.dropped_through_ns: int | None = None
        self.unmatched = 0
        self.evicted = 0

    @property
    def retained(self) -> int:
        return sum(len(c.ts) for c in self._recent) + sum(len(p) for p in self._pieces)

    @property
    def piece_count(self) -> int:
        return len(self._pieces)

    @property
    def kept_from_ns(self) -> int | None:
        """No retained event is older than this: every event before it was dropped (or
        never kept)."""
        if self._pieces:
            return self._pieces[0].t_lo
        return self.frozen_through_ns

    def add(
        self,
        proc: int,
        thread: np.ndarray,
        ts: np.ndarray,
        nbytes: np.ndarray,
        is_recv: np.ndarray,
        peers: Peers | None = None,
    ) -> None:
        """Events of one process, none older than `frozen_through_ns` (the caller drops
        those as late)."""
        if len(ts):
            procs = np.full(len(ts), proc, dtype=I64)
            self._recent.append(_Events(procs, thread, ts, nbytes, is_recv, None, peers))

    def freeze(self, bound_ns: int) -> None:
        """Move every recent event older than `bound_ns` into a new piece."""
        moving: list[_Events] = []
        staying: list[_Events] = []
        for chunk in self._recent:
            older = chunk.ts < bound_ns
            if older.all():
                moving.append(chunk)
            elif older.any():
                moving.append(chunk.take(older))
                staying.append(chunk.take(~older))
            else:
                staying.append(chunk)
        self._recent = staying
        self.frozen_through_ns = bound_ns
        if not moving:
            return
        procs = np.unique(np.array([c.proc[0] for c in moving], dtype=I64))
        for piece in build_pieces(_Events.concat(moving), procs):
            self._pieces.append(piece)
            self._compact()

    def _compact(self) -> None:
        pieces = self._pieces
        while len(pieces) >= 2:
            older, newer = pieces[-2], pieces[-1]
            segments = len(older.seg_codes) + len(newer.seg_codes)
            if (
                len(older) > len(newer)
                or len(older) + len(newer) > self._max_piece_events
                or newer.t_hi - older.t_lo > self._max_piece_ns
                or not NetPiece.fits(segments, older.t_lo, newer.t_hi)
            ):
                return
            pieces[-2:] = [merge_pieces(older, newer)]

    def sums(
        self,
        proc: np.ndarray,
        thread: np.ndarray,
        start: np.ndarray,
        end: np.ndarray,
        peers: Peers | None = None,
    ) -> IoSums:
        """I/O of the frozen events inside each span (all spans must end before the frozen
        bound, or they miss the recent events); with `peers`, each span's last peer."""
        sums = IoSums.zeros(len(start))
        if not len(start) or not self._pieces:
            return sums
        first, last = int(start.min()), int(end.max())
        for piece in self._pieces:  # oldest first: a later piece's last event wins
            if piece.t_hi >= first and piece.t_lo <= last:
                piece.add_sums(proc, thread, start, end, sums, peers)
        return sums

    def evict(self, horizon_ns: int) -> None:
        """Drop the pieces whose events are all older than `horizon_ns`."""
        dropped = 0
        for piece in self._pieces:
            if piece.t_hi >= horizon_ns:
                break
            self.unmatched += piece.unmatched()
            self.evicted += len(piece)
            self.dropped_through_ns = piece.t_hi + 1
            dropped += 1
        if dropped:
            del self._pieces[:dropped]
