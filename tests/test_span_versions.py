"""apm.spans records of schema versions 3 (trace_id, parent_span_id, the kernel's span_id),
2 (span_kind, rpc_method, rpc_status) and 1.

The writer is checked byte for byte against fastavro for gRPC server spans; records an older
join wrote (version 1, another fingerprint) still read, through fastavro and through the
aggregator's columnar reader, with the new fields null.
"""

from __future__ import annotations

import io

import fastavro
import msgpack
import numpy as np
import pytest
from join_data import Span, span_batch
from test_span_avro import T0, check_against_fastavro, joined

from ebpf_apm.consumers.route_template import SeriesRegistry
from ebpf_apm.consumers.series_resolver import SeriesResolver, series_key_of
from ebpf_apm.consumers.span_avro import encode_spans
from ebpf_apm.consumers.span_columns import decode_spans
from ebpf_apm.schemas.avro_codec import MAGIC, codec
from ebpf_apm.schemas.event_batch import (
    RPC_STATUS_UNKNOWN,
    BatchDecodeError,
    RpcColumns,
    SpanIds,
    decode_span_batch,
    encode_span_batch,
    iter_events,
)

SPAN = codec("span.avsc")
HANDLE_STREAM = "google.golang.org/grpc.(*Server).handleStream"


def grpc_batch():  # type: ignore[no-untyped-def]
    batch = span_batch(
        "node",
        77,
        [
            Span(HANDLE_STREAM, T0, T0 + 50, tid=3, goid=11),
            Span("main.work", T0 + 1, T0 + 4, tid=3, goid=11),
            Span(HANDLE_STREAM, T0 + 9, T0 + 90, tid=4, goid=12),
        ],
    )
    batch.rpc = RpcColumns(
        rows=np.array([0, 2], dtype=np.uint32),
        method=["/apm.test.Echo/Unary", "/apm.test.Echo/Stream"],
        status=np.array([0, RPC_STATUS_UNKNOWN], dtype=np.uint8),
    )
    return decode_span_batch(encode_span_batch(batch))  # through the topic's format


def test_grpc_spans_are_written_as_fastavro_writes_them() -> None:
    batch = grpc_batch()
    events = list(iter_events(batch))
    assert [e["span_kind"] for e in events] == ["server", "internal", "server"]
    assert events[0]["rpc_method"] == "/apm.test.Echo/Unary" and events[0]["rpc_status"] == 0
    assert "rpc_method" not in events[1]
    assert events[2]["rpc_status"] is None  # a call whose code was not seen
    part = joined(batch, [0, 1, 2], [(1, 2, 3, 4)] * 3)
    encoded = encode_spans([part])
    check_against_fastavro([part], encoded)
    records = [SPAN.decode(v) for v in encoded.values]
    assert [r["rpc_status"] for r in records] == [0, None, None]
    assert [r["span_kind"] for r in records] == ["server", "internal", "server"]


def test_version_1_records_read_with_the_new_fields_null() -> None:
    [(fingerprint, (version, v1))] = [(f, v) for f, v in SPAN.older.items() if v[0] == 1]
    record = SPAN.decode(encode_spans([joined(grpc_batch(), [0], [(5, 6, 7, 8)])]).values[0])
    old = {f["name"]: record[f["name"]] for f in v1["fields"]}
    out = io.BytesIO()
    out.write(MAGIC + fingerprint)
    fastavro.schemaless_writer(out, v1, old)
    value = out.getvalue()
    assert SPAN.decode(value) == {**old, **{name: None for name in record if name not in old}}
    new = SPAN.encode(record)
    columns = decode_spans([value, new, value])
    assert not columns.bad.any()
    assert columns.ints["duration_ns"].tolist() == [50, 50, 50]
    assert [columns.text("func", i) for i in range(3)] == [HANDLE_STREAM] * 3
    assert columns.ints["rpc_status"].tolist() == [-1, 0, -1]
    assert [columns.text("rpc_method", i) for i in range(3)] == [
        None,
        "/apm.test.Echo/Unary",
        None,
    ]


def test_grpc_calls_are_series_of_their_own_by_method_and_code() -> None:
    base = SPAN.decode(encode_spans([joined(grpc_batch(), [1], [(0, 0, 0, 0)])]).values[0])
    records = [
        dict(base, func=HANDLE_STREAM, span_kind="server", rpc_method=m, rpc_status=c)
        for m, c in [("/a.S/Get", 0), ("/a.S/Get", 0), ("/a.S/Get", 5), ("/a.S/Put", None),
                     ("/a.S/Put", 14)]
    ] + [base, dict(base, http_method="GET", http_path="/x/1", http_status=200)]  # fmt: skip
    columns = decode_spans([SPAN.encode(r) for r in records])
    registry = SeriesRegistry(100)
    ids = SeriesResolver(registry).resolve(columns, np.arange(len(records)))
    keys = [registry.keys[i] for i in ids.tolist()]
    assert [(k.operation, k.status_class) for k in keys] == [
        ("/a.S/Get", "OK"),
        ("/a.S/Get", "OK"),
        ("/a.S/Get", "NOT_FOUND"),
        ("/a.S/Put", "unknown"),
        ("/a.S/Put", "UNAVAILABLE"),
        ("main.work", None),
        ("GET /x/{id}", "2xx"),
    ]
    assert ids[0] == ids[1] and len(set(ids.tolist())) == 6
    for row, key in enumerate(keys):
        assert series_key_of(columns, row) == key


