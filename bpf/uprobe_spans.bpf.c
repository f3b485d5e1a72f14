/* Function and HTTP spans from uprobes, without uretprobes on Go code.
 *
 * The agent attaches `span_entry` at each probed function's entry and, for Go, `span_return`
 * at every RET instruction of the function (a uretprobe rewrites the return address on the
 * goroutine stack, which Go moves and checks: the target dies). Non-Go functions return
 * through `span_uretprobe`. Which function a hit belongs to is looked up by instruction
 * address in `probe_sites`, which the agent fills per process.
 *
 * Server spans (HTTP/1, HTTP/2, gRPC) go to `http_events`, one record type for all: the
 * site's flags say which server function it is (probe_maps.h).
 *
 * Go calls are keyed by goroutine (the g pointer is in R14 under Go's register ABI), because
 * a goroutine that blocks may resume on another thread. Non-Go calls are keyed by thread.
 *
 * Compiled together with net_events.bpf.c into one BPF object (producer/bpf_loader.py).
 * The maps' key and value structs and the counter and site constants are in probe_maps.h,
 * which the agent mirrors (producer/map_layout.py) and a compiled test checks.
 * Options come in as -D defines from producer/bpf_loader.py:
 *   SPAN_RING_PAGES, HTTP_RING_PAGES, CLIENT_RING_PAGES
 *                                     ring buffer sizes in pages (powers of two)
 *   WAKEUP_EVERY                      records per CPU between forced wakeups of the reader
 *   MAX_CALLS_IN_FLIGHT               in-flight calls tracked at once, all processes
 *   USE_PERF_BUFFER                   perf buffer instead of the ring buffer (kernels < 5.8)
 *   SYNTHETIC_SOURCE                  benchmarks only: emit SYNTHETIC_BURST span records per
 *                                     getppid() call of the process in `synthetic_pid`
 */
#include <uapi/linux/ptrace.h>
#include "events.h"
#include "probe_maps.h"

#ifndef SPAN_RING_PAGES
#define SPAN_RING_PAGES 1024
#endif
#ifndef HTTP_RING_PAGES
#define HTTP_RING_PAGES 256
#endif
#ifndef CLIENT_RING_PAGES
#define CLIENT_RING_PAGES 256
#endif
#ifndef WAKEUP_EVERY
#define WAKEUP_EVERY 256
#endif
#ifndef MAX_CALLS_IN_FLIGHT
#define MAX_CALLS_IN_FLIGHT 65536
#endif
#define MAX_PROBE_SITES 16384
#define MAX_PROCESSES 4096

BPF_HASH(probe_sites, struct site_key, struct site, MAX_PROBE_SITES);
BPF_HASH(process_layouts, u32, struct process_layout, MAX_PROCESSES);
BPF_HASH(calls_in_flight, struct call_key, struct call_start, MAX_CALLS_IN_FLIGHT);
BPF_HASH(thread_stacks, struct thread_key, struct thread_calls, MAX_CALLS_IN_FLIGHT);
BPF_PERCPU_ARRAY(counters, u64, COUNTER_SLOTS);
BPF_PERCPU_HASH(probe_hits, u32, struct probe_hits, MAX_PROCESSES);
BPF_PERCPU_ARRAY(unwoken, u64, 4); /* spans, http, net, client */

#ifdef USE_PERF_BUFFER
BPF_PERF_OUTPUT(span_events);
BPF_PERF_OUTPUT(http_events);
BPF_PERCPU_ARRAY(http_scratch, struct http_span_event, 1); /* too big for the BPF stack */
BPF_PERF_OUTPUT(client_events);
BPF_PERCPU_ARRAY(client_scratch, struct client_span_event, 1);
#else
BPF_RINGBUF_OUTPUT(client_events, CLIENT_RING_PAGES);
BPF_RINGBUF_OUTPUT(span_events, SPAN_RING_PAGES);
BPF_RINGBUF_OUTPUT(http_events, HTTP_RING_PAGES);
#endif

