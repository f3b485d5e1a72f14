"""apm.spans records -> OTLP spans: the mapping of schemas/otlp_export.md, field by field,
including the fields the protocols issue adds to span.avsc (used when present)."""

from __future__ import annotations

from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from otlp_collector import attributes

from ebpf_apm.consumers.otlp_spans import export_request, span_ids, to_span

WIDE_ID = "8f3a4c2b1d0e9f876a5b4c3d2e1f0a9b"


def record(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "span_id": WIDE_ID, "node": "node-1", "pid": 4242, "exe": "/usr/bin/checkout",
        "tid": 17, "goid": 33, "func": "main.handle", "start_ns": 1_700_000_000_123_456_789,
        "end_ns": 1_700_000_000_223_456_789, "duration_ns": 100_000_000, "http_method": None,
        "http_path": None, "http_status": None, "k8s_namespace": None, "k8s_pod": None,
        "k8s_container": None, "k8s_workload": None, "bytes_sent": 120, "bytes_received": 80,
        "net_sends": 2, "net_recvs": 1,
    }  # fmt: skip
    base.update(fields)
    return base


def test_an_http_handler_span_is_a_server_span_named_by_its_route() -> None:
    span = to_span(
        record(
            func="net/http.serverHandler.ServeHTTP",
            http_method="POST",
            http_path="/api/user/123",
            http_status=503,
        )
    )
    assert span.name == "POST /api/user/{id}"
    assert span.kind == Span.SPAN_KIND_SERVER
    assert span.status.code == Status.STATUS_CODE_ERROR and span.status.message == "HTTP 503"
    assert span.trace_id == bytes.fromhex(WIDE_ID) and span.span_id == bytes.fromhex(WIDE_ID)[:8]
    assert span.parent_span_id == b""
    assert (span.start_time_unix_nano, span.end_time_unix_nano) == (
        1_700_000_000_123_456_789,
        1_700_000_000_223_456_789,
    )
    assert attributes(list(span.attributes)) == {
        "code.function.name": "net/http.serverHandler.ServeHTTP",
        "thread.id": 17,
        "http.request.method": "POST",
        "url.path": "/api/user/123",
        "http.response.status_code": 503,
        "ebpf_apm.goroutine.id": 33,
        "ebpf_apm.bytes_sent": 120,
        "ebpf_apm.bytes_received": 80,
        "ebpf_apm.net_sends": 2,
        "ebpf_apm.net_recvs": 1,
    }


def test_4xx_is_not_a_server_error_and_status_0_is_unknown() -> None:
    span = to_span(record(http_method="GET", http_path="/x", http_status=404))
    assert span.status.code == Status.STATUS_CODE_UNSET
    span = to_span(record(http_method="GET", http_path="/x", http_status=0))
    assert "http.response.status_code" not in attributes(list(span.attributes))


def test_a_named_function_is_an_internal_span() -> None:
    span = to_span(record(goid=None))
    assert span.name == "main.handle" and span.kind == Span.SPAN_KIND_INTERNAL
    assert span.status.code == Status.STATUS_CODE_UNSET
    assert "ebpf_apm.goroutine.id" not in attributes(list(span.attributes))