def test_decoder_rejects_bad_rpc_parts_with_the_reason() -> None:
    good = msgpack.unpackb(encode_span_batch(grpc_batch()), raw=False)
    cases = {
        "rpc.status: a code outside 0..16": {"status": bytes([0, 17])},
        "rpc.row: rows must be increasing": {"row": np.array([2, 0], "<u4").tobytes()},
        "rpc.method: expected a list of 2 strings": {"method": ["/a"]},
    }
    for reason, change in cases.items():
        message = dict(good, rpc={**good["rpc"], **change})
        with pytest.raises(BatchDecodeError, match=reason.replace(".", r"\.")):
            decode_span_batch(msgpack.packb(message, use_bin_type=True))
    both = dict(good, http={"row": np.array([0], "<u4").tobytes(), "method": ["GET"],
                            "path": ["/"], "status": np.array([200], "<u2").tobytes()})  # fmt: skip
    with pytest.raises(BatchDecodeError, match="both an HTTP request and a gRPC call"):
        decode_span_batch(msgpack.packb(both, use_bin_type=True))
    kinds = dict(good, span_kind=bytes([0, 1, 3]))
    with pytest.raises(BatchDecodeError, match="span_kind: values are 0..2"):
        decode_span_batch(msgpack.packb(kinds, use_bin_type=True))


def ids_batch():  # type: ignore[no-untyped-def]
    """A batch whose spans carry the kernel's ids: a server span (root) and a child."""
    batch = grpc_batch()
    trace = np.frombuffer(bytes(range(1, 17)), dtype=np.uint8)
    batch.ids = SpanIds(
        trace_id=np.stack([trace, trace, trace[::-1]]),
        span_id=np.array([0xA1, 0xFEDC_BA98_7654_3210, 0x1], dtype=np.uint64),
        parent_span_id=np.array([0, 0xA1, 0], dtype=np.uint64),
    )
    return decode_span_batch(encode_span_batch(batch))


def test_kernel_ids_are_written_as_fastavro_writes_them() -> None:
    batch = ids_batch()
    events = list(iter_events(batch))
    assert [e["span_id"] for e in events] == ["00000000000000a1", "fedcba9876543210",
                                              "0000000000000001"]  # fmt: skip
    assert [e["parent_span_id"] for e in events] == [None, "00000000000000a1", None]
    assert events[0]["trace_id"] == bytes(range(1, 17)).hex() == events[1]["trace_id"]
    without = grpc_batch()  # the same spans from an agent without ids
    parts = [joined(batch, [0, 1, 2], [(1, 2, 3, 4)] * 3), joined(without, [1, 2], [(0,) * 4] * 2)]
    encoded = encode_spans(parts)
    check_against_fastavro(parts, encoded)
    records = [SPAN.decode(v) for v in encoded.values]
    assert [len(r["span_id"]) for r in records] == [16, 16, 16, 32, 32]
    assert [r["trace_id"] is None for r in records] == [False] * 3 + [True] * 2
    assert records[1]["parent_span_id"] == records[0]["span_id"]
    # The aggregator's columnar reader steps over the new fields.
    columns = decode_spans(encoded.values)
    assert not columns.bad.any()
    assert columns.ints["rpc_status"].tolist() == [0, -1, -1, -1, -1]


def test_version_2_records_read_with_trace_fields_null() -> None:
    ((fingerprint, (_, v2)),) = [(f, old) for f, old in SPAN.older.items() if old[0] == 2]
    record = SPAN.decode(encode_spans([joined(ids_batch(), [1], [(5, 6, 7, 8)])]).values[0])
    old = {f["name"]: record[f["name"]] for f in v2["fields"]}
    out = io.BytesIO()
    out.write(MAGIC + fingerprint)
    fastavro.schemaless_writer(out, v2, old)
    assert SPAN.decode(out.getvalue()) == {**old, **{n: None for n in record if n not in old}}
    columns = decode_spans([out.getvalue(), SPAN.encode(record)])
    assert not columns.bad.any() and columns.ints["duration_ns"].tolist() == [3, 3]


def test_decoder_rejects_bad_ids_with_the_reason() -> None:
    good = msgpack.unpackb(encode_span_batch(ids_batch()), raw=False)
    cases = {
        "ids.span: 0 is not a span id": {"span": np.array([1, 0, 2], "<u8").tobytes()},
        "ids.trace: an all-zero trace id": {"trace": bytes(16) * 3},
        "ids.parent": {"parent": bytes(8)},
    }
    for reason, change in cases.items():
        message = dict(good, ids={**good["ids"], **change})
        with pytest.raises(BatchDecodeError, match=reason.replace(".", r"\.")):
            decode_span_batch(msgpack.packb(message, use_bin_type=True))
    with pytest.raises(BatchDecodeError, match="ids: expected a map"):
        decode_span_batch(msgpack.packb(dict(good, ids=[1]), use_bin_type=True))