static __always_inline void count(u32 slot)
{
    u64 *value = counters.lookup(&slot);
    if (value)
        *value += 1;
}

/* The reader sleeps until WAKEUP_EVERY records have waited on this CPU (or its timer
 * fires): a wakeup per record costs the traced thread about a microsecond. */
static __always_inline u64 wakeup_flag(u32 ring)
{
    u64 *pending = unwoken.lookup(&ring);
    if (!pending)
        return 0;
    *pending += 1;
    if (*pending < WAKEUP_EVERY)
        return BPF_RB_NO_WAKEUP;
    *pending = 0;
    return BPF_RB_FORCE_WAKEUP;
}

/* The hit counters of a traced process (NULL when the table is full). */
static __always_inline struct probe_hits *hits_of(u32 tgid)
{
    struct probe_hits zero = {};
    return probe_hits.lookup_or_try_init(&tgid, &zero);
}

static __always_inline struct site *site_at(struct pt_regs *ctx, u32 tgid)
{
    struct site_key key = {.tgid = tgid, .ip = PT_REGS_IP(ctx)};
    return probe_sites.lookup(&key);
}

static __always_inline int read_goid(struct pt_regs *ctx, struct process_layout *layout,
                                     s64 *goid)
{
    if (bpf_probe_read_user(goid, sizeof(*goid), (void *)(ctx->r14 + layout->goid)) != 0) {
        count(COUNTER_READ_FAILED);
        return -1;
    }
    return 0;
}

static __always_inline void fill_span(struct span_event *e, u16 kind, u16 size, u32 tgid,
                                      u32 func_id, s64 goid, u64 start_ns, u32 tid)
{
    e->hdr.kind = kind;
    e->hdr.size = size;
    e->hdr.pid = tgid;
    e->hdr.ts_ns = bpf_ktime_get_boot_ns();
    e->start_ns = start_ns;
    e->goid = goid;
    e->tid = tid;
    e->end_tid = (u32)bpf_get_current_pid_tgid();
    e->func_id = func_id;
    e->_pad = 0;
}

static __always_inline void emit_span(struct pt_regs *ctx, u32 tgid, u32 func_id, s64 goid,
                                      u64 start_ns, u32 tid)
{
#ifdef USE_PERF_BUFFER
    struct span_event e = {};
    fill_span(&e, EVENT_KIND_SPAN, sizeof(e), tgid, func_id, goid, start_ns, tid);
    if (span_events.perf_submit(ctx, &e, sizeof(e)) != 0)
        count(COUNTER_RING_FULL);
    else
        count(COUNTER_EMITTED);
#else
    struct span_event *e = span_events.ringbuf_reserve(sizeof(struct span_event));
    if (!e) {
        count(COUNTER_RING_FULL);
        return;
    }
    fill_span(e, EVENT_KIND_SPAN, sizeof(*e), tgid, func_id, goid, start_ns, tid);
    span_events.ringbuf_submit(e, wakeup_flag(0));
    count(COUNTER_EMITTED);
#endif
}

/* Copy a Go string (pointer, length) at `addr` into `dst`; returns the full length. */
static __always_inline u32 read_go_string(u64 addr, char *dst, u32 cap)
{
    struct {
        u64 ptr;
        s64 len;
    } s = {};
    if (bpf_probe_read_user(&s, sizeof(s), (void *)addr) != 0 || s.len < 0)
        return 0;
    u32 n = s.len < cap ? (u32)s.len : cap;
    /* cap is a power of two, so the mask changes nothing but proves n <= 2*cap-1 to the
     * verifier. */
    if (n > 0 && bpf_probe_read_user(dst, n & (2 * cap - 1), (void *)s.ptr) != 0)
        return 0;
    return (u32)s.len;
}

