"""Test data for the join: span and net batches from readable rows, and a brute-force join.

The brute force (a Python loop over every span and event) is the ground truth the
vectorised join is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ebpf_apm.schemas.event_batch import HttpColumns, NetBatch, SpanBatch

HTTP_FUNC = "net/http.serverHandler.ServeHTTP"
NO_GOROUTINE = -1


@dataclass(frozen=True)
class Span:
    func: str
    start_ns: int
    end_ns: int
    tid: int
    goid: int = NO_GOROUTINE
    http: tuple[str, str, int] | None = None  # method, path, status


@dataclass(frozen=True)
class Net:
    ts_ns: int
    nbytes: int
    send: bool
    tid: int
    goid: int = NO_GOROUTINE


Totals = tuple[int, int, int, int]  # bytes_sent, bytes_received, net_sends, net_recvs


def span_batch(
    node: str, pid: int, spans: list[Span], k8s: dict[str, str | None] | None = None
) -> SpanBatch:
    funcs = sorted({s.func for s in spans})
    http_rows = [i for i, s in enumerate(spans) if s.http is not None]
    http = None
    if http_rows:
        http = HttpColumns(
            rows=np.array(http_rows, dtype=np.uint32),
            method=[spans[i].http[0] for i in http_rows],  # type: ignore[index]
            path=[spans[i].http[1] for i in http_rows],  # type: ignore[index]
            status=np.array([spans[i].http[2] for i in http_rows], dtype=np.uint16),  # type: ignore[index]
        )
    columns: dict[str, np.ndarray] = {
        "tid": np.array([s.tid for s in spans], dtype=np.uint32),
        "end_tid": np.array([s.tid for s in spans], dtype=np.uint32),
        "goid": np.array([s.goid for s in spans], dtype=np.int64),
        "func": np.array([funcs.index(s.func) for s in spans], dtype=np.uint32),
        "start_ns": np.array([s.start_ns for s in spans], dtype=np.int64),
        "end_ns": np.array([s.end_ns for s in spans], dtype=np.int64),
    }
    return SpanBatch(node, pid, f"/srv/app-{pid}", funcs, columns, http=http, k8s=k8s)


def net_batch(node: str, pid: int, events: list[Net]) -> NetBatch:
    n = len(events)
    columns: dict[str, np.ndarray] = {
        "tid": np.array([e.tid for e in events], dtype=np.uint32),
        "goid": np.array([e.goid for e in events], dtype=np.int64),
        "ts_ns": np.array([e.ts_ns for e in events], dtype=np.int64),
        "bytes": np.array([e.nbytes for e in events], dtype=np.int64),
        "direction": np.array([0 if e.send else 1 for e in events], dtype=np.uint8),
        "family": np.full(n, 2, dtype=np.uint8),
        "sport": np.full(n, 8080, dtype=np.uint16),
        "dport": np.full(n, 40000, dtype=np.uint16),
        "saddr": np.array([b"\x7f\x00\x00\x01"] * n, dtype="S16"),
        "daddr": np.array([b"\x7f\x00\x00\x01"] * n, dtype="S16"),
    }
    return NetBatch(node, pid, f"/srv/app-{pid}", columns)


def _thread(tid: int, goid: int) -> tuple[str, int]:
    return ("goroutine", goid) if goid >= 0 else ("thread", tid)


def brute_force(
    spans: dict[tuple[str, int], list[Span]], events: dict[tuple[str, int], list[Net]]
) -> dict[tuple[str, int, int], Totals]:
    """(node, pid, index of the span in its process's list) -> the I/O it contains."""
    result: dict[tuple[str, int, int], Totals] = {}
    for proc, proc_spans in spans.items():
        by_thread: dict[tuple[str, int], list[Net]] = {}
        for e in events.get(proc, []):
            by_thread.setdefault(_thread(e.tid, e.goid), []).append(e)
        for i, s in enumerate(proc_spans):
            sent = received = sends = recvs = 0
            for e in by_thread.get(_thread(s.tid, s.goid), []):
                if s.start_ns <= e.ts_ns <= s.end_ns:
                    if e.send:
                        sent, sends = sent + e.nbytes, sends + 1
                    else:
                        received, recvs = received + e.nbytes, recvs + 1
            result[(proc[0], proc[1], i)] = (sent, received, sends, recvs)
    return result


def http_traffic(
    rng: np.random.Generator,
    t0_ns: int,
    requests: int,
    goroutines: int,
    gap_ns: int = 2_000_000,
) -> tuple[list[Span], list[Net]]:
    """Keep-alive connections: each goroutine serves requests one after another. A request is
    a ServeHTTP span with a handler span inside; the request is read before ServeHTTP starts
    (that read matches nothing), the handler sends 1-3 chunks and ServeHTTP a final one.
    Some non-Go thread spans and events are mixed in."""
    spans: list[Span] = []
    events: list[Net] = []
    clock = {g: t0_ns + int(rng.integers(0, gap_ns)) for g in range(goroutines)}
    for r in range(requests):
        g = int(rng.integers(0, goroutines))
        goid = 100 + g
        tid = 5000 + int(rng.integers(0, 4))  # goroutines migrate between threads
        t = clock[g]
        events.append(Net(t, int(rng.integers(50, 500)), False, tid, goid))  # request read
        start = t + 1000
        handler_start = start + 500
        chunks = int(rng.integers(1, 4))
        ts = handler_start
        for _ in range(chunks):
            ts += int(rng.integers(1000, 200_000))
            tid = 5000 + int(rng.integers(0, 4))
            events.append(Net(ts, int(rng.integers(1, 10_000)), True, tid, goid))
        handler_end = ts + 700
        final = handler_end + 300
        events.append(Net(final, int(rng.integers(1, 100)), True, tid, goid))
        end = final + 200
        spans.append(Span("main.handle", handler_start, handler_end, tid, goid))
        spans.append(Span(HTTP_FUNC, start, end, tid, goid, ("GET", f"/item/{r}", 200)))
        clock[g] = end + int(rng.integers(1000, gap_ns))
        if r % 5 == 0:  # a C thread doing its own I/O, keyed by thread id
            ctid = 7000 + r % 3
            spans.append(Span("c_work", start, start + 50_000, ctid))
            events.append(Net(start + 10_000, 64, True, ctid))
            events.append(Net(start + 60_000, 64, False, ctid))  # after its span: unmatched
    return spans, events
