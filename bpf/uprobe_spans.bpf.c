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
 * The tree: every span gets its trace id, its own span id and its parent's here, at the
 * entry, so a replayed record keeps them. A server span starts a trace; any other Go span
 * continues the context current on its goroutine (`goroutine_contexts`), else starts one,
 * and is current until it returns (then its parent is again). runtime.newproc1's probes
 * copy the creating goroutine's context to every goroutine it creates. Non-Go spans are
 * roots of their own.
 *
 * Compiled together with net_events.bpf.c into one BPF object (producer/bpf_loader.py).
 * The maps' key and value structs and the counter and site constants are in probe_maps.h,
 * which the agent mirrors (producer/map_layout.py) and a compiled test checks.
 * Options come in as -D defines from producer/bpf_loader.py:
 *   SPAN_RING_PAGES, HTTP_RING_PAGES, CLIENT_RING_PAGES
 *                                     ring buffer sizes in pages (powers of two)
 *   WAKEUP_EVERY                      records per CPU between forced wakeups of the reader
 *   MAX_CALLS_IN_FLIGHT               in-flight calls tracked at once, all processes
 *   MAX_GOROUTINE_CONTEXTS            goroutines whose trace context is kept (LRU)
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
#ifndef MAX_GOROUTINE_CONTEXTS
#define MAX_GOROUTINE_CONTEXTS 65536
#endif
#define MAX_PROBE_SITES 16384
#define MAX_PROCESSES 4096

BPF_HASH(probe_sites, struct site_key, struct site, MAX_PROBE_SITES);
BPF_HASH(process_layouts, u32, struct process_layout, MAX_PROCESSES);
BPF_HASH(calls_in_flight, struct call_key, struct call_start, MAX_CALLS_IN_FLIGHT);
BPF_HASH(thread_stacks, struct thread_key, struct thread_calls, MAX_CALLS_IN_FLIGHT);
BPF_TABLE("lru_hash", struct goroutine_key, struct trace_context, goroutine_contexts,
          MAX_GOROUTINE_CONTEXTS);
BPF_TABLE("lru_hash", struct thread_key, struct trace_context, spawning, MAX_PROCESSES);
BPF_PERCPU_ARRAY(counters, u64, COUNTER_SLOTS);
BPF_PERCPU_ARRAY(call_scratch, struct call_start, 1);
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

static __always_inline u64 random_id(void)
{
    u64 id = ((u64)bpf_get_prandom_u32() << 32) | bpf_get_prandom_u32();
    return id ? id : 1;
}

/* A new trace, with `c` its root span. */
static __always_inline void new_trace(struct trace_context *c)
{
    u64 half = random_id();
    __builtin_memcpy(c->trace_id, &half, 8);
    half = random_id();
    __builtin_memcpy(c->trace_id + 8, &half, 8);
    c->span_id = random_id();
}

/* W3C traceparent: "vv-<trace id: 32 hex>-<parent id: 16 hex>-<flags: 2 hex>", lowercase. */
#define TRACEPARENT_LEN 55

static __always_inline int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* The trace and parent of a traceparent value into `start`; 0 if it is valid. */
static __always_inline int parse_traceparent(const char *tp, struct call_start *start)
{
    if (tp[2] != '-' || tp[35] != '-' || tp[52] != '-' || hex_digit(tp[0]) < 0 ||
        hex_digit(tp[1]) < 0 || (tp[0] == 'f' && tp[1] == 'f'))
        return -1;
    u8 trace[16] = {};
    u8 any = 0;
    for (int j = 0; j < 16; j++) {
        int hi = hex_digit(tp[3 + 2 * j]), lo = hex_digit(tp[4 + 2 * j]);
        if (hi < 0 || lo < 0)
            return -1;
        trace[j] = (u8)((hi << 4) | lo);
        any |= trace[j];
    }
    u64 parent = 0;
    for (int j = 0; j < 16; j++) {
        int d = hex_digit(tp[36 + j]);
        if (d < 0)
            return -1;
        parent = (parent << 4) | (u64)d;
    }
    if (!any || !parent)
        return -1; /* all-zero ids are invalid */
    __builtin_memcpy(start->context.trace_id, trace, 16);
    start->parent_span_id = parent;
    return 0;
}