static __always_inline void fill_http(struct http_span_event *e, struct process_layout *layout,
                                      struct site *site, struct call_start *start)
{
    e->status = STATUS_UNKNOWN;
    e->path_len = 0;
    e->method_len = 0;
    e->protocol = PROTO_HTTP;
    __builtin_memset(e->_pad, 0, sizeof(e->_pad));
    __builtin_memset(e->method, 0, sizeof(e->method));
    __builtin_memset(e->path, 0, sizeof(e->path));
    e->flushed_ns = 0;
    if (start->flags & CALL_GRPC) {
        e->protocol = PROTO_GRPC;
        u32 n = read_go_string(start->request, e->path, HTTP_PATH_MAX);
        e->path_len = n > 65535 ? 65535 : n;
        if (start->rpc_status >= 0 && start->rpc_status < STATUS_UNKNOWN)
            e->status = (u16)start->rpc_status;
        return;
    }
    s32 method_at = layout->request_method, url_at = layout->request_url;
    if (start->flags & CALL_HTTP1) {
        e->protocol = PROTO_HTTP1;
    } else if (start->flags & CALL_HTTP2) {
        e->protocol = PROTO_HTTP2;
        method_at = site->field_c;  /* runHandler's request type may not be *http.Request */
        url_at = site->field_d;
    }
    if (method_at >= 0) {
        u32 n = read_go_string(start->request + method_at, e->method, HTTP_METHOD_MAX);
        e->method_len = n > 255 ? 255 : n;
    }
    u64 url = 0;
    if (url_at >= 0 &&
        bpf_probe_read_user(&url, sizeof(url), (void *)(start->request + url_at)) == 0 &&
        url != 0 && layout->url_path >= 0) {
        u32 n = read_go_string(url + layout->url_path, e->path, HTTP_PATH_MAX);
        e->path_len = n > 65535 ? 65535 : n;
    }
    if (start->flags & CALL_HANDLER_RETURNED) {
        e->flushed_ns = e->span.hdr.ts_ns;          /* now: finishRequest has returned */
        e->span.hdr.ts_ns = start->handler_end_ns;  /* the span ends where ServeHTTP did */
    }
    if (start->response != 0) {
        s64 status = 0;
        if (bpf_probe_read_user(&status, sizeof(status), (void *)start->response) == 0)
            e->status = (u16)status;
        else
            count(COUNTER_READ_FAILED);
    }
}

static __always_inline void emit_http(struct pt_regs *ctx, u32 tgid, struct site *site, s64 goid,
                                      struct call_start *start, struct process_layout *layout)
{
#ifdef USE_PERF_BUFFER
    u32 zero = 0;
    struct http_span_event *e = http_scratch.lookup(&zero);
    if (!e)
        return;
    fill_span(&e->span, EVENT_KIND_HTTP_SPAN, sizeof(*e), tgid, site->func_id, goid,
              start->start_ns, start->tid);
    fill_http(e, layout, site, start);
    if (http_events.perf_submit(ctx, e, sizeof(*e)) != 0)
        count(COUNTER_RING_FULL);
    else
        count(COUNTER_EMITTED);
#else
    struct http_span_event *e = http_events.ringbuf_reserve(sizeof(struct http_span_event));
    if (!e) {
        count(COUNTER_RING_FULL);
        return;
    }
    fill_span(&e->span, EVENT_KIND_HTTP_SPAN, sizeof(*e), tgid, site->func_id, goid,
              start->start_ns, start->tid);
    fill_http(e, layout, site, start);
    http_events.ringbuf_submit(e, wakeup_flag(1));
    count(COUNTER_EMITTED);
#endif
}

/* Copy `len` bytes of user memory at `ptr` (a Go string's data) into `dst`. */
static __always_inline void read_user_text(u64 ptr, u64 len, char *dst, u32 cap)
{
    u32 n = len < cap ? (u32)len : cap;
    if (n > 0 && ptr != 0)
        bpf_probe_read_user(dst, n & (2 * cap - 1), (void *)ptr);
}

/* A client call returns (a RET of its function): results are in registers (Go's register
 * ABI), the request's fields are read from what the entry kept. */
