"""Client span records -> span batches -> apm.spans records, without a kernel.

The agent publishes each kind of client call (HTTP, gRPC, SQL) in messages of its own; the
SQL text is sanitized before the batch is encoded; the join writes the client fields
(http_host, db_*, error) byte for byte as fastavro does.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from join_data import Net, net_batch
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from test_span_avro import check_against_fastavro, joined
from test_span_batcher import http_records, make_batcher, spans

from ebpf_apm.consumers.otlp_spans import to_span
from ebpf_apm.consumers.route_template import SeriesRegistry
from ebpf_apm.consumers.series_resolver import SeriesResolver, series_key_of
from ebpf_apm.consumers.span_avro import SPAN_CODEC as SPAN
from ebpf_apm.consumers.span_avro import encode_spans
from ebpf_apm.consumers.span_columns import decode_spans
from ebpf_apm.consumers.span_joiner import JoinSettings, PartitionJoiner
from ebpf_apm.producer.event_layout import (
    CLIENT_GRPC,
    CLIENT_HTTP,
    CLIENT_SPAN_EVENT,
    CLIENT_SQL,
    DB_SYSTEMS,
    EVENT_KIND_CLIENT_SPAN,
)
from ebpf_apm.schemas.event_batch import (
    MAX_CONTAINERS,
    BatchDecodeError,
    decode_net_batch,
    decode_span_batch,
    encode_net_batch,
    iter_events,
)


def client_records(pid: int, calls: list[dict]) -> np.ndarray:
    records = np.zeros(len(calls), dtype=CLIENT_SPAN_EVENT)
    records["kind"] = EVENT_KIND_CLIENT_SPAN
    records["size"] = CLIENT_SPAN_EVENT.itemsize
    records["pid"] = pid
    records["start_ns"] = np.arange(len(calls)) * 1000 + 100
    records["ts_ns"] = records["start_ns"] + 500
    records["goid"] = 9
    records["func_id"] = 1
    records["trace_id"][:, 0] = 7  # the kernel draws ids for every span, client ones too
    records["span_id"] = np.arange(1, len(calls) + 1)
    for i, call in enumerate(calls):
        text = call.get("text", b"")
        records[i]["client"] = call["client"]
        records[i]["status"] = call.get("status", -1)
        records[i]["error"] = call.get("error", 0)
        records[i]["text"] = text
        records[i]["text_len"] = call.get("text_len", len(text))
        records[i]["host"] = call.get("host", b"")
        records[i]["host_len"] = len(call.get("host", b""))
        records[i]["method"] = call.get("method", b"")
        records[i]["method_len"] = len(call.get("method", b""))
        records[i]["db_system"] = DB_SYSTEMS.index(call.get("system", ""))
    return records


CALLS = [
    {"client": CLIENT_HTTP, "method": b"GET", "host": b"api:8080", "text": b"/v1/items/7",
     "status": 404},
    {"client": CLIENT_SQL, "system": "postgresql",
     "text": b"SELECT * FROM t WHERE name = 'SECRET' AND id = 4242"},
    {"client": CLIENT_GRPC, "text": b"/pkg.Svc/Get", "status": 5, "error": 1},
    {"client": CLIENT_HTTP, "method": b"POST", "host": b"127.0.0.1:1", "text": b"/refused",
     "error": 1},
    {"client": CLIENT_GRPC, "text": b"/pkg.Svc/Get", "status": 0},
    # cut by the kernel inside a literal: text_len says the statement was longer
    {"client": CLIENT_SQL, "system": "", "text": b"INSERT INTO t VALUES ('SECR", "text_len": 9000},
]  # fmt: skip


def test_each_kind_of_client_call_is_published_in_messages_of_its_own() -> None:
    batcher = make_batcher()
    batcher.add([spans([]), http_records(11, [], []), client_records(11, CALLS)], 0)
    messages = batcher.flush_all()
    assert [m.events for m in messages] == [2, 2, 2]  # HTTP, gRPC, SQL
    for message in messages:
        containers = _containers(msgpack.unpackb(message.value))
        assert containers <= MAX_CONTAINERS
    http, grpc, sql = ([e for e in iter_events(decode_span_batch(m.value))] for m in messages)
    assert {e["span_kind"] for e in http + grpc + sql} == {"client"}
    assert [(e["http_method"], e["http_host"], e["http_path"], e["http_status"], e["error"])
            for e in http] == [("GET", "api:8080", "/v1/items/7", 404, False),
                               ("POST", "127.0.0.1:1", "/refused", 0, True)]  # fmt: skip
    assert [(e["rpc_method"], e["rpc_status"], e["error"]) for e in grpc] == [
        ("/pkg.Svc/Get", 5, True),
        ("/pkg.Svc/Get", 0, False),
    ]
    assert [(e["db_system"], e["db_operation"], e["db_statement"]) for e in sql] == [
        ("postgresql", "SELECT", "SELECT * FROM t WHERE name = ? AND id = ?"),
        (None, "INSERT", "INSERT INTO t VALUES (?"),
    ]
    assert all("http_host" not in e for e in grpc + sql)
    for message in messages:
        assert b"SECR" not in message.value and b"4242" not in message.value


def test_client_fields_are_written_exactly_as_fastavro_writes_them() -> None:
    batcher = make_batcher()
    batcher.add([spans([]), http_records(11, [], []), client_records(11, CALLS)], 0)
    batches = [decode_span_batch(m.value) for m in batcher.flush_all()]
    parts = [joined(b, list(range(len(b))), [(1, 2, 3, 4)] * len(b)) for b in batches]
    check_against_fastavro(parts, encode_spans(parts))


def _containers(value: object) -> int:
    if isinstance(value, dict):
        return 1 + sum(_containers(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(_containers(v) for v in value)
    return 0


def test_client_spans_map_to_otlp_client_spans() -> None:
    batcher = make_batcher()
    batcher.add([spans([]), http_records(11, [], []), client_records(11, CALLS)], 0)
    batches = [decode_span_batch(m.value) for m in batcher.flush_all()]
    parts = [joined(b, list(range(len(b))), [(1, 2, 3, 4)] * len(b)) for b in batches]
    records = [SPAN.decode(v) for v in encode_spans(parts).values]
    out = [to_span(r) for r in records]
    assert {s.kind for s in out} == {Span.SPAN_KIND_CLIENT}
    attrs = [{a.key: _value(a.value) for a in s.attributes} for s in out]
    ok_http, refused, rpc_error, rpc_ok, select, insert = range(6)
    assert attrs[ok_http]["server.address"] == "api" and attrs[ok_http]["server.port"] == 8080
    assert attrs[ok_http]["http.response.status_code"] == 404
    assert out[ok_http].status.code == Status.STATUS_CODE_ERROR  # a client's 4xx is an error
    assert out[refused].status.code == Status.STATUS_CODE_ERROR
    assert attrs[refused]["error.type"] == "transport"
    assert attrs[rpc_error]["rpc.grpc.status_code"] == 5
    assert out[rpc_error].status.code == Status.STATUS_CODE_ERROR
    assert out[rpc_ok].status.code == Status.STATUS_CODE_UNSET
    assert attrs[select]["db.system.name"] == "postgresql"
    assert attrs[select]["db.query.text"] == "SELECT * FROM t WHERE name = ? AND id = ?"
    assert out[select].name == "SELECT" and out[insert].name == "INSERT"
    assert "db.system.name" not in attrs[insert]


def _value(value: AnyValue) -> object:
    return getattr(value, value.WhichOneof("value") or "string_value")


def test_client_calls_are_series_of_their_own() -> None:
    batcher = make_batcher()
    calls = [
        *CALLS,
        {"client": CLIENT_HTTP, "method": b"GET", "host": b"api:8080", "text": b"/v1/items/9",
         "status": 404},
        {"client": CLIENT_SQL, "system": "postgresql",
         "text": b"SELECT * FROM t WHERE name = 'x' AND id = 1"},
        {"client": CLIENT_SQL, "system": "postgresql",
         "text": b"SELECT a FROM t WHERE id IN (1, 2)"},
        {"client": CLIENT_SQL, "system": "postgresql", "text": b"SELECT a FROM t WHERE id IN (3)",
         "error": 1},
    ]  # fmt: skip
    server = http_records(11, [b"/v1/items/7"], [404])
    server["method"], server["method_len"] = b"GET", 3
    batcher.add([spans([]), server, client_records(11, calls)], 0)
    batches = [decode_span_batch(m.value) for m in batcher.flush_all()]
    parts = [joined(b, list(range(len(b))), [(0, 0, 0, 0)] * len(b)) for b in batches]
    columns = decode_spans(encode_spans(parts).values)
    registry = SeriesRegistry(100)
    rows = np.arange(len(columns.bad))
    ids = SeriesResolver(registry).resolve(columns, rows)
    keys = [registry.keys[i] for i in ids.tolist()]
    for row, key in enumerate(keys):
        assert series_key_of(columns, row) == key
    named = [(k.operation, k.status_class) for k in keys]
    assert named == [
        ("GET /v1/items/{id}", "4xx"),  # the server span
        ("client GET api:8080 /v1/items/{id}", "4xx"),
        ("client POST 127.0.0.1:1 /refused", "error"),  # transport error
        ("client GET api:8080 /v1/items/{id}", "4xx"),
        ("client /pkg.Svc/Get", "NOT_FOUND"),
        ("client /pkg.Svc/Get", "OK"),
        ("client SELECT * FROM t WHERE name = ? AND id = ?", "OK"),
        ("client INSERT INTO t VALUES (?", "OK"),
        ("client SELECT * FROM t WHERE name = ? AND id = ?", "OK"),
        ("client SELECT a FROM t WHERE id IN (?)", "OK"),
        ("client SELECT a FROM t WHERE id IN (?)", "error"),
    ]
    assert len(set(ids.tolist())) == 9


def test_a_client_span_gets_the_peer_of_its_last_network_event() -> None:
    """lib/pq-like: the statement's I/O is on the calling goroutine; its last event's socket
    is the database. A server span on another goroutine gets no peer field."""
    batcher = make_batcher()
    sql = client_records(11, [CALLS[1], CALLS[5]])  # two statements on goroutine 9
    sql["start_ns"], sql["ts_ns"] = [1_000, 5_000], [2_000, 6_000]
    batcher.add([spans([]), http_records(11, [], []), sql], 0)
    [message] = batcher.flush_all()
    batch = decode_span_batch(message.value)
    start = batch.columns["start_ns"]
    events = [
        Net(int(start[0]) + 100, 50, send=True, tid=1, goid=9),
        Net(int(start[0]) + 900, 80, send=False, tid=1, goid=9),
        Net(int(start[1]) + 10, 20, send=True, tid=1, goid=9),
    ]
    net = net_batch("node-a", 11, events)
    net.columns["daddr"] = np.array([b"\x0a\x00\x00\x05", b"\x0a\x00\x00\x07", b"\x7f\x00\x00\x01"],
                                    dtype="S16")  # fmt: skip
    net.columns["dport"] = np.array([5432, 5433, 5434], dtype=np.uint16)
    joiner = PartitionJoiner(JoinSettings(), now_ns=0)
    joiner.add_net(decode_net_batch(encode_net_batch(net)), 0)
    joiner.add_spans(batch, "t", 0)
    joined = joiner.advance(int(start.max()) + 100 * 10**9)
    records = [SPAN.decode(v) for v in encode_spans(joined).values]
    assert [(r["peer_addr"], r["peer_port"]) for r in records] == [
        ("10.0.0.7", 5433),
        ("127.0.0.1", 5434),
    ]
    assert [r["bytes_sent"] for r in records] == [50, 20]


def test_decoder_rejects_bad_client_parts_with_the_reason() -> None:
    batcher = make_batcher()
    batcher.add([spans([]), http_records(11, [], []), client_records(11, CALLS)], 0)
    http, _, sql = (msgpack.unpackb(m.value) for m in batcher.flush_all())
    cases = [
        (http, "client", {"error": bytes([0, 2])}, "client.error: values are 0"),
        (http, "client", {"host": ["a"]}, "client.host: expected a list of 2 strings"),
        (http, "client", {"row": np.array([1, 0], "<u4").tobytes()}, "client.row: rows must"),
        (sql, "db", {"statement": ["x"]}, "db.statement: expected a list of 2 strings"),
        (sql, "db", {"system": "postgresql"}, "db.system: expected a list of 2 strings"),
        (sql, "db", {"row": np.array([0, 5], "<u4").tobytes()}, "db.row: rows must"),
    ]
    for good, part, change, reason in cases:
        message = dict(good, **{part: {**good[part], **change}})
        with pytest.raises(BatchDecodeError, match=reason.replace(".", r"\.")):
            decode_span_batch(msgpack.packb(message, use_bin_type=True))
    both = {**{k: v for k, v in http.items() if k != "client"}, "db": sql["db"]}
    with pytest.raises(BatchDecodeError, match="cannot be an HTTP request or gRPC call too"):
        decode_span_batch(msgpack.packb(both, use_bin_type=True))
    no_kinds = {k: v for k, v in sql.items() if k != "span_kind"}
    with pytest.raises(BatchDecodeError, match="need the span_kind column"):
        decode_span_batch(msgpack.packb(no_kinds, use_bin_type=True))