def test_fields_of_the_protocols_issue_are_used_when_present() -> None:
    trace = "0af7651916cd43dd8448eb211c80319c"
    client = to_span(
        record(
            span_kind="client", trace_id=trace, span_id="b7ad6b7169203331",
            parent_span_id="00f067aa0ba902b7", http_method="GET", http_path="/pay",
            http_status=404, http_host="payments:8080", peer_addr="10.0.0.7", peer_port=8080,
        )
    )  # fmt: skip
    assert client.kind == Span.SPAN_KIND_CLIENT and client.name == "GET"
    assert client.trace_id == bytes.fromhex(trace)
    assert client.span_id == bytes.fromhex("b7ad6b7169203331")
    assert client.parent_span_id == bytes.fromhex("00f067aa0ba902b7")
    assert client.status.code == Status.STATUS_CODE_ERROR  # clients: 4xx is an error
    got = attributes(list(client.attributes))
    assert got["server.address"] == "payments" and got["server.port"] == 8080
    assert got["network.peer.address"] == "10.0.0.7" and got["network.peer.port"] == 8080

    rpc = to_span(record(rpc_method="/shop.Cart/AddItem", rpc_status=14))
    got = attributes(list(rpc.attributes))
    assert rpc.name == "shop.Cart/AddItem" and rpc.kind == Span.SPAN_KIND_SERVER
    assert (got["rpc.system"], got["rpc.service"], got["rpc.method"]) == (
        "grpc",
        "shop.Cart",
        "AddItem",
    )
    assert got["rpc.grpc.status_code"] == 14 and rpc.status.code == Status.STATUS_CODE_ERROR
    ok = to_span(record(rpc_method="/shop.Cart/AddItem", rpc_status=5))  # NOT_FOUND: caller's
    assert ok.status.code == Status.STATUS_CODE_UNSET

    db = to_span(
        record(
            span_kind="client", db_system="postgresql", db_operation="SELECT",
            db_statement="SELECT * FROM users WHERE id = ?", peer_addr="10.0.0.9", peer_port=5432,
        )
    )  # fmt: skip
    got = attributes(list(db.attributes))
    assert db.name == "SELECT" and db.kind == Span.SPAN_KIND_CLIENT
    assert got["db.system.name"] == "postgresql" and got["db.operation.name"] == "SELECT"
    assert got["db.query.text"] == "SELECT * FROM users WHERE id = ?"
    assert got["server.address"] == "10.0.0.9" and got["server.port"] == 5432


def test_ids_are_deterministic_and_never_zero() -> None:
    assert span_ids(record()) == span_ids(record())
    odd = record(span_id="not hex at all", trace_id="0" * 32, parent_span_id="zz")
    trace_id, span_id, parent = span_ids(odd)
    assert len(trace_id) == 16 and any(trace_id) and len(span_id) == 8 and any(span_id)
    assert parent == b""
    assert span_ids(odd) == (trace_id, span_id, parent)
    assert span_ids(record(span_id="0" * 16 + "ab" * 8))[1] != b"\0" * 8


def test_spans_are_grouped_by_resource_with_kubernetes_names() -> None:
    pod = {
        "k8s_namespace": "shop", "k8s_pod": "checkout-7d9f-abcde", "k8s_container": "app",
        "k8s_workload": "deployment/checkout",
    }  # fmt: skip
    spans = [
        record(span_id=f"{i + 1:016x}" * 2, **(pod if i % 2 else {}), pid=4242 + i % 2)
        for i in range(5)
    ]
    request = ExportTraceServiceRequest.FromString(export_request(spans).SerializeToString())
    assert len(request.resource_spans) == 2
    in_pod, bare = sorted(request.resource_spans, key=lambda rs: -len(rs.resource.attributes))
    assert attributes(list(in_pod.resource.attributes)) == {
        "service.name": "checkout",
        "k8s.namespace.name": "shop",
        "k8s.pod.name": "checkout-7d9f-abcde",
        "k8s.container.name": "app",
        "k8s.deployment.name": "checkout",
        "host.name": "node-1",
        "process.pid": 4243,
        "process.executable.path": "/usr/bin/checkout",
        "process.executable.name": "checkout",
    }
    assert attributes(list(bare.resource.attributes))["service.name"] == "checkout"
    assert "k8s.pod.name" not in attributes(list(bare.resource.attributes))
    assert [len(rs.scope_spans[0].spans) for rs in (in_pod, bare)] == [2, 3]
    assert {rs.scope_spans[0].scope.name for rs in request.resource_spans} == {"ebpf-apm"}
    sent = [s.span_id for rs in request.resource_spans for s in rs.scope_spans[0].spans]
    assert sorted(sent) == sorted(bytes.fromhex(s["span_id"])[:8] for s in spans)
