"""numpy mirrors of the span program's map structs and constants (bpf/probe_maps.h).

tests/test_kernel_layout.py compiles that header and checks every size, offset and constant
here, so the agent cannot mislabel a counter or write a map value the kernel reads another
way.
"""

from __future__ import annotations

import numpy as np

from ebpf_apm.producer.event_layout import HTTP_METHOD_MAX, HTTP_PATH_MAX

# Slots of the per-CPU `counters` array, by the names the agent reports them under.
COUNTERS: dict[str, int] = {
    "ring_full": 0,  # COUNTER_RING_FULL
    "table_full": 1,  # COUNTER_TABLE_FULL
    "return_without_entry": 2,  # COUNTER_NO_ENTRY
    "read_failed": 3,  # COUNTER_READ_FAILED
    "emitted": 4,  # COUNTER_EMITTED
    "net_emitted": 5,  # COUNTER_NET_EMITTED
    "net_ring_full": 6,  # COUNTER_NET_RING_FULL
}
COUNTER_SLOTS = 7

SITE_ENTRY = 1
SITE_RETURN = 2
SITE_FLAG_HTTP = 1
SITE_FLAG_HTTP_FINISH = 2
SITE_FLAG_H2 = 4
SITE_FLAG_GRPC = 8
SITE_FLAG_GRPC_STATUS = 16
SITE_FLAG_CLIENT_HTTP = 32
SITE_FLAG_CLIENT_GRPC = 64
SITE_FLAG_CLIENT_SQL = 128
SITE_FLAG_CLIENT = SITE_FLAG_CLIENT_HTTP | SITE_FLAG_CLIENT_GRPC | SITE_FLAG_CLIENT_SQL
SITE_FLAG_CLIENT_GRPC_STREAM = 256
SITE_FLAG_CLIENT_GRPC_END = 512
SITE_FLAG_H2_DONE = 0x4000
SITE_FLAG_SPAWN = 0x8000
SITE_FLAG_CLIENT_PEER = 1024
SITE_FLAG_CLIENT_HTTP_PEER = 2048
TCP_ADDR_PORT = 24
CALL_FINISH_EXPECTED = 1
CALL_HANDLER_RETURNED = 2
CALL_HTTP1 = 4
CALL_HTTP2 = 8
CALL_GRPC = 16
CALL_HAD_CONTEXT = 0x100
MAX_THREAD_DEPTH = 8
HEADER_MAP_NONE = 0
HEADER_MAP_BUCKETS = 1
HEADER_MAP_SWISS = 2
CALL_REMOTE_PARENT = 0x200

SITE_KEY = np.dtype([("tgid", "<u4"), ("_pad", "<u4"), ("ip", "<u8")], align=True)
SITE = np.dtype(
    [
        ("func_id", "<u4"),
        ("role", "<u2"),
        ("flags", "<u2"),
        ("field_a", "<i4"),
        ("field_b", "<i4"),
        ("field_c", "<i4"),
        ("field_d", "<i4"),
        ("field_e", "<i4"),
    ],
    align=True,
)
PROCESS_LAYOUT = np.dtype(
    [
        ("goid", "<i4"),
        ("request_method", "<i4"),
        ("request_url", "<i4"),
        ("url_path", "<i4"),
        ("response_status", "<i4"),
        ("is_go", "<u4"),
        ("http_finish", "<u4"),
        ("h2_server", "<u4"),
        ("request_header", "<i4"),
        ("header_map", "<u4"),
    ],
    align=True,
)
GOROUTINE_KEY = np.dtype([("tgid", "<u4"), ("_pad", "<u4"), ("goid", "<i8")], align=True)
TRACE_CONTEXT = np.dtype([("trace_id", "u1", (16,)), ("span_id", "<u8")], align=True)
CALL_KEY = np.dtype([("tgid", "<u4"), ("func_id", "<u4"), ("id", "<i8")], align=True)
CALL_START = np.dtype(
    [
        ("start_ns", "<u8"),
        ("request", "<u8"),
        ("response", "<u8"),
        ("tid", "<u4"),
        ("flags", "<u4"),
        ("handler_end_ns", "<u8"),
        ("stream", "<u8"),
        ("context", TRACE_CONTEXT),
        ("parent_span_id", "<u8"),
        ("rpc_status", "<i4"),
        ("path_len", "<u2"),
        ("method_len", "u1"),
        ("_pad", "u1"),
        ("method", f"S{HTTP_METHOD_MAX}"),
        ("path", f"S{HTTP_PATH_MAX}"),
        ("peer_addr", "u1", (16,)),
        ("peer_port", "<u2"),
        ("peer_family", "<u2"),
        ("_pad2", "<u4"),
    ],
    align=True,
)
THREAD_KEY = np.dtype([("tgid", "<u4"), ("tid", "<u4")], align=True)
THREAD_CALLS = np.dtype(
    [
        ("depth", "<u4"),
        ("func_id", "<u4", (MAX_THREAD_DEPTH,)),
        ("start_ns", "<u8", (MAX_THREAD_DEPTH,)),
    ],
    align=True,
)
# Per process, how often each program ran for it (BPF_PERCPU_HASH: one value per CPU).
PROBE_HITS = np.dtype(
    [("entry", "<u8"), ("ret", "<u8"), ("uretprobe", "<u8"), ("net", "<u8")], align=True
)

