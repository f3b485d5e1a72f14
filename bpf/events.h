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
#define EVENT_KIND_CLIENT_SPAN 4

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

/* client_span_event.client: which kind of outgoing call */
#define CLIENT_HTTP 1        /* net/http.(*Client).do */
#define CLIENT_GRPC 2        /* google.golang.org/grpc.invoke (unary) */
#define CLIENT_SQL 3         /* database/sql Query/Exec(Context) of DB, Tx, Conn */
/* client_span_event.db_system: the SQL driver linked into the binary */
#define DB_SYSTEM_UNKNOWN 0
#define DB_SYSTEM_POSTGRESQL 1
#define DB_SYSTEM_MYSQL 2
#define DB_SYSTEM_SQLITE 3
#define DB_SYSTEM_MSSQL 4
#define CLIENT_HOST_MAX 64
#define CLIENT_TEXT_MAX 256

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
    /* The span's place in its trace, fixed at the entry (a replayed record keeps them). */
    __u8 trace_id[16];   /* W3C trace id, in byte order */
    __u64 span_id;       /* random, never 0 */
    __u64 parent_span_id; /* the span current on the goroutine (or a remote parent), 0 none */
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

/* One outgoing call a Go program made: an HTTP request (net/http client), a unary gRPC call
 * or a database/sql statement. hdr.ts_ns is when the call returned to its caller. */
struct client_span_event {
    struct span_event span;
    __s32 status;        /* HTTP status or gRPC code; -1 when there is none (error, SQL) */
    __u32 text_len;      /* length of the text before truncation to CLIENT_TEXT_MAX */
    __u16 host_len;      /* length of the host before truncation to CLIENT_HOST_MAX */
    __u8 client;         /* CLIENT_* */
    __u8 error;          /* 1: the call returned a non-nil error (HTTP: a transport error) */
    __u8 method_len;
    __u8 db_system;      /* DB_SYSTEM_* (SQL) */
    __u8 _pad[2];
    __u16 peer_family;   /* gRPC: 2 IPv4, 10 IPv6, 0 unknown (then the join's is used) */
    __u16 peer_port;
    __u8 _pad3[4];
    __u8 peer_addr[16];  /* gRPC: the connection's remote address (IPv4 in the first 4) */
    char method[HTTP_METHOD_MAX];  /* HTTP method */
    char host[CLIENT_HOST_MAX];    /* HTTP: the request URL's host, as requested */
    char text[CLIENT_TEXT_MAX];    /* HTTP: URL path (no query); gRPC: full method;
                                    * SQL: the statement as the program passed it (the
                                    * agent sanitizes it before it leaves the node) */
};

#endif
