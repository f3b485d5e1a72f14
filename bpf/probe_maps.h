/* Keys and values of the span program's maps, and the constants both sides use.
 *
 * Declared once, here: uprobe_spans.bpf.c includes this header (net_events.bpf.c is
 * compiled in the same object); the agent mirrors it in producer/map_layout.py (it fills `probe_sites` and `process_layouts`,
 * reads `counters` and sweeps `calls_in_flight`); tests/test_kernel_layout.py compiles this
 * header and fails if a struct, an offset or a constant differs from the mirror.
 */
#ifndef EBPF_APM_PROBE_MAPS_H
#define EBPF_APM_PROBE_MAPS_H

#include "events.h" /* HTTP_METHOD_MAX, HTTP_PATH_MAX */

/* Slots of the per-CPU `counters` array; the agent names them by these numbers. */
#define COUNTER_RING_FULL 0       /* record lost: ring buffer had no room */
#define COUNTER_TABLE_FULL 1      /* call not timed: in-flight table full */
#define COUNTER_NO_ENTRY 2        /* return seen without its entry (attached mid-call) */
#define COUNTER_READ_FAILED 3     /* user memory read failed (goid, request fields) */
#define COUNTER_EMITTED 4         /* span records written */
#define COUNTER_NET_EMITTED 5     /* network records written */
#define COUNTER_NET_RING_FULL 6   /* network record lost: ring buffer had no room */
#define COUNTER_SLOTS 7

/* site.role */
#define SITE_ENTRY 1
#define SITE_RETURN 2
/* site.flags */
#define SITE_FLAG_HTTP 1
#define SITE_FLAG_HTTP_FINISH 2   /* a RET of net/http.(*response).finishRequest */
/* (*serverConn).runHandler(sc, rw *responseWriter, req, handler) of net/http's h2 server
 * (bundled, or net/http/internal/http2 from Go 1.27) or golang.org/x/net/http2: one HTTP/2
 * stream. field_a: responseWriter.rws, field_b: responseWriterState.status, field_c and
 * field_d: the request's Method and URL (an *http.Request, or Go 1.27's *ServerRequest).
 * responseWriterState.stream is its first field (the agent checks): handlerDone puts rws
 * back in a pool before runHandler returns, so the status read at the return is kept only
 * if rws still serves the stream it served at the entry. */
#define SITE_FLAG_H2 4
/* grpc.(*Server).handleStream(s, t ServerTransport, stream *transport.Stream, trInfo): one
 * gRPC call. field_a: transport.Stream.method. */
#define SITE_FLAG_GRPC 8
/* Entry of transport.(*http2Server).WriteStatus(t, s *Stream, st *status.Status), on the
 * goroutine of the handleStream call `func_id`: the call's status code. field_a:
 * internal/status.Status.s, field_b: (genproto) status.Status.Code. */
#define SITE_FLAG_GRPC_STATUS 16
/* Client calls (producer/client_probes.py); span records go to `client_events`.
 * net/http.(*Client).do(c, req *Request) (*Response, error): one span per request the
 * program made (redirects followed inside). field_a: url.URL.Host, field_b:
 * Response.StatusCode. */
#define SITE_FLAG_CLIENT_HTTP 32
/* google.golang.org/grpc.invoke(ctx, method string, req, reply, cc, opts...) error: one unary
 * call (under any interceptors). field_a: internal/status.Error.e, field_b: (genproto)
 * status.Status.Code. */
#define SITE_FLAG_CLIENT_GRPC 64
/* database/sql.(*DB|*Tx|*Conn).QueryContext and ExecContext(x, ctx, query string, args...):
 * one statement. field_a: the register of the returned error's type word (1: RBX for
 * (*Rows, error), 2: RCX for (Result, error)), field_b: DB_SYSTEM_* of the binary. */
#define SITE_FLAG_CLIENT_SQL 128
#define SITE_FLAG_CLIENT (SITE_FLAG_CLIENT_HTTP | SITE_FLAG_CLIENT_GRPC | SITE_FLAG_CLIENT_SQL)
/* Entry of google.golang.org/grpc.newClientStream(ctx, desc *StreamDesc, cc, method string,
 * opts...): a streaming call starts (unary calls, whose desc has neither ServerStreams nor
 * ClientStreams, are invoke's). field_a: StreamDesc.ServerStreams, field_b: ClientStreams. */