static __always_inline void fill_client(struct pt_regs *ctx, struct client_span_event *e,
                                        struct process_layout *layout, struct site *site,
                                        struct call_start *start)
{
    e->status = -1;
    e->text_len = 0;
    e->host_len = 0;
    e->error = 0;
    e->method_len = 0;
    e->db_system = 0;
    __builtin_memset(e->_pad, 0, sizeof(e->_pad));
    __builtin_memset(e->_pad3, 0, sizeof(e->_pad3));
    e->peer_family = start->peer_family;
    e->peer_port = start->peer_port;
    __builtin_memcpy(e->peer_addr, start->peer_addr, sizeof(e->peer_addr));
    __builtin_memset(e->method, 0, sizeof(e->method));
    __builtin_memset(e->host, 0, sizeof(e->host));
    __builtin_memset(e->text, 0, sizeof(e->text));
    if (site->flags & SITE_FLAG_CLIENT_HTTP) {
        /* do returns (*Response in RAX, error in RBX/RCX). */
        e->client = CLIENT_HTTP;
        u64 req = start->request;
        if (layout->request_method >= 0) {
            u32 n = read_go_string(req + layout->request_method, e->method, HTTP_METHOD_MAX);
            e->method_len = n > 255 ? 255 : n;
        }
        u64 url = 0;
        if (layout->request_url >= 0 &&
            bpf_probe_read_user(&url, sizeof(url), (void *)(req + layout->request_url)) == 0 &&
            url != 0) {
            if (site->field_a >= 0) {
                u32 n = read_go_string(url + site->field_a, e->host, CLIENT_HOST_MAX);
                e->host_len = n > 65535 ? 65535 : n;
            }
            if (layout->url_path >= 0)
                e->text_len = read_go_string(url + layout->url_path, e->text, CLIENT_TEXT_MAX);
        }
        if (ctx->bx != 0) {
            e->error = 1;
        } else if (ctx->ax != 0 && site->field_b >= 0) {
            s64 code = 0;
            if (bpf_probe_read_user(&code, sizeof(code), (void *)(ctx->ax + site->field_b)) == 0)
                e->status = (s32)code;
            else
                count(COUNTER_READ_FAILED);
        }
    } else if (site->flags & (SITE_FLAG_CLIENT_GRPC | SITE_FLAG_CLIENT_GRPC_END)) {
        /* invoke returns an error (RAX type, RBX data); (*csAttempt).finish(a, err) receives
         * one (RBX, RCX): nil is OK, else a *status.Error whose proto status holds the code.
         * (All three read before choosing: see the SQL case below.) */
        e->client = CLIENT_GRPC;
        e->text_len = start->response > 0xffffffff ? 0xffffffff : (u32)start->response;
        read_user_text(start->request, start->response, e->text, CLIENT_TEXT_MAX);
        u64 rax = ctx->ax, rbx = ctx->bx, rcx = ctx->cx;
        asm volatile("" : "+r"(rax), "+r"(rbx), "+r"(rcx));
        int stream_end = (site->flags & SITE_FLAG_CLIENT_GRPC_END) != 0;
        u64 err_type = stream_end ? rbx : rax, err_data = stream_end ? rcx : rbx;
        if (err_type == 0) {
            e->status = 0;
        } else {
            e->error = 1;
            u64 proto = 0;
            s32 code = -1;
            if (site->field_a >= 0 && site->field_b >= 0 &&
                bpf_probe_read_user(&proto, sizeof(proto), (void *)(err_data + site->field_a)) == 0 &&
                proto != 0 &&
                bpf_probe_read_user(&code, sizeof(code), (void *)(proto + site->field_b)) == 0)
                e->status = code;
            else
                count(COUNTER_READ_FAILED);
        }
    } else {
        /* QueryContext returns (*Rows, error): the error's type word in RBX; ExecContext
         * (Result, error): in RCX. */
        e->client = CLIENT_SQL;
        e->db_system = (u8)site->field_b;
        e->text_len = start->response > 0xffffffff ? 0xffffffff : (u32)start->response;
        read_user_text(start->request, start->response, e->text, CLIENT_TEXT_MAX);
        /* Both registers read before choosing (the empty asm keeps the compiler from
         * turning the choice into a computed context offset, which the verifier refuses). */
        u64 rbx = ctx->bx, rcx = ctx->cx;
        asm volatile("" : "+r"(rbx), "+r"(rcx));
        e->error = site->field_a == 2 ? rcx != 0 : rbx != 0;
    }
}

