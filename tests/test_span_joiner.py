"""The pure join: containment per goroutine or thread, watermarks, lateness, eviction.

Every expected figure comes from the rows the test writes (or from a brute-force loop over
them); times are arguments, so nothing here depends on the machine's clock or speed.
"""

from __future__ import annotations

import numpy as np
import pytest
from join_data import HTTP_FUNC, Net, Span, Totals, brute_force, http_traffic, net_batch, span_batch

from ebpf_apm.consumers.event_clock import NET, SPANS, EventClock
from ebpf_apm.consumers.span_joiner import JoinedSpans, JoinSettings, PartitionJoiner
from ebpf_apm.schemas.event_batch import (
    BatchDecodeError,
    decode_net_batch,
    decode_span_batch,
    encode_net_batch,
    encode_span_batch,
)

MS = 1_000_000
S = 1000 * MS
T0 = 1_750_000_000 * S  # event times: Unix epoch ns
LATENESS = 500 * MS
IDLE = 300 * MS
SETTINGS = JoinSettings(allowed_lateness_ns=LATENESS, idle_advance_ns=IDLE, emit_step_ns=10 * MS)


def totals(joined: list[JoinedSpans]) -> dict[tuple[object, int], Totals]:
    """(token, row in its batch) -> (bytes_sent, bytes_received, net_sends, net_recvs)."""
    out: dict[tuple[object, int], Totals] = {}
    for part in joined:
        io = part.io
        for k, row in enumerate(part.rows.tolist()):
            key = (part.token, row)
            assert key not in out, f"span {key} emitted twice"
            out[key] = (
                int(io.bytes_sent[k]),
                int(io.bytes_received[k]),
                int(io.sends[k]),
                int(io.recvs[k]),
            )
    return out


def drain(joiner: PartitionJoiner, now_ns: int) -> list[JoinedSpans]:
    """Advance far enough (idle input) that every waiting span is released."""
    return joiner.advance(now_ns + IDLE + LATENESS + 10 * S)


# -- containment ------------------------------------------------------------------------


def test_nested_spans_on_one_goroutine_both_count_its_io() -> None:
    spans = [
        Span(HTTP_FUNC, T0 + 100, T0 + 1000, tid=7, goid=40, http=("GET", "/a", 200)),
        Span("main.handler", T0 + 200, T0 + 900, tid=8, goid=40),
    ]
    events = [
        Net(T0 + 150, 300, send=False, tid=7, goid=40),  # request body: ServeHTTP only
        Net(T0 + 200, 1000, send=True, tid=9, goid=40),  # at the handler's start: both
        Net(T0 + 500, 20, send=True, tid=8, goid=40),  # inside both (another thread)
        Net(T0 + 900, 3, send=True, tid=8, goid=40),  # at the handler's end: both
        Net(T0 + 950, 5, send=True, tid=7, goid=40),  # after the handler: ServeHTTP only
        Net(T0 + 500, 777, send=True, tid=8, goid=41),  # another goroutine: neither
    ]
    joiner = PartitionJoiner(SETTINGS, now_ns=0)
    joiner.add_net(net_batch("n", 1, events), now_ns=0)
    joiner.add_spans(span_batch("n", 1, spans), "b", now_ns=0)
    got = totals(drain(joiner, 0))
    assert got == {("b", 0): (1028, 300, 4, 1), ("b", 1): (1023, 0, 3, 0)}


def test_an_http_span_owns_its_response_flush_after_servehttp_returns() -> None:
    """net/http writes the buffered response in finishRequest, after ServeHTTP returned; the
    agent reports when (flushed_ns). The HTTP span gets those sends, its handler does not,
    and the next request on the keep-alive goroutine is not touched."""
    spans = [
        Span(HTTP_FUNC, T0 + 100, T0 + 1000, tid=7, goid=40, http=("GET", "/a", 200)),
        Span("main.handler", T0 + 200, T0 + 900, tid=7, goid=40),
        Span(HTTP_FUNC, T0 + 2000, T0 + 3000, tid=7, goid=40, http=("GET", "/b", 200)),
    ]
    events = [
        Net(T0 + 500, 10, send=True, tid=7, goid=40),  # handler wrote and flushed: all
        Net(T0 + 1010, 4096, send=True, tid=7, goid=40),  # finishRequest's flush: HTTP only
        Net(T0 + 1500, 80, send=False, tid=7, goid=40),  # next request read: no span
        Net(T0 + 3005, 64, send=True, tid=7, goid=40),  # /b's flush
    ]
    batch = span_batch("n", 1, spans)
    assert batch.http is not None
    batch.http.flushed_ns = np.array([T0 + 1020, T0 + 3010], dtype=np.int64)
    joiner = PartitionJoiner(SETTINGS, now_ns=0)
    joiner.add_net(net_batch("n", 1, events), now_ns=0)
    joiner.add_spans(batch, "b", now_ns=0)
    got = totals(drain(joiner, 0))
    assert got == {("b", 0): (4106, 0, 2, 0), ("b", 1): (10, 0, 1, 0), ("b", 2): (64, 0, 1, 0)}


