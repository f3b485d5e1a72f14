"""The HTTP/2 and gRPC servers a Go binary links, and the field offsets their probes read.

net/http's HTTP/1 server is probed at serverHandler.ServeHTTP (producer/targets.py). HTTP/2
streams and gRPC calls have servers of their own, each running one goroutine per stream:

* ``(*serverConn).runHandler(rw, req, handler)`` of net/http's bundled h2 server (named
  ``net/http.(*http2serverConn)`` up to Go 1.26, ``net/http/internal/http2.(*serverConn)``
  from Go 1.27, where the request is a ``ServerRequest``) and of ``golang.org/x/net/http2``:
  one span per stream: method and path copied at the entry (Go 1.27's request lives in the
  pooled ``rws``, reused by the next stream before runHandler returns), the status read at
  the entry of ``(*responseWriter).handlerDone`` (before rws goes back to the pool); where
  that is not linked, through ``rw.rws`` at the return, kept only if ``rws.stream`` is still
  the entry's.
* ``google.golang.org/grpc.(*Server).handleStream(t, stream, trInfo)``: one span per call,
  the full method from ``stream.method``; the entry of ``(*http2Server).WriteStatus(stream,
  st)`` on the same goroutine gives the call's status code (``st.s.Code``).

Offsets come from DWARF when the binary has it. Stripped binaries use the tables below,
measured from DWARF of tests/targets/grpcserver built by Go 1.19 and 1.27 against Debian
bookworm's library sources (golang.org/x/net 0.7.0, google.golang.org/grpc 1.33.3, genproto
2020-04); tests/test_server_spans.py keeps tables and DWARF in step. A library release with
another layout needs DWARF (or a new table row).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ebpf_apm.producer.elf_symbols import SymbolTable
from ebpf_apm.producer.go_binary import GoLayout, go_minor
from ebpf_apm.producer.map_layout import (
    HEADER_MAP_BUCKETS,
    HEADER_MAP_NONE,
    HEADER_MAP_SWISS,
    SITE_FLAG_GRPC,
    SITE_FLAG_GRPC_STATUS,
    SITE_FLAG_H2,
    SITE_FLAG_H2_DONE,
)
from ebpf_apm.producer.member_offsets import Member, member_offsets, offsets_missing

__all__ = [
    "GRPC_SPAN_SYMBOL",
    "H2_SERVERS",
    "ServerProbe",
    "creator_offsets",
    "server_probes",
    "traceparent_fields",
]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class H2Server:
    symbol: str  # its runHandler
    writer: str  # responseWriter struct (field rws)
    state: str  # responseWriterState struct (field status)
    request: str  # the request struct runHandler receives (fields Method, URL)
    done: str  # (*responseWriter).handlerDone: the status, before rws is pooled


H2_SERVERS = (
    H2Server(
        "net/http.(*http2serverConn).runHandler",
        "net/http.http2responseWriter",
        "net/http.http2responseWriterState",
        "net/http.Request",
        "net/http.(*http2responseWriter).handlerDone",
    ),
    H2Server(
        "net/http/internal/http2.(*serverConn).runHandler",
        "net/http/internal/http2.responseWriter",
        "net/http/internal/http2.responseWriterState",
        "net/http/internal/http2.ServerRequest",
        "net/http/internal/http2.(*responseWriter).handlerDone",
    ),
    H2Server(
        "golang.org/x/net/http2.(*serverConn).runHandler",
        "golang.org/x/net/http2.responseWriter",
        "golang.org/x/net/http2.responseWriterState",
        "net/http.Request",
        "golang.org/x/net/http2.(*responseWriter).handlerDone",
    ),
)
GRPC_SPAN_SYMBOL = "google.golang.org/grpc.(*Server).handleStream"
GRPC_STATUS_SYMBOL = "google.golang.org/grpc/internal/transport.(*http2Server).WriteStatus"
GRPC_STREAM = "google.golang.org/grpc/internal/transport.Stream"
GRPC_STATUS = "google.golang.org/grpc/internal/status.Status"
RPC_STATUS = "google.golang.org/genproto/googleapis/rpc/status.Status"

#: Standard library offsets by Go "major.minor" (stripped binaries; nearest lower release).
GO_TABLE: dict[str, dict[Member, int]] = {
    "1.19": {
        ("net/http.Request", "Method"): 0,
        ("net/http.Request", "URL"): 16,
        ("net/http.Request", "Header"): 56,
        ("net/http.http2responseWriter", "rws"): 0,
        ("net/http.http2responseWriterState", "status"): 80,
        ("net/http.http2responseWriterState", "stream"): 0,
    },
    "1.27": {
        ("net/http.Request", "Method"): 0,
        ("net/http.Request", "URL"): 16,
        ("net/http.Request", "Header"): 56,
        ("net/http/internal/http2.responseWriter", "rws"): 0,
        ("net/http/internal/http2.responseWriterState", "status"): 240,
        ("net/http/internal/http2.responseWriterState", "stream"): 0,
        ("net/http/internal/http2.ServerRequest", "Method"): 48,
        ("net/http/internal/http2.ServerRequest", "URL"): 64,
        ("net/http/internal/http2.ServerRequest", "Header"): 72,
    },
}
#: Library offsets (the same with every Go release; measured for the versions named above).
LIBRARY_TABLE: dict[Member, int] = {
    ("golang.org/x/net/http2.responseWriter", "rws"): 0,
    ("golang.org/x/net/http2.responseWriterState", "status"): 72,
    ("golang.org/x/net/http2.responseWriterState", "stream"): 0,
    (GRPC_STREAM, "method"): 72,
    (GRPC_STATUS, "s"): 0,
    (RPC_STATUS, "Code"): 0,
}


@dataclass(frozen=True)
class ServerProbe:
    """One server function to probe: the sites carry ``span_symbol``'s function id."""

    symbol: str
    span_symbol: str
    flags: int  # SITE_FLAG_H2, SITE_FLAG_H2_DONE, SITE_FLAG_GRPC or SITE_FLAG_GRPC_STATUS
    fields: tuple[int, int, int, int, int]  # field_a..field_e of the sites (bpf/probe_maps.h)
    entry_only: bool = False  # no return probes (WriteStatus)


