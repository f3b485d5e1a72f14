"""apm.spans records -> one OTLP ExportTraceServiceRequest (opentelemetry-proto classes).

    spans (dicts as span.avsc decodes them) -> grouped by resource (process and Kubernetes
      objects) -> ResourceSpans / ScopeSpans "ebpf-apm" / Span with semantic-convention
      attributes

The mapping is the contract documented in schemas/otlp_export.md; a test checks it field by
field. Fields that the protocols issue adds to span.avsc (`span_kind`, `trace_id`,
`parent_span_id`, `http_host`, `peer_addr`, `peer_port`, `rpc_*`, `db_*`) are used when a
record has them and left out otherwise, so the exporter needs no change when they land.

Ids. OTLP wants a 16-byte trace id and an 8-byte span id, never all zero. `span_id` of
16 hex digits is used as it is; the join's 32-digit id gives its first 8 bytes. Without a
`trace_id` each span is the root of its own trace, whose id is the 16 bytes of a 32-digit
`span_id`. Ids that are neither are hashed (BLAKE2b). Every id comes from the record alone,
so a replayed span gets the same ids and a backend deduplicates it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from ebpf_apm import __version__
from ebpf_apm.consumers.route_template import route_of

SCOPE = InstrumentationScope(name="ebpf-apm", version=__version__)

KINDS = {
    "server": Span.SPAN_KIND_SERVER,
    "client": Span.SPAN_KIND_CLIENT,
    "internal": Span.SPAN_KIND_INTERNAL,
    "producer": Span.SPAN_KIND_PRODUCER,
    "consumer": Span.SPAN_KIND_CONSUMER,
}
# Kubernetes workload kinds (k8s_workload is "kind/name") -> resource attribute.
WORKLOAD_ATTRIBUTES = {
    "deployment": "k8s.deployment.name",
    "statefulset": "k8s.statefulset.name",
    "daemonset": "k8s.daemonset.name",
    "replicaset": "k8s.replicaset.name",
    "job": "k8s.job.name",
    "cronjob": "k8s.cronjob.name",
}
# gRPC codes a server reports as its own error (semantic conventions for RPC spans):
# UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
GRPC_SERVER_ERRORS = frozenset({2, 4, 12, 13, 14, 15})

_BYTE_FIELDS = (
    ("bytes_sent", "ebpf_apm.bytes_sent"),
    ("bytes_received", "ebpf_apm.bytes_received"),
)
_COUNT_FIELDS = (("net_sends", "ebpf_apm.net_sends"), ("net_recvs", "ebpf_apm.net_recvs"))
RESOURCE_FIELDS = (
    "node", "pid", "exe", "k8s_namespace", "k8s_pod", "k8s_container", "k8s_workload",
)  # fmt: skip


def _str(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def _int(key: str, value: int) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(int_value=value))


# Attributes with few distinct values (function names, methods, statuses, peers) are built
# once and reused: building a KeyValue costs more than copying one into a span. Bounded.
_CACHE: dict[tuple[str, object], KeyValue] = {}
CACHE_LIMIT = 65536


def _cached(key: str, value: str | int) -> KeyValue:
    kv = _CACHE.get((key, value))
    if kv is None:
        if len(_CACHE) >= CACHE_LIMIT:
            _CACHE.clear()
        kv = _CACHE[(key, value)] = _str(key, value) if isinstance(value, str) else _int(key, value)
    return kv


def service_name(span: Mapping[str, Any]) -> str:
    """The workload's name ("deployment/checkout" -> "checkout"), else the executable's."""
    workload = span.get("k8s_workload")
    if workload:
        return str(workload).rpartition("/")[2]
    exe = str(span.get("exe") or "")
    return os.path.basename(exe) or exe or "unknown"


def resource_of(span: Mapping[str, Any]) -> Resource:
    attributes = [_str("service.name", service_name(span))]
    for field, key in (
        ("k8s_namespace", "k8s.namespace.name"),
        ("k8s_pod", "k8s.pod.name"),
        ("k8s_container", "k8s.container.name"),
    ):
        if span.get(field):
            attributes.append(_str(key, span[field]))
    workload = span.get("k8s_workload")
    if workload:
        kind, _, name = str(workload).partition("/")
        workload_key = WORKLOAD_ATTRIBUTES.get(kind)
        if workload_key and name:
            attributes.append(_str(workload_key, name))
    attributes.append(_str("host.name", span["node"]))
    attributes.append(_int("process.pid", int(span["pid"])))
    exe = span.get("exe")
    if exe:
        attributes.append(_str("process.executable.path", exe))
        attributes.append(_str("process.executable.name", os.path.basename(exe)))
    return Resource(attributes=attributes)


def _hex_bytes(text: object, size: int) -> bytes | None:
    """The bytes of a hex id of exactly `size` bytes, None if it is not one (or all zero)."""
    if not isinstance(text, str) or len(text) != 2 * size:
        return None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return None
    return raw if any(raw) else None


def _hashed(text: str, size: int, salt: bytes) -> bytes:
    raw = hashlib.blake2b(text.encode(), digest_size=size, person=salt).digest()
    return raw if any(raw) else b"\x01" * size


def span_ids(span: Mapping[str, Any]) -> tuple[bytes, bytes, bytes]:
    """(trace_id 16 bytes, span_id 8 bytes, parent_span_id 8 bytes or empty)."""
    own = str(span.get("span_id") or "")
    wide = _hex_bytes(own, 16)
    span_id = _hex_bytes(own, 8) or (wide[:8] if wide and any(wide[:8]) else None)
    if span_id is None:
        span_id = _hashed(own or repr(sorted(span.items())), 8, b"ebpf-apm-span")
    trace_id = _hex_bytes(span.get("trace_id"), 16)
    if trace_id is None:
        trace_id = wide or _hashed(own or span_id.hex(), 16, b"ebpf-apm-trace")
    parent = _hex_bytes(span.get("parent_span_id"), 8) or b""
    return trace_id, span_id, parent


def _kind(span: Mapping[str, Any]) -> int:
    given = span.get("span_kind")
    if given:
        return KINDS.get(str(given).lower(), Span.SPAN_KIND_INTERNAL)
    if span.get("http_method") or span.get("rpc_method"):
        return Span.SPAN_KIND_SERVER  # the agent's HTTP and gRPC spans are handlers
    return Span.SPAN_KIND_INTERNAL


def _host_and_port(host: str) -> tuple[str, int | None]:
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and not name.endswith(":"):
        return name.strip("[]"), int(port)
    return host, None


def to_span(span: Mapping[str, Any]) -> Span:
    """One apm.spans record as an OTLP span (semantic conventions in schemas/otlp_export.md)."""
    out = Span()
    fill_span(out, span)
    return out


def fill_span(out: Span, span: Mapping[str, Any]) -> None:
    """Write one record into `out`, a span already inside its request: a span built apart
    and then added would be copied once more (protobuf messages are copied on assignment)."""
    trace_id, span_id, parent = span_ids(span)
    kind = _kind(span)
    client = kind == Span.SPAN_KIND_CLIENT
    attributes = [
        _cached("code.function.name", span["func"]),
        _cached("thread.id", int(span["tid"])),
    ]
    name = span["func"]
    status = Status()

    method, rpc_method, db_system = (
        span.get("http_method"), span.get("rpc_method"), span.get("db_system"),
    )  # fmt: skip
    host, peer, peer_port = span.get("http_host"), span.get("peer_addr"), span.get("peer_port")
    if rpc_method:
        full = str(rpc_method).lstrip("/")
        service, _, rpc_name = full.rpartition("/")
        name = full
        attributes.append(_cached("rpc.system", "grpc"))
        if service:
            attributes.append(_cached("rpc.service", service))
        attributes.append(_cached("rpc.method", rpc_name or full))
        code = span.get("rpc_status")
        if code is not None:
            attributes.append(_cached("rpc.grpc.status_code", int(code)))
            if (client and code != 0) or (not client and code in GRPC_SERVER_ERRORS):
                status = Status(code=Status.STATUS_CODE_ERROR, message=f"gRPC status {code}")
    elif db_system or span.get("db_operation"):
        if db_system:  # null when the agent could not tell the driver
            attributes.append(_cached("db.system.name", db_system))
            attributes.append(_cached("db.system", db_system))  # the name before semconv 1.30
        operation, statement = span.get("db_operation"), span.get("db_statement")
        if operation:
            attributes.append(_cached("db.operation.name", operation))
        if statement:
            attributes.append(_str("db.query.text", statement))
        name = operation or db_system or "sql"
    elif method:
        path = span.get("http_path") or ""
        attributes.append(_cached("http.request.method", method))
        if path:
            attributes.append(_str("url.path", path))
        code = int(span.get("http_status") or 0)
        if code:
            attributes.append(_cached("http.response.status_code", code))
            if code >= 500 or (client and code >= 400):
                status = Status(code=Status.STATUS_CODE_ERROR, message=f"HTTP {code}")
        # Server spans are named by the route (low cardinality, as the aggregator's series);
        # client spans by the method alone, as the conventions say without a URL template.
        name = method if client or not path else f"{method} {route_of(path)}"

    if client and span.get("error") and not status.code:
        # the call failed without a status (HTTP: a transport error; SQL: the driver's)
        attributes.append(_cached("error.type", "transport" if method else "error"))
        status = Status(code=Status.STATUS_CODE_ERROR, message="the call returned an error")
    if host:
        address, port = _host_and_port(str(host))
        attributes.append(_cached("server.address", address))
        if port is not None:
            attributes.append(_cached("server.port", port))
    elif client and peer:
        attributes.append(_cached("server.address", peer))
        if peer_port:
            attributes.append(_cached("server.port", int(peer_port)))
    if peer:
        attributes.append(_cached("network.peer.address", peer))
        if peer_port:
            attributes.append(_cached("network.peer.port", int(peer_port)))

    goid = span.get("goid")
    if goid is not None:
        attributes.append(_int("ebpf_apm.goroutine.id", int(goid)))
    for field, key in _BYTE_FIELDS:  # many distinct values: not worth caching
        value = span.get(field)
        if value is not None:
            attributes.append(_int(key, int(value)))
    for field, key in _COUNT_FIELDS:
        value = span.get(field)
        if value is not None:
            attributes.append(_cached(key, int(value)))

    out.trace_id = trace_id
    out.span_id = span_id
    if parent:
        out.parent_span_id = parent
    out.name = name
    out.kind = kind  # type: ignore[assignment]
    out.start_time_unix_nano = int(span["start_ns"])
    out.end_time_unix_nano = int(span["end_ns"])
    out.attributes.extend(attributes)
    if status.code:
        out.status.CopyFrom(status)


def export_request(spans: Iterable[Mapping[str, Any]]) -> ExportTraceServiceRequest:
    """One request; spans of one process (and pod) share one ResourceSpans, in input order."""
    request = ExportTraceServiceRequest()
    groups: dict[tuple[Any, ...], Any] = {}  # resource -> its ScopeSpans' repeated spans
    for span in spans:
        key = tuple(span.get(f) for f in RESOURCE_FIELDS)
        group = groups.get(key)
        if group is None:
            resource_spans = request.resource_spans.add()
            resource_spans.resource.CopyFrom(resource_of(span))
            scope_spans = resource_spans.scope_spans.add()
            scope_spans.scope.CopyFrom(SCOPE)
            group = groups[key] = scope_spans.spans
        fill_span(group.add(), span)
    return request