#define SITE_FLAG_CLIENT_GRPC_STREAM 256
/* Entry of (*csAttempt).finish(a, err error) on the same goroutine: the stream of the call
 * `func_id` ends with err (nil: OK). field_a, field_b as for SITE_FLAG_CLIENT_GRPC. */
#define SITE_FLAG_CLIENT_GRPC_END 512
/* runtime.newproc1(fn, callergp *g, callerpc, ...) *g, which makes every new goroutine (on
 * the system stack, so not keyed by goroutine): its RETs give the creating goroutine's trace
 * context to the new g (RAX). With field_a (runtime.g.m) and field_b (runtime.m.curg) known,
 * only the RETs are probed: the creator is g0.m.curg (g0 in R14). Else (-1) the entry notes
 * the context of callergp (RBX) for the thread, in `spawning`. */
/* Entry of the h2 server's (*responseWriter).handlerDone(w), on the goroutine of the
 * runHandler call `func_id`: the status the response goes out with (0: none written, the
 * flush sends 200), read while w.rws is still this stream's. field_a: responseWriter.rws,
 * field_b: responseWriterState.status. */
#define SITE_FLAG_H2_DONE 0x4000
#define SITE_FLAG_SPAWN 0x8000  /* far from the client flags (32..2048) */
/* Entry of google.golang.org/grpc/internal/transport.(*http2Client).NewStream(t, ...), on the
 * goroutine of a gRPC client call: the peer of the call's connection, for the call in flight
 * there (`func_id` invoke's; field_c: newClientStream's function id, -1 none). field_a:
 * http2Client.remoteAddr (a net.Addr), field_b: net.TCPAddr.Port (IP is at 0). */
#define SITE_FLAG_CLIENT_PEER 1024
/* Entry of net/http.(*persistConn).roundTrip(pc, req), on the goroutine of the
 * (*Client).do call `func_id`: the connection of this attempt (the last one wins, so a
 * redirected request gets its final connection). field_a: persistConn.conn (a net.Conn),
 * field_b: persistConn.tlsState (non-nil: conn is a *tls.Conn), field_c: net.netFD.raddr,
 * field_d: crypto/tls.Conn.conn. */
#define SITE_FLAG_CLIENT_HTTP_PEER 2048
#define TCP_ADDR_PORT 24          /* net.TCPAddr.Port (IP is at 0), every Go release here */

/* call_start.flags */
#define CALL_FINISH_EXPECTED 1    /* HTTP/1: finishRequest will flush the response */
#define CALL_HANDLER_RETURNED 2   /* ServeHTTP returned; the span ends at finishRequest */
#define CALL_HTTP1 4              /* served by net/http's HTTP/1 server */
#define CALL_HTTP2 8              /* an HTTP/2 stream (runHandler) */
#define CALL_GRPC 16              /* a gRPC call (handleStream) */
#define CALL_HAD_CONTEXT 0x100    /* the span continued its goroutine's trace context: its
                                   * end gives the goroutine back (trace, parent) */

#define MAX_THREAD_DEPTH 8

/* process_layout.header_map: Go's map layout, read only while the map has one group or
 * bucket (at most 8 header fields): a larger header is not searched. */
#define HEADER_MAP_NONE 0
#define HEADER_MAP_BUCKETS 1      /* Go <= 1.23 runtime.hmap: B (u8) at 9, buckets at 16; a
                                   * bucket is tophash[8], 8 keys, 8 values */
#define HEADER_MAP_SWISS 2        /* Go >= 1.24 internal/runtime/maps.Map: dirPtr at 16 (the
                                   * group when dirLen, at 24, is 0); a group is a control
                                   * word and 8 interleaved (key, value) slots */
#define CALL_REMOTE_PARENT 0x200  /* the parent came from a traceparent header */

/* probe_sites: which function, and which end of it, an instruction address belongs to. */
struct site_key {
    __u32 tgid;
    __u32 _pad;
    __u64 ip;            /* the probed instruction's address in the process */
};

struct site {
    __u32 func_id;       /* the agent's id of the function (span records carry it) */
    __u16 role;          /* SITE_ENTRY or SITE_RETURN */
    __u16 flags;         /* SITE_FLAG_* */
    __s32 field_a;       /* offsets of the fields this site reads (see SITE_FLAG_*), -1 none */
    __s32 field_b;
    __s32 field_c;
    __s32 field_d;
    __s32 field_e;       /* SITE_FLAG_H2: the request's Header (a traceparent is read), -1 */
};