def server_probes(table: SymbolTable, layout: GoLayout) -> list[ServerProbe]:
    """The HTTP/2 and gRPC server probes for a Go binary with symbols ``table``.

    A server whose offsets are unknown (no DWARF, no table row) is left out with a warning:
    its requests are then not traced, rather than traced with wrong fields."""
    offset = _offsets(layout)
    probes: list[ServerProbe] = []
    for h2 in H2_SERVERS:
        if h2.symbol not in table:
            continue
        wanted = [
            (h2.writer, "rws"),
            (h2.state, "status"),
            (h2.request, "Method"),
            (h2.request, "URL"),
        ]
        fields = [offset(*m) for m in wanted]
        if _missing(h2.symbol, wanted, fields, layout):
            continue
        if offset(h2.state, "stream") != 0:
            # The kernel reads rws.stream at offset 0 to tell a status of this stream from
            # one of the next stream the pooled rws serves (bpf/probe_maps.h SITE_FLAG_H2).
            log.warning(
                "%s is linked but %s.stream is not its first field in %s: its requests are "
                "not traced (a library layout this agent does not know)",
                h2.symbol,
                h2.state,
                layout.version,
            )
            continue
        a, b, c, d = fields
        e = offset(h2.request, "Header")  # -1: no traceparent read for this server
        probes.append(ServerProbe(h2.symbol, h2.symbol, SITE_FLAG_H2, (a, b, c, d, e)))
        if h2.done in table:  # else the status is read at runHandler's return (if rws allows)
            done = (a, b, -1, -1, -1)
            probes.append(ServerProbe(h2.done, h2.symbol, SITE_FLAG_H2_DONE, done, entry_only=True))
    if GRPC_SPAN_SYMBOL in table:
        method = offset(GRPC_STREAM, "method")
        if not _missing(GRPC_SPAN_SYMBOL, [(GRPC_STREAM, "method")], [method], layout):
            method_only = (method, -1, -1, -1, -1)
            span = ServerProbe(GRPC_SPAN_SYMBOL, GRPC_SPAN_SYMBOL, SITE_FLAG_GRPC, method_only)
            probes.append(span)
            wanted = [(GRPC_STATUS, "s"), (RPC_STATUS, "Code")]
            found = [offset(*m) for m in wanted]
            if GRPC_STATUS_SYMBOL in table and not _missing(
                GRPC_STATUS_SYMBOL, wanted, found, layout
            ):
                probes.append(
                    ServerProbe(
                        GRPC_STATUS_SYMBOL,
                        GRPC_SPAN_SYMBOL,
                        SITE_FLAG_GRPC_STATUS,
                        (found[0], found[1], -1, -1, -1),
                        entry_only=True,
                    )
                )
    return probes


#: Go's maps became Swiss tables (internal/runtime/maps) in this release.
SWISS_MAPS_SINCE = (1, 24)


def traceparent_fields(layout: GoLayout) -> tuple[int, int]:
    """(offset of net/http.Request.Header, HEADER_MAP_*) for reading an incoming W3C
    traceparent at an HTTP/1 request's entry; (-1, HEADER_MAP_NONE) when unknown.

    The kernel reads the map's internals at fixed offsets (bpf/probe_maps.h HEADER_MAP_*),
    the same from Go 1.17 to 1.23 (runtime.hmap) and from 1.24 to 1.27 (maps.Map)."""
    minor = go_minor(layout.version)
    header = _offsets(layout)("net/http.Request", "Header")
    if minor is None or header < 0 or layout.request_method < 0:
        return -1, HEADER_MAP_NONE
    return header, HEADER_MAP_SWISS if minor >= SWISS_MAPS_SINCE else HEADER_MAP_BUCKETS


#: runtime.g.m and runtime.m.curg by exact Go "major.minor" (runtime.m changes often: no
#: nearest-release guess), measured from DWARF of the test targets.
CREATOR_TABLE: dict[str, tuple[int, int]] = {"1.19": (48, 192), "1.27": (48, 184)}


def creator_offsets(layout: GoLayout) -> tuple[int, int]:
    """(runtime.g.m, runtime.m.curg): at a RET of runtime.newproc1 the goroutine that made
    the new one is g0.m.curg, so only the RETs need a probe; (-1, -1) when unknown (then
    the entry is probed too, bpf/probe_maps.h SITE_FLAG_SPAWN)."""
    if layout.source == "dwarf":
        g_m = layout.dwarf_offset("runtime.g", "m")
        m_curg = layout.dwarf_offset("runtime.m", "curg")
        return (-1, -1) if g_m is None or m_curg is None else (g_m, m_curg)
    minor = go_minor(layout.version)
    key = f"{minor[0]}.{minor[1]}" if minor else ""
    return CREATOR_TABLE.get(key, (-1, -1))


def _offsets(layout: GoLayout) -> Callable[[str, str], int]:
    return member_offsets(layout, GO_TABLE, LIBRARY_TABLE)


def _missing(symbol: str, wanted: list[Member], fields: list[int], layout: GoLayout) -> bool:
    return offsets_missing(symbol, wanted, fields, layout, "requests")