/* An incoming traceparent header of a request, read from its Header map (the map pointer at
 * `header`, -1 offsets unknown) while the map is a single bucket or group; 0 if found and
 * valid. */
static __always_inline int read_traceparent(struct process_layout *layout, u64 request,
                                            s32 header_at, struct call_start *start)
{
    u64 map = 0, group = 0;
    u32 key_stride = 16, elems_at = 8 + 8 * 16, elem_stride = 24; /* HEADER_MAP_BUCKETS */
    if (layout->header_map == HEADER_MAP_NONE || header_at < 0 ||
        bpf_probe_read_user(&map, sizeof(map), (void *)(request + header_at)) != 0 || map == 0)
        return -1;
    if (layout->header_map == HEADER_MAP_BUCKETS) {
        u8 log2_buckets = 1;
        if (bpf_probe_read_user(&log2_buckets, 1, (void *)(map + 9)) != 0 || log2_buckets != 0)
            return -1;
    } else {
        s64 dir_len = 1;
        if (bpf_probe_read_user(&dir_len, sizeof(dir_len), (void *)(map + 24)) != 0 ||
            dir_len != 0)
            return -1;
        key_stride = 40;
        elems_at = 8 + 16;
        elem_stride = 40;
    }
    u8 ctrl[8] = {};
    if (bpf_probe_read_user(&group, sizeof(group), (void *)(map + 16)) != 0 || group == 0 ||
        bpf_probe_read_user(ctrl, sizeof(ctrl), (void *)group) != 0)
        return -1;
    const char name[] = "Traceparent";
    for (int i = 0; i < 8; i++) {
        /* A used slot: tophash >= minTopHash (5); a swiss control byte with the top bit clear. */
        if (layout->header_map == HEADER_MAP_BUCKETS ? ctrl[i] < 5 : ctrl[i] >= 0x80)
            continue;
        struct {
            u64 ptr;
            s64 len;
        } key = {};
        if (bpf_probe_read_user(&key, sizeof(key), (void *)(group + 8 + i * key_stride)) != 0 ||
            key.len != sizeof(name) - 1)
            continue;
        char got[sizeof(name)] = {};
        if (bpf_probe_read_user(got, sizeof(name) - 1, (void *)key.ptr) != 0)
            continue;
        int same = 1;
        for (int j = 0; j < sizeof(name) - 1; j++)
            same &= got[j] == name[j];
        if (!same)
            continue;
        u64 values[2] = {}; /* []string: pointer, length (the first value counts) */
        struct {
            u64 ptr;
            s64 len;
        } value = {};
        char tp[TRACEPARENT_LEN] = {};
        if (bpf_probe_read_user(values, sizeof(values),
                                (void *)(group + elems_at + i * elem_stride)) != 0 ||
            values[1] < 1 ||
            bpf_probe_read_user(&value, sizeof(value), (void *)values[0]) != 0 ||
            value.len < TRACEPARENT_LEN ||
            bpf_probe_read_user(tp, sizeof(tp), (void *)value.ptr) != 0)
            return -1;
        return parse_traceparent(tp, start);
    }
    return -1;
}

/* The ids of a Go span entering on goroutine `goid`: the goroutine's current context is its
 * parent, unless `root` (a server span) or there is none. A server span whose request
 * carried a traceparent (CALL_REMOTE_PARENT) has its trace and parent already. */
