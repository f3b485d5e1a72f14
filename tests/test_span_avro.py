"""The vectorised Avro writer of `apm.spans` against fastavro, byte for byte, and span ids."""

from __future__ import annotations

import numpy as np
from join_data import HTTP_FUNC, Span, span_batch

from ebpf_apm.consumers.net_event_store import IoSums
from ebpf_apm.consumers.span_avro import EncodedSpans, encode_spans
from ebpf_apm.consumers.span_joiner import JoinedSpans
from ebpf_apm.schemas.avro_codec import codec
from ebpf_apm.schemas.event_batch import SpanBatch, iter_events

T0 = 1_750_000_000_000_000_000
SPAN = codec("span.avsc")


def joined(batch: SpanBatch, rows: list[int], io: list[tuple[int, ...]]) -> JoinedSpans:
    columns = np.array(io, dtype=np.int64).reshape(len(io), 4).T
    return JoinedSpans(batch, np.array(rows, dtype=np.int64), IoSums(*columns), None)


def check_against_fastavro(parts: list[JoinedSpans], encoded: EncodedSpans) -> None:
    for part, where in zip(parts, encoded.parts, strict=True):
        events = list(iter_events(part.batch))
        for k, value in enumerate(encoded.values[where]):
            record = SPAN.decode(value)
            event = events[int(part.rows[k])]
            if part.batch.ids is None:
                assert len(record["span_id"]) == 32  # the join's hash
            else:
                assert record["span_id"] == event["span_id"]  # the kernel's, 16 digits
            assert value == SPAN.encode(expected_record(event, part, k, record["span_id"]))


def expected_record(
    event: dict[str, object], part: JoinedSpans, k: int, span_id: str
) -> dict[str, object]:
    event = dict(event)
    del event["end_tid"]
    for name in ("http_method", "http_path", "http_status"):
        event.setdefault(name, None)
    event.update(
        span_id=span_id,
        bytes_sent=int(part.io.bytes_sent[k]),
        bytes_received=int(part.io.bytes_received[k]),
        net_sends=int(part.io.sends[k]),
        net_recvs=int(part.io.recvs[k]),
    )
    return event


def test_every_field_is_written_exactly_as_fastavro_writes_it() -> None:
    go = span_batch(
        "node-ü",
        4242,
        [
            Span(HTTP_FUNC, T0, T0 + 5, tid=7, goid=3, http=("GET", "/api/ünï/1", 200)),
            Span("main.(*svc).handle", T0 + 1, T0 + 4, tid=8, goid=3),
            Span(HTTP_FUNC, T0 + 9, T0 + 9, tid=9, goid=(1 << 47) - 1, http=("POST", "", 0)),
            Span("runtime.cgo", 0, (1 << 62) - 1, tid=4_194_304),  # no goroutine: null
        ],
        k8s={"k8s_namespace": "shop", "k8s_pod": "cart-7d9", "k8s_container": None},
    )
    c = span_batch("edge", 1, [Span("c_work", T0, T0 + 1_000_000_000, tid=1)])
    parts = [
        joined(go, [0, 1, 2, 3], [(1 << 62, 0, 1, 0), (0, 5, 0, 1), (127, 128, 63, 64), (0,) * 4]),
        joined(c, [0], [(300, 16_384, 2_147_483_647, 2)]),
        joined(go, [], []),
    ]
    encoded = encode_spans(parts)
    assert [s.stop - s.start for s in encoded.parts] == [4, 1, 0]
    check_against_fastavro(parts, encoded)


def test_span_ids_are_deterministic_and_tell_spans_apart() -> None:
    spans = [
        Span("main.f", T0, T0 + 10, tid=5, goid=12),
        Span("main.f", T0, T0 + 99, tid=6, goid=12),  # same goroutine, func, start: same id
        Span("main.f", T0 + 1, T0 + 10, tid=5, goid=12),  # other start
        Span("main.g", T0, T0 + 10, tid=5, goid=12),  # other function
        Span("main.f", T0, T0 + 10, tid=12),  # thread 12, not goroutine 12
        Span("main.f", T0, T0 + 10, tid=5, goid=13),  # other goroutine
    ]
    batch = span_batch("n", 1, spans)
    encoded = encode_spans([joined(batch, [0, 1, 2, 3, 4, 5], [(0,) * 4] * 6)])
    ids = [SPAN.decode(v)["span_id"] for v in encoded.values]
    assert ids[0] == ids[1]
    assert len(set(ids)) == 5
    other_pid = span_batch("n", 2, spans[:1])
    replay = encode_spans([joined(batch, [0], [(1, 2, 3, 4)]), joined(other_pid, [0], [(0,) * 4])])
    assert SPAN.decode(replay.values[0])["span_id"] == ids[0]  # same span, later: same id
    assert SPAN.decode(replay.values[1])["span_id"] != ids[0]  # another process
    assert all(set(i) <= set("0123456789abcdef") for i in ids)


def test_a_step_of_many_small_parts_and_one_large_part_is_encoded_in_order() -> None:
    rng = np.random.default_rng(3)
    big = [Span("main.big", T0 + i, T0 + 2 * i, tid=1, goid=i) for i in range(5000)]
    parts = [joined(span_batch("n", 9, big), list(range(4999, -1, -1)), [(1, 2, 3, 4)] * 5000)]
    for pid in range(40):
        starts = rng.integers(T0, T0 + 10**9, 3)
        spans = [Span("main.h", int(s), int(s) + 1000, tid=pid, goid=pid) for s in starts]
        io = [tuple(int(x) for x in rng.integers(0, 10**6, 4)) for _ in spans]
        parts.append(joined(span_batch(f"node-{pid % 3}", pid, spans), [0, 1, 2], io))
    encoded = encode_spans(parts)
    assert len(encoded.values) == 5120
    check_against_fastavro(parts, encoded)