static __always_inline void emit_client(struct pt_regs *ctx, u32 tgid, struct site *site,
                                        s64 goid, struct call_start *start,
                                        struct process_layout *layout)
{
#ifdef USE_PERF_BUFFER
    u32 zero = 0;
    struct client_span_event *e = client_scratch.lookup(&zero);
    if (!e)
        return;
    fill_span(&e->span, EVENT_KIND_CLIENT_SPAN, sizeof(*e), tgid, site->func_id, goid,
              start->start_ns, start->tid);
    fill_client(ctx, e, layout, site, start);
    if (client_events.perf_submit(ctx, e, sizeof(*e)) != 0)
        count(COUNTER_RING_FULL);
    else
        count(COUNTER_EMITTED);
#else
    struct client_span_event *e = client_events.ringbuf_reserve(sizeof(struct client_span_event));
    if (!e) {
        count(COUNTER_RING_FULL);
        return;
    }
    fill_span(&e->span, EVENT_KIND_CLIENT_SPAN, sizeof(*e), tgid, site->func_id, goid,
              start->start_ns, start->tid);
    fill_client(ctx, e, layout, site, start);
    client_events.ringbuf_submit(e, wakeup_flag(3));
    count(COUNTER_EMITTED);
#endif
}

/* The peer of a client call from a *net.TCPAddr {IP []byte, Port int, ...} at `addr` (an
 * address of another kind, e.g. a unix socket's name, has no 4 or 16 IP bytes there). */
static __always_inline void peer_from_tcp_addr(u64 addr, s32 port_at, struct call_start *call)
{
    struct {
        u64 ptr;
        s64 len;
    } ip = {};
    s64 port = 0;
    if (addr == 0 || bpf_probe_read_user(&ip, sizeof(ip), (void *)addr) != 0 ||
        bpf_probe_read_user(&port, sizeof(port), (void *)(addr + port_at)) != 0) {
        count(COUNTER_READ_FAILED);
        return;
    }
    if (ip.len != 4 && ip.len != 16)
        return;
    u32 words[4] = {};
    if (bpf_probe_read_user(words, ip.len == 4 ? 4 : 16, (void *)ip.ptr) != 0)
        return;
    u16 family = 2;
    if (ip.len == 16) {
        /* Go keeps IPv4 addresses in 16 bytes too (::ffff:a.b.c.d) */
        if (words[0] == 0 && words[1] == 0 && words[2] == 0xffff0000) {
            words[0] = words[3];
            words[2] = 0;
            words[3] = 0;
        } else {
            family = 10;
        }
    }
    __builtin_memcpy(call->peer_addr, words, sizeof(words));
    call->peer_family = family;
    call->peer_port = (u16)port;
}

/* Entry of a probed function (Go: after its stack-growth check, so a stack copy that
 * restarts the function does not enter it twice). */