static __always_inline void take_context(struct call_start *start, u32 tgid, s64 goid, int root)
{
    if (start->flags & CALL_REMOTE_PARENT) {
        start->context.span_id = random_id();
        return;
    }
    struct goroutine_key gkey = {.tgid = tgid, .goid = goid};
    struct trace_context *current = root ? 0 : goroutine_contexts.lookup(&gkey);
    if (current) {
        __builtin_memcpy(start->context.trace_id, current->trace_id, 16);
        start->parent_span_id = current->span_id;
        start->context.span_id = random_id();
        start->flags |= CALL_HAD_CONTEXT;
    } else {
        new_trace(&start->context);
        start->parent_span_id = 0;
    }
}

static __always_inline void make_current(struct trace_context *context, u32 tgid, s64 goid)
{
    struct goroutine_key gkey = {.tgid = tgid, .goid = goid};
    goroutine_contexts.update(&gkey, context);
}

/* The span ended: its parent is current again (none for a root span). */
static __always_inline void end_context(struct call_start *start, u32 tgid, s64 goid)
{
    struct goroutine_key gkey = {.tgid = tgid, .goid = goid};
    if (start->flags & CALL_HAD_CONTEXT) {
        struct trace_context back = {.span_id = start->parent_span_id};
        __builtin_memcpy(back.trace_id, start->context.trace_id, 16);
        goroutine_contexts.update(&gkey, &back);
    } else {
        goroutine_contexts.delete(&gkey);
    }
}