# struct name in probe_maps.h -> its mirror; every field of the mirror but padding is checked.
STRUCTS: dict[str, np.dtype] = {
    "site_key": SITE_KEY,
    "site": SITE,
    "process_layout": PROCESS_LAYOUT,
    "goroutine_key": GOROUTINE_KEY,
    "trace_context": TRACE_CONTEXT,
    "call_key": CALL_KEY,
    "call_start": CALL_START,
    "thread_key": THREAD_KEY,
    "thread_calls": THREAD_CALLS,
    "probe_hits": PROBE_HITS,
}

# #define name in probe_maps.h -> value here.
CONSTANTS: dict[str, int] = {
    "COUNTER_RING_FULL": COUNTERS["ring_full"],
    "COUNTER_TABLE_FULL": COUNTERS["table_full"],
    "COUNTER_NO_ENTRY": COUNTERS["return_without_entry"],
    "COUNTER_READ_FAILED": COUNTERS["read_failed"],
    "COUNTER_EMITTED": COUNTERS["emitted"],
    "COUNTER_NET_EMITTED": COUNTERS["net_emitted"],
    "COUNTER_NET_RING_FULL": COUNTERS["net_ring_full"],
    "COUNTER_SLOTS": COUNTER_SLOTS,
    "SITE_ENTRY": SITE_ENTRY,
    "SITE_RETURN": SITE_RETURN,
    "SITE_FLAG_HTTP": SITE_FLAG_HTTP,
    "SITE_FLAG_HTTP_FINISH": SITE_FLAG_HTTP_FINISH,
    "SITE_FLAG_H2": SITE_FLAG_H2,
    "SITE_FLAG_GRPC": SITE_FLAG_GRPC,
    "SITE_FLAG_GRPC_STATUS": SITE_FLAG_GRPC_STATUS,
    "SITE_FLAG_H2_DONE": SITE_FLAG_H2_DONE,
    "SITE_FLAG_SPAWN": SITE_FLAG_SPAWN,
    "CALL_FINISH_EXPECTED": CALL_FINISH_EXPECTED,
    "CALL_HANDLER_RETURNED": CALL_HANDLER_RETURNED,
    "CALL_HTTP1": CALL_HTTP1,
    "CALL_HTTP2": CALL_HTTP2,
    "CALL_GRPC": CALL_GRPC,
    "CALL_HAD_CONTEXT": CALL_HAD_CONTEXT,
    "MAX_THREAD_DEPTH": MAX_THREAD_DEPTH,
    "SITE_FLAG_CLIENT_HTTP": SITE_FLAG_CLIENT_HTTP,
    "SITE_FLAG_CLIENT_GRPC": SITE_FLAG_CLIENT_GRPC,
    "SITE_FLAG_CLIENT_SQL": SITE_FLAG_CLIENT_SQL,
    "SITE_FLAG_CLIENT": SITE_FLAG_CLIENT,
    "SITE_FLAG_CLIENT_GRPC_STREAM": SITE_FLAG_CLIENT_GRPC_STREAM,
    "SITE_FLAG_CLIENT_GRPC_END": SITE_FLAG_CLIENT_GRPC_END,
    "HEADER_MAP_NONE": HEADER_MAP_NONE,
    "HEADER_MAP_BUCKETS": HEADER_MAP_BUCKETS,
    "HEADER_MAP_SWISS": HEADER_MAP_SWISS,
    "CALL_REMOTE_PARENT": CALL_REMOTE_PARENT,
    "SITE_FLAG_CLIENT_PEER": SITE_FLAG_CLIENT_PEER,
    "SITE_FLAG_CLIENT_HTTP_PEER": SITE_FLAG_CLIENT_HTTP_PEER,
    "TCP_ADDR_PORT": TCP_ADDR_PORT,
}
