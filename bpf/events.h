/* Event records that leave the kernel through the ring buffers.
 *
 * Declared once, here: the BPF programs include this header and the agent's decoder
 * (producer/event_layout.py) mirrors it; tests/test_kernel_layout.py compiles this header
 * and fails if the two disagree. Every record starts with the same header so a reader can
 * check kind and size before it trusts the rest.
 */
#ifndef EBPF_APM_EVENTS_H
#define EBPF_APM_EVENTS_H

#define EVENT_KIND_SPAN 1
#define EVENT_KIND_HTTP_SPAN 2
#define EVENT_KIND_NET 3

/* http_span_event.protocol: which server made the span */
#define PROTO_HTTP 0         /* net/http's serverHandler, protocol not told (no HTTP/2 probe) */
#define PROTO_HTTP1 1
#define PROTO_HTTP2 2        /* net/http's bundled h2 server or golang.org/x/net/http2 */
#define PROTO_GRPC 3         /* google.golang.org/grpc: path is the full method, status the code */
#define STATUS_UNKNOWN 0xffff

#define NET_SEND 0
#define NET_RECV 1

#ifndef HTTP_METHOD_MAX
#define HTTP_METHOD_MAX 8
#endif
#ifndef HTTP_PATH_MAX
#define HTTP_PATH_MAX 128
#endif

struct event_header {
    __u16 kind;          /* EVENT_KIND_* */
    __u16 size;          /* sizeof the whole record */
    __u32 pid;           /* process (tgid) */
    __u64 ts_ns;         /* CLOCK_BOOTTIME when the record was written */
};

/* One finished call of a probed function; hdr.ts_ns is the return time. */
struct span_event {
    struct event_header hdr;
    __u64 start_ns;      /* CLOCK_BOOTTIME at entry */
    __s64 goid;          /* goroutine id, -1 outside Go */
    __u32 tid;           /* thread at entry */
    __u32 end_tid;       /* thread at return (differs when a goroutine migrated) */
    __u32 func_id;       /* index the agent assigned to the probed symbol */
    __u32 _pad;
};

/* One request a Go server served: HTTP/1 or HTTP/2 (net/http, x/net/http2) or a gRPC call
 * (then method is empty, path the full method /package.Service/Method, status the code). */
struct http_span_event {
    struct span_event span;
    __u16 status;        /* 0 when the handler wrote nothing: net/http then sends 200;
                          * STATUS_UNKNOWN when it could not be read */
    __u16 path_len;      /* length of URL.Path before truncation to HTTP_PATH_MAX */
    __u8 method_len;
    __u8 protocol;       /* PROTO_* */
    __u8 _pad[2];
    char method[HTTP_METHOD_MAX];
    char path[HTTP_PATH_MAX];
    __u64 flushed_ns;    /* HTTP/1: when net/http had written the response (after the span's
                          * end); 0 when unknown */
};

/* One socket send or receive of a traced process; hdr.ts_ns is when it completed. */
struct net_event {
    struct event_header hdr;
    __s64 goid;          /* goroutine that made the call, -1 outside Go */
    __s64 bytes;         /* bytes actually sent or received (the call's result) */
    __u32 tid;
    __u8 direction;      /* NET_SEND or NET_RECV */
    __u8 family;         /* AF_INET 2, AF_INET6 10 */
    __u16 sport;         /* local port, host order */
    __u16 dport;         /* remote port, host order */
    __u16 _pad[3];
    __u8 saddr[16];      /* local address; IPv4 in the first 4 bytes */
    __u8 daddr[16];      /* remote address */
};

#endif