def test_keep_alive_goroutine_reuse_attributes_io_per_request_and_reads_between_match_nothing():
    # One connection goroutine serves three requests; each request is read before ServeHTTP
    # starts, so those reads belong to no span.
    goid, reqs = 77, [(1_000, 2_000), (5_000, 6_000), (9_000, 9_500)]
    spans = [Span(HTTP_FUNC, T0 + a, T0 + b, tid=3, goid=goid) for a, b in reqs]
    events = []
    for i, (a, b) in enumerate(reqs):
        events.append(Net(T0 + a - 100, 40 + i, send=False, tid=3, goid=goid))  # between
        events.append(Net(T0 + (a + b) // 2, 1000 * (i + 1), send=True, tid=4, goid=goid))
    events.append(Net(T0 + 12_000, 1, send=False, tid=3, goid=goid))  # EOF read, after all
    settings = JoinSettings(LATENESS, IDLE, max_span_ns=1 * S, emit_step_ns=10 * MS)
    joiner = PartitionJoiner(settings, now_ns=0)
    joiner.add_net(net_batch("n", 1, events), now_ns=0)
    joiner.add_spans(span_batch("n", 1, spans), "b", now_ns=0)
    got = totals(drain(joiner, 0))
    assert got == {("b", i): (1000 * (i + 1), 0, 1, 0) for i in range(3)}
    # Once the store has dropped them (max_span_ns behind the watermark), the four reads
    # outside every span are reported as never matched.
    joiner.advance(100 * S)
    assert joiner.unmatched_events == 4
    assert joiner.retained_events == 0


def test_thread_keys_outside_go_never_meet_goroutine_keys_or_other_processes() -> None:
    spans = [Span("c_handler", T0 + 10, T0 + 90, tid=12)]  # goid -1: keyed by thread 12
    events = [
        Net(T0 + 50, 11, send=True, tid=12),  # same thread: counts
        Net(T0 + 50, 22, send=True, tid=99, goid=12),  # goroutine 12: not thread 12
        Net(T0 + 50, 33, send=True, tid=13),  # another thread
    ]
    other_process = [Net(T0 + 50, 44, send=True, tid=12)]
    joiner = PartitionJoiner(SETTINGS, now_ns=0)
    joiner.add_net(net_batch("n", 1, events), now_ns=0)
    joiner.add_net(net_batch("n", 2, other_process), now_ns=0)
    joiner.add_net(net_batch("other-node", 1, other_process), now_ns=0)
    joiner.add_spans(span_batch("n", 1, spans), "b", now_ns=0)
    assert totals(drain(joiner, 0)) == {("b", 0): (11, 0, 1, 0)}


def test_random_traffic_matches_brute_force_across_batches_and_processes() -> None:
    rng = np.random.default_rng(23)
    spans: dict[tuple[str, int], list[Span]] = {}
    events: dict[tuple[str, int], list[Net]] = {}
    joiner = PartitionJoiner(SETTINGS, now_ns=0)
    for node, pid in (("n1", 10), ("n1", 11), ("n2", 10)):
        s, e = http_traffic(rng, T0, requests=150, goroutines=6)
        spans[(node, pid)], events[(node, pid)] = s, e
        joiner.add_net(net_batch(node, pid, e), now_ns=0)
    for (node, pid), s in spans.items():  # every span after every event: the join waits
        joiner.add_spans(span_batch(node, pid, s), (node, pid), now_ns=0)
    got = totals(drain(joiner, 0))
    expected = brute_force(spans, events)
    assert {(t[0], t[1], row): v for (t, row), v in got.items()} == expected  # type: ignore[index]
    assert sum(v[2] + v[3] for v in expected.values()) > 1000  # the data does exercise it


# -- event time -------------------------------------------------------------------------


def _timed_batches(rng: np.random.Generator) -> tuple[list, dict, dict]:
    """Traffic of two processes cut into 20 ms batches of each kind, tagged with the time
    the agent would publish them (the end of their slice)."""
    spans, events, batches = {}, {}, []
    for pid in (1, 2):
        s, e = http_traffic(rng, T0, requests=300, goroutines=8, gap_ns=50 * MS)
        spans[("n", pid)], events[("n", pid)] = s, e
        slice_ns = 20 * MS
        for kind, rows, when in (("spans", s, lambda x: x.end_ns), ("net", e, lambda x: x.ts_ns)):
            by_slice: dict[int, list] = {}
            for row in rows:
                by_slice.setdefault((when(row) - T0) // slice_ns, []).append(row)
            for k, part in by_slice.items():
                batches.append((kind, pid, part, T0 + (k + 1) * slice_ns))
    return batches, spans, events


def _replay(batches: list, order: list[int]) -> tuple[dict, PartitionJoiner]:
    joiner = PartitionJoiner(SETTINGS, now_ns=T0)
    joined: list[JoinedSpans] = []
    now = T0
    for i in order:
        kind, pid, rows, published = batches[i]
        now = max(now, published)  # arrival: wall clock keeps moving forward
        if kind == "net":
            joiner.add_net(net_batch("n", pid, rows), now)
        else:
            joiner.add_spans(span_batch("n", pid, rows), (pid, tuple(rows)), now)
        joined.extend(joiner.advance(now))
    assert sum(len(j) for j in joined) > joiner.counters.spans_in // 2  # most before the end
    joined.extend(drain(joiner, now))
    by_span = totals(joined)
    return {(t[0], t[1][row]): v for (t, row), v in by_span.items()}, joiner  # type: ignore[index]


def test_shuffled_batches_within_lateness_give_the_sorted_result() -> None:
    rng = np.random.default_rng(5)
    batches, spans, events = _timed_batches(rng)
    in_order = sorted(range(len(batches)), key=lambda i: batches[i][3])
    # Shuffle within windows of 200 ms of publish time: well inside the 500 ms lateness.
    jitter = rng.integers(0, 200 * MS, len(batches))
    shuffled = sorted(range(len(batches)), key=lambda i: batches[i][3] + jitter[i])
    sorted_result, first = _replay(batches, in_order)
    shuffled_result, second = _replay(batches, shuffled)
    assert shuffled_result == sorted_result
    assert first.counters.net_late == second.counters.net_late == 0
    expected = brute_force(spans, events)
    by_span = {(pid, spans[(node, pid)][i]): v for (node, pid, i), v in expected.items()}
    assert sorted_result == by_span


def test_events_later_than_the_allowed_lateness_are_counted_and_late_spans_still_emitted():
    joiner = PartitionJoiner(SETTINGS, now_ns=0)
    span = Span("main.f", T0 + 100 * MS, T0 + 200 * MS, tid=1, goid=5)
    joiner.add_net(net_batch("n", 1, [Net(T0 + 150 * MS, 10, True, 1, 5)]), now_ns=0)
    joiner.add_spans(span_batch("n", 1, [span]), "first", now_ns=0)
    # Both inputs move to T0 + 3 s: the watermark is T0 + 2.5 s.
    joiner.add_net(net_batch("n", 1, [Net(T0 + 3 * S, 1, True, 1, 9)]), now_ns=1)
    joiner.add_spans(span_batch("n", 1, [Span("main.g", T0 + 3 * S, T0 + 3 * S, 1, 9)]), "x", 1)
    assert totals(joiner.advance(1)) == {("first", 0): (10, 0, 1, 0)}
    # Too late: an event 1 s behind the watermark, and a span that ended before it.
    joiner.add_net(net_batch("n", 1, [Net(T0 + 1500 * MS, 99, True, 1, 6)]), now_ns=2)
    late_span = Span("main.h", T0 + 1400 * MS, T0 + 1600 * MS, tid=1, goid=6)
    joiner.add_spans(span_batch("n", 1, [late_span]), "late", now_ns=2)
    assert totals(joiner.advance(2)) == {("late", 0): (0, 0, 0, 0)}
    assert joiner.counters.net_late == 1
    assert joiner.counters.spans_late == 1
    assert joiner.counters.spans_emitted == 2


def test_idle_advance_emits_the_last_spans_without_new_traffic() -> None:
    joiner = PartitionJoiner(SETTINGS, now_ns=0)
    arrival = 5 * S
    span = Span("main.f", T0, T0 + 10 * MS, tid=1, goid=5)
    joiner.add_net(net_batch("n", 1, [Net(T0 + 5 * MS, 42, True, 1, 5)]), now_ns=arrival)
    joiner.add_spans(span_batch("n", 1, [span]), "last", now_ns=arrival)
    # The newest event time is the span's end: the watermark waits for the lateness.
    assert joiner.advance(arrival + IDLE - 1) == []
    assert joiner.waiting_spans == 1
    # Quiet for the idle advance: event time moves with the wall clock since the arrival,
    # so the span leaves once the quiet time exceeds the lateness.
    assert joiner.advance(arrival + LATENESS) == []
    released = joiner.advance(arrival + LATENESS + 30 * MS)
    assert totals(released) == {("last", 0): (42, 0, 1, 0)}
    assert joiner.waiting_spans == 0


def test_watermark_follows_the_slower_input_until_it_goes_quiet() -> None:
    clock = EventClock(allowed_lateness_ns=100, idle_advance_ns=1000, now_ns=0)
    assert clock.watermark(0) is None  # nothing seen yet
    clock.observe(SPANS, 50_000, now_ns=10)
    assert clock.watermark(10) is None  # the net input may still deliver
    clock.observe(NET, 20_000, now_ns=20)
    assert clock.watermark(30) == 20_000 - 100  # the net input is behind
    clock.observe(SPANS, 60_000, now_ns=900)
    assert clock.watermark(1019) == 20_000 - 100  # net quiet for 999 ns: still holds
    # Net quiet for the idle advance: its event time moves on with the wall clock.
    assert clock.watermark(1020) == 20_000 + 1000 - 100
    clock.observe(SPANS, 60_000, now_ns=40_000)
    # Net has been quiet for 40 us and stands at 60_480: the span input is the slower one.
    assert clock.watermark(40_500) == 60_000 - 100
    clock.observe(NET, 10, now_ns=40_501)  # an old event does not move it back
    assert clock.watermark(40_501) == 60_000 - 100


def test_a_quiet_input_that_is_not_caught_up_is_not_idle() -> None:
    clock = EventClock(allowed_lateness_ns=100, idle_advance_ns=1000, now_ns=0)
    clock.observe(SPANS, 50_000, now_ns=0)
    # Net never delivered, but its first fetch has not answered yet: it holds the watermark.
    assert clock.watermark(5000, caught_up=(True, False)) is None
    clock.observe(NET, 20_000, now_ns=5000)
    # Quiet for 4 us but behind on a backlog: its event time is not extended.
    assert clock.watermark(9000, caught_up=(True, False)) == 20_000 - 100
    assert clock.watermark(9000, caught_up=(True, True)) == 20_000 + 4000 - 100


def test_an_input_that_never_delivers_stops_holding_the_watermark_after_the_idle_advance():
    clock = EventClock(allowed_lateness_ns=0, idle_advance_ns=1000, now_ns=0)
    clock.observe(SPANS, 5000, now_ns=10)
    assert clock.watermark(999) is None
    assert clock.watermark(1000) == 5000


def test_network_events_are_kept_for_max_span_and_longer_spans_are_counted_as_truncated():
    settings = JoinSettings(LATENESS, IDLE, max_span_ns=1 * S, emit_step_ns=10 * MS)
    joiner = PartitionJoiner(settings, now_ns=0)
    joiner.add_net(net_batch("n", 1, [Net(T0 + 10 * MS, 5, True, 1, 3)]), now_ns=0)
    joiner.add_net(net_batch("n", 1, [Net(T0 + 4 * S, 7, True, 1, 3)]), now_ns=0)
    joiner.add_spans(span_batch("n", 1, [Span("main.tick", T0 + 4 * S, T0 + 4 * S, 1, 9)]), 0, 0)
    joiner.advance(0)  # watermark T0 + 3.5 s: the first event is older than max_span_ns
    assert joiner.retained_events == 1
    assert joiner.kept_from_ns == T0 + 3500 * MS  # everything before the watermark is gone
    long_span = Span("main.loop", T0, T0 + 4 * S + 100, tid=1, goid=3)
    joiner.add_spans(span_batch("n", 1, [long_span]), "long", now_ns=0)
    assert totals(drain(joiner, 0))[("long", 0)] == (7, 0, 1, 0)
    assert joiner.counters.spans_truncated == 1


def test_many_small_steps_merge_pieces_without_changing_sums() -> None:
    rng = np.random.default_rng(11)
    spans, events = http_traffic(rng, T0, requests=2000, goroutines=30, gap_ns=50 * MS)
    joiner = PartitionJoiner(SETTINGS, now_ns=0)
    order = sorted(range(len(events)), key=lambda i: events[i].ts_ns)
    steps = 0
    for k in range(0, len(order), 97):
        chunk = [events[i] for i in order[k : k + 97]]
        newest = max(e.ts_ns for e in chunk)
        joiner.add_net(net_batch("n", 1, chunk), now_ns=0)
        # A span on an idle goroutine moves the span input's event time along.
        tick = Span("main.tick", newest, newest, tid=1, goid=999_999)
        joiner.add_spans(span_batch("n", 1, [tick]), ("tick", k), now_ns=0)
        joiner.advance(0)
        steps += 1
    pieces = joiner._store.piece_count  # white box: the small pieces were merged
    assert 1 <= pieces <= 12 < steps
    # Every real span arrives late now; it still gets the events kept (max_span_ns is 30 s).
    joiner.add_spans(span_batch("n", 1, spans), "all", now_ns=0)
    got = totals(drain(joiner, 0))
    expected = brute_force({("n", 1): spans}, {("n", 1): events})
    real = {row: v for (token, row), v in got.items() if token == "all"}
    assert real == {i: v for (_, _, i), v in expected.items()}


# -- input checks (the decoder, schemas/event_batch.py, rejects what cannot be joined) -----


@pytest.mark.parametrize(
    "span, message",
    [
        (Span("f", T0 + 10, T0 + 5, tid=1), "ends before it starts"),
        (Span("f", -5, T0, tid=1), "outside the Unix epoch"),
        (Span("f", T0, T0 + 1, tid=1, goid=1 << 50), "goroutine id above"),
    ],
)
def test_span_batches_that_cannot_be_joined_are_rejected(span: Span, message: str) -> None:
    with pytest.raises(BatchDecodeError, match=message):
        decode_span_batch(encode_span_batch(span_batch("n", 1, [span])))


def test_net_batches_with_error_results_are_rejected() -> None:
    with pytest.raises(BatchDecodeError, match="negative byte count"):
        decode_net_batch(encode_net_batch(net_batch("n", 1, [Net(T0, -11, True, tid=1)])))
    decode_net_batch(encode_net_batch(net_batch("n", 1, [Net(T0, 0, True, tid=1)])))


def test_event_time_never_runs_ahead_of_the_wall_clock() -> None:
    """A far-future batch (a forged one, or a node clock far ahead) must not push the
    watermark past the wall clock: real events after it would all be late."""
    settings = JoinSettings(LATENESS, IDLE, emit_step_ns=10 * MS, event_time_at_most_now=True)
    joiner = PartitionJoiner(settings, T0)
    future = T0 + 3600 * S
    joiner.add_spans(span_batch("n", 1, [Span("f", future, future + 1, tid=1)]), "x", T0)
    joiner.add_net(net_batch("n", 1, [Net(future, 10, True, tid=1)]), T0)
    joiner.advance(T0)
    assert joiner.watermark_ns is not None and joiner.watermark_ns <= T0 - LATENESS
    joiner.add_spans(span_batch("n", 2, [Span("f", T0 + 1, T0 + 9, tid=1)]), "real", T0 + 10)
    joiner.add_net(net_batch("n", 2, [Net(T0 + 5, 33, True, tid=1)]), T0 + 10)
    assert joiner.counters.net_late == 0
    got = totals(drain(joiner, T0 + 10))
    assert [v for (token, _), v in got.items() if token == "real"] == [(33, 0, 1, 0)]