int span_entry(struct pt_regs *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    struct process_layout *layout = process_layouts.lookup(&tgid);
    if (!layout)
        return 0;
    struct probe_hits *hits = hits_of(tgid);
    if (hits)
        hits->entry += 1;
    struct site *site = site_at(ctx, tgid);
    if (!site || site->role != SITE_ENTRY)
        return 0;
    u64 now = bpf_ktime_get_boot_ns();

    if (!layout->is_go) {
        struct thread_key tkey = {.tgid = tgid, .tid = (u32)pid_tgid};
        struct thread_calls empty = {};
        struct thread_calls *calls = thread_stacks.lookup_or_try_init(&tkey, &empty);
        if (!calls) {
            count(COUNTER_TABLE_FULL);
            return 0;
        }
        u32 depth = calls->depth;
        if (depth >= MAX_THREAD_DEPTH) {
            calls->depth = depth + 1; /* keep LIFO pairing; this level goes untimed */
            count(COUNTER_TABLE_FULL);
            return 0;
        }
        calls->func_id[depth & (MAX_THREAD_DEPTH - 1)] = site->func_id;
        calls->start_ns[depth & (MAX_THREAD_DEPTH - 1)] = now;
        calls->depth = depth + 1;
        return 0;
    }

    struct call_key key = {.tgid = tgid, .func_id = site->func_id};
    if (read_goid(ctx, layout, &key.id) != 0)
        return 0;
    if (site->flags & SITE_FLAG_GRPC_STATUS) {
        /* WriteStatus(t, s *Stream, st *status.Status) (st in RCX), called by handleStream's
         * goroutine: the code of the call in flight there. */
        struct call_start *call = calls_in_flight.lookup(&key);
        if (!call)
            return 0;
        u64 inner = 0;
        s32 code = -1;
        if (bpf_probe_read_user(&inner, sizeof(inner), (void *)(ctx->cx + site->field_a)) == 0 &&
            inner != 0 &&
            bpf_probe_read_user(&code, sizeof(code), (void *)(inner + site->field_b)) == 0)
            call->rpc_status = code;
        else
            count(COUNTER_READ_FAILED);
        return 0;
    }
    if (site->flags & (SITE_FLAG_CLIENT_PEER | SITE_FLAG_CLIENT_HTTP_PEER)) {
        /* The connection of a client call in flight on this goroutine: gRPC's (invoke's
         * call, or for a stream newClientStream's) or net/http's ((*Client).do's). */
        struct call_start *call = calls_in_flight.lookup(&key);
        if (!call && (site->flags & SITE_FLAG_CLIENT_PEER) && site->field_c >= 0) {
            key.func_id = (u32)site->field_c;
            call = calls_in_flight.lookup(&key);
        }
        if (!call)
            return 0;
        u64 addr = 0;
        if (site->flags & SITE_FLAG_CLIENT_PEER) {
            /* (*http2Client).NewStream(t, ...): t in RAX; t.remoteAddr is a net.Addr. */
            if (bpf_probe_read_user(&addr, sizeof(addr), (void *)(ctx->ax + site->field_a + 8)))
                addr = 0;
            peer_from_tcp_addr(addr, site->field_b, call);
            return 0;
        }
        /* (*persistConn).roundTrip(pc, req): pc in RAX. pc.conn is a *net.TCPConn, or with
         * TLS a *tls.Conn around one; a TCPConn's first word is its *netFD. */
        u64 pc = ctx->ax, conn = 0, tls = 0, fd = 0;
        if (bpf_probe_read_user(&conn, sizeof(conn), (void *)(pc + site->field_a + 8)) != 0 ||
            bpf_probe_read_user(&tls, sizeof(tls), (void *)(pc + site->field_b)) != 0 ||
            (tls != 0 &&
             bpf_probe_read_user(&conn, sizeof(conn), (void *)(conn + site->field_d + 8)) != 0) ||
            conn == 0 || bpf_probe_read_user(&fd, sizeof(fd), (void *)conn) != 0 || fd == 0 ||
            bpf_probe_read_user(&addr, sizeof(addr), (void *)(fd + site->field_c + 8)) != 0) {
            count(COUNTER_READ_FAILED);
            return 0;
        }
        peer_from_tcp_addr(addr, TCP_ADDR_PORT, call);
        return 0;
    }
    if (site->flags & SITE_FLAG_CLIENT_GRPC_END) {
        /* A client stream ends: its span is emitted here (its start was newClientStream's
         * entry on this goroutine; a stream finished on another goroutine is not timed). */
        struct call_start *call = calls_in_flight.lookup(&key);
        if (!call)
            return 0; /* a unary call's stream, or one this goroutine did not open */
        emit_client(ctx, tgid, site, key.id, call, layout);
        calls_in_flight.delete(&key);
        return 0;
    }
    struct call_start start = {.start_ns = now, .tid = (u32)pid_tgid, .rpc_status = -1};
    if (site->flags & SITE_FLAG_HTTP) {
        /* serverHandler.ServeHTTP(sh, rw ResponseWriter, req *Request): sh.srv in RAX, the
         * interface rw in RBX (type) and RCX (data: *response), req in RDI. */
        start.request = ctx->di;
        /* HTTP/1 iff rw is a *response whose conn (its first field) serves this server
         * (conn's first field): HTTP/2's writer is another type. */
        u64 conn = 0, server = 0;
        if (bpf_probe_read_user(&conn, sizeof(conn), (void *)ctx->cx) == 0 && conn != 0 &&
            bpf_probe_read_user(&server, sizeof(server), (void *)conn) == 0 &&
            server == ctx->ax) {
            start.flags = CALL_HTTP1;
            if (layout->response_status >= 0)
                start.response = ctx->cx + layout->response_status;
            /* net/http writes a buffered response after ServeHTTP returns, in
             * (*response).finishRequest on the same goroutine: an HTTP/1 span is emitted
             * when that returns, with its flush time, so the join can give it the whole
             * response. */
            if (layout->http_finish)
                start.flags |= CALL_FINISH_EXPECTED;
        } else if (layout->h2_server) {
            return 0; /* an HTTP/2 stream: runHandler's probe makes its span */
        }
    } else if (site->flags & SITE_FLAG_H2) {
        /* runHandler(sc, rw *responseWriter, req *http.Request, handler): rw in RBX, req in
         * RCX. The status is read at the return through rws, which handlerDone detaches from
         * rw (and pools) just before runHandler returns. */
        start.flags = CALL_HTTP2;
        start.request = ctx->cx;
        u64 rws = 0;
        if (site->field_a >= 0 && site->field_b >= 0 &&
            bpf_probe_read_user(&rws, sizeof(rws), (void *)(ctx->bx + site->field_a)) == 0 &&
            rws != 0)
            start.response = rws + site->field_b;
    } else if (site->flags & SITE_FLAG_GRPC) {
        /* handleStream(s, t ServerTransport, stream *Stream, trInfo): t's type and data in
         * RBX and RCX, stream in RDI. */
        start.flags = CALL_GRPC;
        start.request = ctx->di + site->field_a;
    } else if (site->flags & SITE_FLAG_CLIENT_HTTP) {
        /* (*Client).do(c, req *Request): req in RBX, read when do returns (the client
         * does not change the caller's request). */
        start.request = ctx->bx;
    } else if (site->flags & SITE_FLAG_CLIENT_GRPC) {
        /* invoke(ctx context.Context, method string, ...): method in RCX (data), RDI. */
        start.request = ctx->cx;
        start.response = ctx->di;
    } else if (site->flags & SITE_FLAG_CLIENT_GRPC_STREAM) {
        /* newClientStream(ctx, desc *StreamDesc, cc, method string, ...): desc in RCX,
         * method in RSI (data), R8. */
        u8 streams[2] = {};
        if (site->field_a < 0 || site->field_b < 0 ||
            bpf_probe_read_user(&streams[0], 1, (void *)(ctx->cx + site->field_a)) != 0 ||
            bpf_probe_read_user(&streams[1], 1, (void *)(ctx->cx + site->field_b)) != 0)
            return 0;
        if (!streams[0] && !streams[1])
            return 0; /* unary: invoke's span */
        start.request = ctx->si;
        start.response = ctx->r8;
    } else if (site->flags & SITE_FLAG_CLIENT_SQL) {
        /* QueryContext/ExecContext(x, ctx context.Context, query string, args ...any):
         * query in RDI (data), RSI. */
        start.request = ctx->di;
        start.response = ctx->si;
    }
    if (calls_in_flight.update(&key, &start) != 0)
        count(COUNTER_TABLE_FULL);
    return 0;
}

