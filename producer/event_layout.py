"""numpy mirrors of the records in bpf/events.h.

tests/test_kernel_layout.py compiles that header and checks every offset and size here, so
the kernel and user sides cannot drift apart silently.
"""

from __future__ import annotations

import numpy as np

EVENT_KIND_SPAN = 1
EVENT_KIND_HTTP_SPAN = 2
EVENT_KIND_NET = 3
EVENT_KIND_CLIENT_SPAN = 4
PROTO_HTTP = 0  # net/http's serverHandler, protocol not told
PROTO_HTTP1 = 1
PROTO_HTTP2 = 2
PROTO_GRPC = 3
STATUS_UNKNOWN = 0xFFFF
NET_SEND = 0
NET_RECV = 1
HTTP_METHOD_MAX = 8
HTTP_PATH_MAX = 128
CLIENT_HTTP = 1
CLIENT_GRPC = 2
CLIENT_SQL = 3
# DB_SYSTEM_* value -> the OpenTelemetry db.system name ("" unknown)
DB_SYSTEMS = ("", "postgresql", "mysql", "sqlite", "mssql")
CLIENT_HOST_MAX = 64
CLIENT_TEXT_MAX = 256

EVENT_HEADER = np.dtype(
    [("kind", "<u2"), ("size", "<u2"), ("pid", "<u4"), ("ts_ns", "<u8")], align=True
)

SPAN_EVENT = np.dtype(
    [
        ("kind", "<u2"),
        ("size", "<u2"),
        ("pid", "<u4"),
        ("ts_ns", "<u8"),
        ("start_ns", "<u8"),
        ("goid", "<i8"),
        ("tid", "<u4"),
        ("end_tid", "<u4"),
        ("func_id", "<u4"),
        ("_pad", "<u4"),
        ("trace_id", "u1", (16,)),
        ("span_id", "<u8"),
        ("parent_span_id", "<u8"),
    ],
    align=True,
)

HTTP_SPAN_EVENT = np.dtype(
    SPAN_EVENT.descr
    + [
        ("status", "<u2"),
        ("path_len", "<u2"),
        ("method_len", "u1"),
        ("protocol", "u1"),
        ("_pad2", "u1", (2,)),
        ("method", f"S{HTTP_METHOD_MAX}"),
        ("path", f"S{HTTP_PATH_MAX}"),
        ("flushed_ns", "<u8"),
    ],
    align=True,
)

CLIENT_SPAN_EVENT = np.dtype(
    SPAN_EVENT.descr
    + [
        ("status", "<i4"),
        ("text_len", "<u4"),
        ("host_len", "<u2"),
        ("client", "u1"),
        ("error", "u1"),
        ("method_len", "u1"),
        ("db_system", "u1"),
        ("_pad2", "u1", (2,)),
        ("peer_family", "<u2"),
        ("peer_port", "<u2"),
        ("_pad3", "u1", (4,)),
        ("peer_addr", "S16"),
        ("method", f"S{HTTP_METHOD_MAX}"),
        ("host", f"S{CLIENT_HOST_MAX}"),
        ("text", f"S{CLIENT_TEXT_MAX}"),
    ],
    align=True,
)

NET_EVENT = np.dtype(
    [
        ("kind", "<u2"),
        ("size", "<u2"),
        ("pid", "<u4"),
        ("ts_ns", "<u8"),
        ("goid", "<i8"),
        ("bytes", "<i8"),
        ("tid", "<u4"),
        ("direction", "u1"),
        ("family", "u1"),
        ("sport", "<u2"),
        ("dport", "<u2"),
        ("_pad", "<u2", (3,)),
        ("saddr", "S16"),
        ("daddr", "S16"),
    ],
    align=True,
)

# Offsets as C sees them, for the layout test: C name -> (numpy field, offset).
C_FIELDS: dict[str, dict[str, str]] = {
    "span_event": {
        "hdr.kind": "kind",
        "hdr.size": "size",
        "hdr.pid": "pid",
        "hdr.ts_ns": "ts_ns",
        "start_ns": "start_ns",
        "goid": "goid",
        "tid": "tid",
        "end_tid": "end_tid",
        "func_id": "func_id",
        "trace_id": "trace_id",
        "span_id": "span_id",
        "parent_span_id": "parent_span_id",
    },
    "http_span_event": {
        "span.hdr.kind": "kind",
        "span.start_ns": "start_ns",
        "span.func_id": "func_id",
        "span.trace_id": "trace_id",
        "span.parent_span_id": "parent_span_id",
        "status": "status",
        "path_len": "path_len",
        "method_len": "method_len",
        "protocol": "protocol",
        "method": "method",
        "path": "path",
        "flushed_ns": "flushed_ns",
    },
    "client_span_event": {
        "span.hdr.kind": "kind",
        "span.start_ns": "start_ns",
        "span.func_id": "func_id",
        "status": "status",
        "text_len": "text_len",
        "host_len": "host_len",
        "client": "client",
        "error": "error",
        "method_len": "method_len",
        "db_system": "db_system",
        "peer_family": "peer_family",
        "peer_port": "peer_port",
        "peer_addr": "peer_addr",
        "method": "method",
        "host": "host",
        "text": "text",
    },
    "net_event": {
        "hdr.ts_ns": "ts_ns",
        "goid": "goid",
        "bytes": "bytes",
        "tid": "tid",
        "direction": "direction",
        "family": "family",
        "sport": "sport",
        "dport": "dport",
        "saddr": "saddr",
        "daddr": "daddr",
    },
}