/* process_layouts: field offsets of the Go runtime and net/http for one process
 * (-1: unknown). */
struct process_layout {
    __s32 goid;
    __s32 request_method;
    __s32 request_url;
    __s32 url_path;
    __s32 response_status;
    __u32 is_go;
    __u32 http_finish;   /* finishRequest is probed: HTTP/1 spans end when it returns */
    __u32 h2_server;     /* runHandler is probed: serverHandler.ServeHTTP leaves HTTP/2
                          * requests to it (one span per stream) */
    __s32 request_header; /* net/http.Request.Header (map[string][]string), -1 unknown */
    __u32 header_map;    /* HEADER_MAP_*: that map's layout; HTTP/1 spans continue an
                          * incoming W3C traceparent found in it */
};

/* goroutine_contexts (LRU, Go): the span current on a goroutine, which the spans it starts
 * (and the goroutines it creates) descend from. `spawning` (LRU, by thread): the context of
 * the goroutine that runtime.newproc1 is creating a goroutine for. */
struct goroutine_key {
    __u32 tgid;
    __u32 _pad;
    __s64 goid;
};

struct trace_context {
    __u8 trace_id[16];   /* W3C trace id, in byte order */
    __u64 span_id;       /* never 0 */
};

/* calls_in_flight: one entered, not yet returned call. */
struct call_key {
    __u32 tgid;
    __u32 func_id;
    __s64 id;            /* goroutine id for Go, thread id otherwise */
};

struct call_start {
    __u64 start_ns;
    __u64 request;       /* *net/http.Request (HTTP/1), rws (HTTP/2), address of the method
                          * string (gRPC); client gRPC and SQL: the method's or statement's
                          * bytes */
    __u64 response;      /* address of the response's status int (HTTP), 0 unknown;
                          * client gRPC and SQL: the length of the string at `request` */
    __u32 tid;
    __u32 flags;         /* CALL_* */
    __u64 handler_end_ns; /* HTTP/1: when ServeHTTP returned (the span's end) */
    __u64 stream;        /* HTTP/2: rws.stream at the entry (see SITE_FLAG_H2) */
    struct trace_context context; /* the span's trace and own id (fixed at the entry) */
    __u64 parent_span_id; /* 0: a root span */
    __s32 rpc_status;    /* gRPC: the code WriteStatus sent; HTTP/2: the status handlerDone
                          * saw; -1 until then */
    /* Server spans: the request's method and path (gRPC: full method), copied at the entry.
     * Not read through `request` at the return: the h2 server reuses a stream's request
     * state (and the memory its strings point to) for the next stream once the handler is
     * done, before runHandler returns. */
    __u16 path_len;      /* length before truncation to HTTP_PATH_MAX */
    __u8 method_len;
    __u8 _pad;
    char method[HTTP_METHOD_MAX];
    char path[HTTP_PATH_MAX];
    __u8 peer_addr[16];  /* client gRPC: the connection's remote address (IPv4 first 4) */
    __u16 peer_port;
    __u16 peer_family;   /* 0 unknown, 2 IPv4, 10 IPv6 */
    __u32 _pad2;
};

/* thread_stacks: non-Go calls on one thread, innermost last (uretprobes fire in LIFO
 * order). */
struct thread_key {
    __u32 tgid;
    __u32 tid;
};

struct thread_calls {
    __u32 depth;
    __u32 func_id[MAX_THREAD_DEPTH];
    __u64 start_ns[MAX_THREAD_DEPTH];
};

/* probe_hits (per CPU, by tgid): how often each program ran for a traced process. The agent
 * multiplies them by each program's mean run time (the kernel's BPF run-time statistics)
 * and the uprobe hits by the trap cost it calibrates at start: the CPU the probes cost the
 * process (producer/probe_cost.py). Counted only while the process has a layout, so the
 * entry the agent deletes when the process exits is not created again by a late hit. */
struct probe_hits {
    __u64 entry;         /* span_entry: a uprobe trap each */
    __u64 ret;           /* span_return: a uprobe trap each */
    __u64 uretprobe;     /* span_uretprobe: a uretprobe trap each (non-Go) */
    __u64 net;           /* network programs (tracepoints or kprobes) for its socket I/O */
};

#endif