/* A RET instruction of a probed Go function (or of finishRequest, for HTTP spans). */
int span_return(struct pt_regs *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct process_layout *layout = process_layouts.lookup(&tgid);
    if (!layout)
        return 0;
    struct probe_hits *hits = hits_of(tgid);
    if (hits)
        hits->ret += 1;
    struct site *site = site_at(ctx, tgid);
    if (!site || site->role != SITE_RETURN)
        return 0;
    struct call_key key = {.tgid = tgid, .func_id = site->func_id};
    if (read_goid(ctx, layout, &key.id) != 0)
        return 0;
    struct call_start *start = calls_in_flight.lookup(&key);
    if (!start) {
        /* finishRequest of a request not timed, or ServeHTTP of an HTTP/2 stream (its span
         * is runHandler's): expected, not a lost entry. */
        if (!(site->flags & SITE_FLAG_HTTP_FINISH) &&
            !((site->flags & SITE_FLAG_HTTP) && layout->h2_server))
            count(COUNTER_NO_ENTRY);
        return 0;
    }
    if (site->flags & SITE_FLAG_CLIENT) {
        emit_client(ctx, tgid, site, key.id, start, layout);
        calls_in_flight.delete(&key);
        return 0;
    }
    if (site->flags & SITE_FLAG_HTTP_FINISH) {
        if (!(start->flags & CALL_HANDLER_RETURNED))
            return 0; /* finishRequest of a request whose ServeHTTP we did not see end */
    } else if ((site->flags & SITE_FLAG_HTTP) && (start->flags & CALL_FINISH_EXPECTED)) {
        start->handler_end_ns = bpf_ktime_get_boot_ns();
        start->flags |= CALL_HANDLER_RETURNED;
        return 0; /* emitted when finishRequest has written the response */
    }
    if (site->flags & (SITE_FLAG_HTTP | SITE_FLAG_H2 | SITE_FLAG_GRPC))
        emit_http(ctx, tgid, site, key.id, start, layout);
    else
        emit_span(ctx, tgid, site->func_id, key.id, start->start_ns, start->tid);
    calls_in_flight.delete(&key);
    return 0;
}