static __always_inline void fill_span(struct span_event *e, u16 kind, u16 size, u32 tgid,
                                      u32 func_id, s64 goid, u64 start_ns, u32 tid,
                                      struct trace_context *context, u64 parent_span_id)
{
    __builtin_memcpy(e->trace_id, context->trace_id, 16);
    e->span_id = context->span_id;
    e->parent_span_id = parent_span_id;
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
                                      u64 start_ns, u32 tid, struct trace_context *context,
                                      u64 parent_span_id)
{
#ifdef USE_PERF_BUFFER
    struct span_event e = {};
    fill_span(&e, EVENT_KIND_SPAN, sizeof(e), tgid, func_id, goid, start_ns, tid, context,
              parent_span_id);
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
    fill_span(e, EVENT_KIND_SPAN, sizeof(*e), tgid, func_id, goid, start_ns, tid, context,
              parent_span_id);
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

/* Copy the request's method and path into the call's start (at the entry, while they are
 * this request's): `method_at` and `url_at` are offsets in the request struct, -1 unknown. */
static __always_inline void read_request(struct call_start *start, struct process_layout *layout,
                                         u64 request, s32 method_at, s32 url_at)
{
    if (method_at >= 0) {
        u32 n = read_go_string(request + method_at, start->method, HTTP_METHOD_MAX);
        start->method_len = n > 255 ? 255 : n;
    }
    u64 url = 0;
    if (url_at >= 0 &&
        bpf_probe_read_user(&url, sizeof(url), (void *)(request + url_at)) == 0 &&
        url != 0 && layout->url_path >= 0) {
        u32 n = read_go_string(url + layout->url_path, start->path, HTTP_PATH_MAX);
        start->path_len = n > 65535 ? 65535 : n;
    }
}

static __always_inline void fill_http(struct http_span_event *e, struct call_start *start)
{
    e->status = STATUS_UNKNOWN;
    e->path_len = start->path_len;
    e->method_len = start->method_len;
    e->protocol = PROTO_HTTP;
    __builtin_memset(e->_pad, 0, sizeof(e->_pad));
    __builtin_memcpy(e->method, start->method, sizeof(e->method));
    __builtin_memcpy(e->path, start->path, sizeof(e->path));
    e->flushed_ns = 0;
    if (start->flags & CALL_GRPC) {
        e->protocol = PROTO_GRPC;
        if (start->rpc_status >= 0 && start->rpc_status < STATUS_UNKNOWN)
            e->status = (u16)start->rpc_status;
        return;
    }
    if (start->flags & CALL_HTTP1)
        e->protocol = PROTO_HTTP1;
    else if (start->flags & CALL_HTTP2)
        e->protocol = PROTO_HTTP2;
    if (start->flags & CALL_HANDLER_RETURNED) {
        e->flushed_ns = e->span.hdr.ts_ns;          /* now: finishRequest has returned */
        e->span.hdr.ts_ns = start->handler_end_ns;  /* the span ends where ServeHTTP did */
    }
    if ((start->flags & CALL_HTTP2) && start->rpc_status >= 0) {
        e->status = (u16)start->rpc_status; /* seen at handlerDone */
        return;
    }
    if (start->response != 0) {
        s64 status = 0;
        if (bpf_probe_read_user(&status, sizeof(status), (void *)start->response) != 0) {
            count(COUNTER_READ_FAILED);
            return;
        }
        if (start->flags & CALL_HTTP2) {
            /* rws is pooled once the handler is done: keep the status only if rws still
             * serves this stream now that it has been read (stream is rws's first field). */
            u64 stream = 0;
            if (bpf_probe_read_user(&stream, sizeof(stream), (void *)start->request) != 0 ||
                stream != start->stream) {
                count(COUNTER_READ_FAILED);
                return;
            }
        }
        e->status = (u16)status;
    }
}

static __always_inline void emit_http(struct pt_regs *ctx, u32 tgid, struct site *site, s64 goid,
                                      struct call_start *start)
{
#ifdef USE_PERF_BUFFER
    u32 zero = 0;
    struct http_span_event *e = http_scratch.lookup(&zero);
    if (!e)
        return;
    fill_span(&e->span, EVENT_KIND_HTTP_SPAN, sizeof(*e), tgid, site->func_id, goid,
              start->start_ns, start->tid, &start->context, start->parent_span_id);
    fill_http(e, start);
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
              start->start_ns, start->tid, &start->context, start->parent_span_id);
    fill_http(e, start);
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
              start->start_ns, start->tid, &start->context, start->parent_span_id);
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
              start->start_ns, start->tid, &start->context, start->parent_span_id);
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

    if (site->flags & SITE_FLAG_SPAWN) {
        /* newproc1(fn, callergp *g, ...) runs on the system stack (R14 is g0): the creating
         * goroutine is callergp, in RBX. Only goroutines in a trace are followed. */
        struct goroutine_key parent = {.tgid = tgid};
        if (bpf_probe_read_user(&parent.goid, sizeof(parent.goid),
                                (void *)(ctx->bx + layout->goid)) != 0) {
            count(COUNTER_READ_FAILED);
            return 0;
        }
        struct trace_context *current = goroutine_contexts.lookup(&parent);
        if (current) {
            struct thread_key tkey = {.tgid = tgid, .tid = (u32)pid_tgid};
            spawning.update(&tkey, current);
        }
        return 0;
    }
    struct call_key key = {.tgid = tgid, .func_id = site->func_id};
    if (read_goid(ctx, layout, &key.id) != 0)
        return 0;
    if (site->flags & SITE_FLAG_H2_DONE) {
        /* handlerDone(w *responseWriter) (w in RAX): the stream's status, before its rws
         * goes back to the pool. */
        struct call_start *call = calls_in_flight.lookup(&key);
        if (!call)
            return 0;
        u64 rws = 0;
        s64 status = 0;
        if (bpf_probe_read_user(&rws, sizeof(rws), (void *)(ctx->ax + site->field_a)) == 0 &&
            rws != 0 &&
            bpf_probe_read_user(&status, sizeof(status), (void *)(rws + site->field_b)) == 0)
            call->rpc_status = (s32)status;
        else
            count(COUNTER_READ_FAILED);
        return 0;
    }
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
        end_context(call, tgid, key.id);
        calls_in_flight.delete(&key);
        return 0;
    }
    /* The call's start is built in a per-CPU scratch value: with the request's fields it is
     * too big for the BPF stack next to the traceparent reader's buffers. */
    u32 zero = 0;
    struct call_start *start = call_scratch.lookup(&zero);
    if (!start)
        return 0;
    __builtin_memset(start, 0, sizeof(*start));
    start->start_ns = now;
    start->tid = (u32)pid_tgid;
    start->rpc_status = -1;
    if (site->flags & SITE_FLAG_HTTP) {
        /* serverHandler.ServeHTTP(sh, rw ResponseWriter, req *Request): sh.srv in RAX, the
         * interface rw in RBX (type) and RCX (data: *response), req in RDI. */
        start->request = ctx->di;
        /* HTTP/1 iff rw is a *response whose conn (its first field) serves this server
         * (conn's first field): HTTP/2's writer is another type. */
        u64 conn = 0, server = 0;
        if (bpf_probe_read_user(&conn, sizeof(conn), (void *)ctx->cx) == 0 && conn != 0 &&
            bpf_probe_read_user(&server, sizeof(server), (void *)conn) == 0 &&
            server == ctx->ax) {
            start->flags = CALL_HTTP1;
            if (layout->response_status >= 0)
                start->response = ctx->cx + layout->response_status;
            /* net/http writes a buffered response after ServeHTTP returns, in
             * (*response).finishRequest on the same goroutine: an HTTP/1 span is emitted
             * when that returns, with its flush time, so the join can give it the whole
             * response. */
            if (layout->http_finish)
                start->flags |= CALL_FINISH_EXPECTED;
        } else if (layout->h2_server) {
            return 0; /* an HTTP/2 stream: runHandler's probe makes its span */
        }
        read_request(start, layout, ctx->di, layout->request_method, layout->request_url);
        if ((start->flags & CALL_HTTP1) &&
            read_traceparent(layout, ctx->di, layout->request_header, start) == 0)
            start->flags |= CALL_REMOTE_PARENT;
    } else if (site->flags & SITE_FLAG_H2) {
        /* runHandler(sc, rw *responseWriter, req *http.Request, handler): rw in RBX, req in
         * RCX. The request's fields are copied now (Go 1.27's request lives in the pooled
         * rws); the status is read at the return through rws, which handlerDone detaches
         * from rw (and pools) just before runHandler returns. */
        start->flags = CALL_HTTP2;
        read_request(start, layout, ctx->cx, site->field_c, site->field_d);
        if (read_traceparent(layout, ctx->cx, site->field_e, start) == 0)
            start->flags |= CALL_REMOTE_PARENT;
        u64 rws = 0;
        if (site->field_a >= 0 && site->field_b >= 0 &&
            bpf_probe_read_user(&rws, sizeof(rws), (void *)(ctx->bx + site->field_a)) == 0 &&
            rws != 0 &&
            bpf_probe_read_user(&start->stream, sizeof(start->stream), (void *)rws) == 0) {
            start->request = rws;
            start->response = rws + site->field_b;
        }
    } else if (site->flags & SITE_FLAG_GRPC) {
        /* handleStream(s, t ServerTransport, stream *Stream, trInfo): t's type and data in
         * RBX and RCX, stream in RDI. */
        start->flags = CALL_GRPC;
        start->request = ctx->di + site->field_a;
        u32 n = read_go_string(start->request, start->path, HTTP_PATH_MAX);
        start->path_len = n > 65535 ? 65535 : n;
    } else if (site->flags & SITE_FLAG_CLIENT_HTTP) {
        /* (*Client).do(c, req *Request): req in RBX, read when do returns (the client
         * does not change the caller's request). */
        start->request = ctx->bx;
    } else if (site->flags & SITE_FLAG_CLIENT_GRPC) {
        /* invoke(ctx context.Context, method string, ...): method in RCX (data), RDI. */
        start->request = ctx->cx;
        start->response = ctx->di;
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
        start->request = ctx->si;
        start->response = ctx->r8;
    } else if (site->flags & SITE_FLAG_CLIENT_SQL) {
        /* QueryContext/ExecContext(x, ctx context.Context, query string, args ...any):
         * query in RDI (data), RSI. */
        start->request = ctx->di;
        start->response = ctx->si;
    }
    take_context(start, tgid, key.id, site->flags & (SITE_FLAG_HTTP | SITE_FLAG_H2 | SITE_FLAG_GRPC));
    if (calls_in_flight.update(&key, start) != 0) {
        count(COUNTER_TABLE_FULL);
        return 0;
    }
    make_current(&start->context, tgid, key.id);
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
    if (site->flags & SITE_FLAG_SPAWN) {
        /* newproc1 returns the new g in RAX: it continues its creator's context. */
        struct thread_key tkey = {.tgid = tgid, .tid = (u32)bpf_get_current_pid_tgid()};
        struct trace_context *context;
        if (site->field_a >= 0) {
            /* Return-only (offsets known): R14 is g0 on the system stack, and its m's curg
             * is the goroutine whose `go` statement this is. */
            u64 m = 0, curg = 0;
            struct goroutine_key parent = {.tgid = tgid};
            if (bpf_probe_read_user(&m, sizeof(m), (void *)(ctx->r14 + site->field_a)) != 0 ||
                (m != 0 &&
                 bpf_probe_read_user(&curg, sizeof(curg), (void *)(m + site->field_b)) != 0)) {
                count(COUNTER_READ_FAILED);
                return 0;
            }
            /* No user goroutine on this M: the runtime itself makes one (a timer's
             * time.AfterFunc callback runs on g0, say). Nothing to inherit. */
            if (curg == 0)
                return 0;
            if (bpf_probe_read_user(&parent.goid, sizeof(parent.goid),
                                    (void *)(curg + layout->goid)) != 0) {
                count(COUNTER_READ_FAILED);
                return 0;
            }
            context = goroutine_contexts.lookup(&parent);
        } else {
            context = spawning.lookup(&tkey); /* noted at the entry */
        }
        if (!context)
            return 0;
        struct trace_context copy = *context;
        struct goroutine_key child = {.tgid = tgid};
        if (bpf_probe_read_user(&child.goid, sizeof(child.goid),
                                (void *)(ctx->ax + layout->goid)) == 0)
            goroutine_contexts.update(&child, &copy);
        else
            count(COUNTER_READ_FAILED);
        if (site->field_a < 0)
            spawning.delete(&tkey);
        return 0;
    }
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
        end_context(start, tgid, key.id);
        calls_in_flight.delete(&key);
        return 0;
    }
    if (site->flags & SITE_FLAG_HTTP_FINISH) {
        if (!(start->flags & CALL_HANDLER_RETURNED))
            return 0; /* finishRequest of a request whose ServeHTTP we did not see end */
    } else if ((site->flags & SITE_FLAG_HTTP) && (start->flags & CALL_FINISH_EXPECTED)) {
        start->handler_end_ns = bpf_ktime_get_boot_ns();
        start->flags |= CALL_HANDLER_RETURNED;
        end_context(start, tgid, key.id); /* the span ends here */
        return 0; /* emitted when finishRequest has written the response */
    }
    if (site->flags & (SITE_FLAG_HTTP | SITE_FLAG_H2 | SITE_FLAG_GRPC))
        emit_http(ctx, tgid, site, key.id, start);
    else
        emit_span(ctx, tgid, site->func_id, key.id, start->start_ns, start->tid, &start->context,
                  start->parent_span_id);
    if (!(start->flags & CALL_HANDLER_RETURNED))
        end_context(start, tgid, key.id);
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
    struct trace_context root = {};
    new_trace(&root);
    emit_span(ctx, tgid, func_id, -1, start_ns, (u32)pid_tgid, &root, 0);
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
    struct trace_context root = {};
    new_trace(&root);
    for (int i = 0; i < SYNTHETIC_BURST; i++)
        emit_span((struct pt_regs *)args, tgid, i & 7, i, now - 1000, (u32)pid_tgid, &root, 0);
    return 0;
}
#endif