/* Return of a probed non-Go function (uretprobe: safe outside Go). */
int span_uretprobe(struct pt_regs *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if (process_layouts.lookup(&tgid)) {
        struct probe_hits *hits = hits_of(tgid);
        if (hits)
            hits->uretprobe += 1;
    }
    struct thread_key tkey = {.tgid = tgid, .tid = (u32)pid_tgid};
    struct thread_calls *calls = thread_stacks.lookup(&tkey);
    if (!calls || calls->depth == 0) {
        count(COUNTER_NO_ENTRY);
        return 0;
    }
    u32 depth = calls->depth - 1;
    calls->depth = depth;
    if (depth >= MAX_THREAD_DEPTH)
        return 0;
    u32 func_id = calls->func_id[depth & (MAX_THREAD_DEPTH - 1)];
    u64 start_ns = calls->start_ns[depth & (MAX_THREAD_DEPTH - 1)];
    if (depth == 0)
        thread_stacks.delete(&tkey);
    emit_span(ctx, tgid, func_id, -1, start_ns, (u32)pid_tgid);
    return 0;
}

/* Attached by the agent's trap calibration (producer/trap_calibration.py) to a helper
 * process: an empty program, so a hit costs the trap and nothing else measurable. */
int trap_calibration(struct pt_regs *ctx)
{
    return 0;
}

#ifdef SYNTHETIC_SOURCE
/* Benchmark load: each getppid() of the process in synthetic_pid emits SYNTHETIC_BURST
 * ordinary span records, through the same emit path as real probes. */
BPF_ARRAY(synthetic_pid, u32, 1);

TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    u32 zero = 0;
    u32 *want = synthetic_pid.lookup(&zero);
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if (!want || *want != tgid)
        return 0;
    u64 now = bpf_ktime_get_boot_ns();
    for (int i = 0; i < SYNTHETIC_BURST; i++)
        emit_span((struct pt_regs *)args, tgid, i & 7, i, now - 1000, (u32)pid_tgid);
    return 0;
}
#endif
