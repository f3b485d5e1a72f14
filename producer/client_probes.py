"""The outgoing calls a Go binary can make, and the field offsets their probes read.

One probe per kind of call, each at a function that runs once per call the program made,
on the caller's goroutine, and returns to the caller (so entry and RETs pair by goroutine,
like every Go probe here; never a uretprobe):

* ``net/http.(*Client).do(req)``: every ``Client.Do/Get/Post/...`` goes through it once.
  Not ``(*Transport).roundTrip``: that runs once per attempt (each redirect, each retry on
  a dead keep-alive connection), so one request of the program would be several spans.
  ``do`` returns after the final response's headers (or the error): the span is the time
  the caller waited for them, the host is ``req.URL.Host`` as requested, the path is
  ``req.URL.Path`` (never the query), the status the final response's. A transport error
  (refused, reset, timeout, too many redirects...) is a span with status 0 and ``error``
  set (schemas/uprobe_events.md).
* ``google.golang.org/grpc.invoke``: one unary call, under any interceptors (``Invoke``
  itself is small enough to be inlined into callers, ``invoke`` is not). The status code is
  read from the returned ``*status.Error`` (nil: OK).
* Streaming calls: from the entry of ``newClientStream`` (unary calls, which go through it
  too, are skipped by their ``StreamDesc``) to the entry of ``(*csAttempt).finish(err)``,
  where the stream's end is known (``io.EOF`` already turned into nil: OK), on the same
  goroutine. A stream finished on another goroutine (a bidirectional stream whose receiver
  runs apart, a cancelled context) is not timed.
* ``transport.(*http2Client).NewStream``, entry only, on the calling goroutine of either: the
  call's connection, ``t.remoteAddr`` (a ``*net.TCPAddr``), is the span's peer.
* ``net/http.(*persistConn).roundTrip``, entry only, on the goroutine of ``(*Client).do``:
  the attempt's connection (``pc.conn``, a ``*net.TCPConn`` or with TLS a ``*tls.Conn``
  around one), whose ``netFD.raddr`` is the peer; the last attempt's wins (redirects). An
  HTTP/2 request (its own transport) or a connection of another type gets none.
* ``database/sql.(*DB|*Tx|*Conn).QueryContext`` and ``ExecContext``: the plain ``Query``,
  ``Exec``, ``QueryRow`` and ``QueryRowContext`` all call them once, on the caller's
  goroutine, and the query string is in the same registers for all six. Not
  ``queryDC``/``execDC``: ``DB`` retries those on a bad connection. Prepared statements
  (``Stmt``) are not timed.

The database system is the driver the binary links (its package path, from the symbol
table, stripped or not): one system per binary; a binary with drivers of two systems says
none. Offsets come from DWARF when the binary has it, else from the tables below (measured
from DWARF of tests/targets/goclient built by Go 1.19 and 1.27 against Debian bookworm's
grpc 1.33.3 and genproto 2020-04; tests/test_client_spans.py keeps them in step).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ebpf_apm.producer.elf_symbols import SymbolTable
from ebpf_apm.producer.event_layout import DB_SYSTEMS
from ebpf_apm.producer.go_binary import GoLayout
from ebpf_apm.producer.map_layout import (
    SITE_FLAG_CLIENT_GRPC,
    SITE_FLAG_CLIENT_GRPC_END,
    SITE_FLAG_CLIENT_GRPC_STREAM,
    SITE_FLAG_CLIENT_HTTP,
    SITE_FLAG_CLIENT_HTTP_PEER,
    SITE_FLAG_CLIENT_PEER,
    SITE_FLAG_CLIENT_SQL,
    TCP_ADDR_PORT,
)
from ebpf_apm.producer.member_offsets import Member, member_offsets, offsets_missing

__all__ = ["HTTP_CLIENT_SYMBOL", "GRPC_CLIENT_SYMBOL", "SQL_SYMBOLS", "ClientProbe",
           "client_probes", "db_system"]  # fmt: skip

log = logging.getLogger(__name__)


HTTP_CLIENT_SYMBOL = "net/http.(*Client).do"
GRPC_CLIENT_SYMBOL = "google.golang.org/grpc.invoke"
GRPC_STREAM_SYMBOL = "google.golang.org/grpc.newClientStream"
GRPC_STREAM_END_SYMBOL = "google.golang.org/grpc.(*csAttempt).finish"
STREAM_DESC = "google.golang.org/grpc.StreamDesc"
GRPC_PEER_SYMBOL = "google.golang.org/grpc/internal/transport.(*http2Client).NewStream"
HTTP_PEER_SYMBOL = "net/http.(*persistConn).roundTrip"
PERSIST_CONN = "net/http.persistConn"
NET_FD = "net.netFD"
TLS_CONN = "crypto/tls.Conn"
HTTP2_CLIENT = "google.golang.org/grpc/internal/transport.http2Client"
TCP_ADDR = "net.TCPAddr"
#: database/sql entry points -> the register of the returned error's type word
#: (1: RBX after (*Rows, error), 2: RCX after (Result, error)).
SQL_SYMBOLS: dict[str, int] = {
    f"database/sql.(*{owner}).{method}": register
    for owner in ("DB", "Tx", "Conn")
    for method, register in (("QueryContext", 1), ("ExecContext", 2))
}
REQUEST = "net/http.Request"
URL = "net/url.URL"
RESPONSE = "net/http.Response"
GRPC_ERROR = "google.golang.org/grpc/internal/status.Error"
RPC_STATUS = "google.golang.org/genproto/googleapis/rpc/status.Status"
#: Package path prefixes of database/sql drivers -> their OpenTelemetry db.system.
DRIVERS: dict[str, str] = {
    "github.com/lib/pq.": "postgresql",
    "github.com/jackc/pgx": "postgresql",
    "github.com/go-sql-driver/mysql.": "mysql",
    "github.com/mattn/go-sqlite3.": "sqlite",
    "modernc.org/sqlite.": "sqlite",
    "github.com/denisenkom/go-mssqldb.": "mssql",
    "github.com/microsoft/go-mssqldb.": "mssql",
}

#: Standard library offsets by Go "major.minor" (stripped binaries; nearest lower release).
GO_TABLE: dict[str, dict[Member, int]] = {
    "1.19": {
        (REQUEST, "Method"): 0,
        (REQUEST, "URL"): 16,
        (URL, "Host"): 40,
        (URL, "Path"): 56,
        (RESPONSE, "StatusCode"): 16,
        (TCP_ADDR, "IP"): 0,
        (TCP_ADDR, "Port"): 24,
        (PERSIST_CONN, "conn"): 80,
        (PERSIST_CONN, "tlsState"): 96,
        (NET_FD, "raddr"): 112,
        (TLS_CONN, "conn"): 0,
    },
    "1.27": {
        (REQUEST, "Method"): 0,
        (REQUEST, "URL"): 16,
        (URL, "Host"): 40,
        (URL, "Path"): 56,
        (RESPONSE, "StatusCode"): 16,
        (TCP_ADDR, "IP"): 0,
        (TCP_ADDR, "Port"): 24,
        (PERSIST_CONN, "conn"): 80,
        (PERSIST_CONN, "tlsState"): 96,
        (NET_FD, "raddr"): 112,
        (TLS_CONN, "conn"): 0,
    },
}
#: Library offsets (measured for the versions named above).
LIBRARY_TABLE: dict[Member, int] = {
    (GRPC_ERROR, "e"): 0,
    (RPC_STATUS, "Code"): 0,
    (STREAM_DESC, "ServerStreams"): 24,
    (STREAM_DESC, "ClientStreams"): 25,
    (HTTP2_CLIENT, "remoteAddr"): 96,
}


@dataclass(frozen=True)
class ClientProbe:
    """One client function to probe (its own span function id)."""

    symbol: str
    flags: int  # SITE_FLAG_CLIENT_*
    fields: tuple[int, int, int, int]  # field_a..field_d of its sites (bpf/probe_maps.h)
    #: ProcessLayout fields the probe needs (request_method, request_url, url_path), for a
    #: binary without an HTTP server whose layout came from the table (they are -1 there).
    layout: tuple[tuple[str, int], ...] = ()
    span_symbol: str = ""  # the function whose span id its sites carry ("": its own)
    entry_only: bool = False  # no return probes (the stream probes)
    #: A second span function whose id goes in field_c (the gRPC peer probe: streams)
    other_span: str = ""

    @property
    def span(self) -> str:
        return self.span_symbol or self.symbol


def db_system(table: SymbolTable) -> str:
    """The database system of the driver the binary links, "" if none or several."""
    found = {system for prefix, system in DRIVERS.items() if _links(table, prefix)}
    return found.pop() if len(found) == 1 else ""


def _links(table: SymbolTable, prefix: str) -> bool:
    return any(sym.name.startswith(prefix) for sym in table)


def client_probes(table: SymbolTable, layout: GoLayout) -> list[ClientProbe]:
    """The client probes for a Go binary with symbols ``table``: a client whose offsets are
    unknown is left out with a warning (not traced, rather than traced with wrong fields)."""
    offset = _offsets(layout)
    probes: list[ClientProbe] = []
    if HTTP_CLIENT_SYMBOL in table:
        wanted = [(URL, "Host"), (RESPONSE, "StatusCode"), (REQUEST, "Method"),
                  (REQUEST, "URL"), (URL, "Path")]  # fmt: skip
        found = [offset(*m) for m in wanted]
        if not _missing(HTTP_CLIENT_SYMBOL, wanted, found, layout):
            host, status, method, url, path = found
            probes.append(
                ClientProbe(
                    HTTP_CLIENT_SYMBOL,
                    SITE_FLAG_CLIENT_HTTP,
                    (host, status, -1, -1),
                    (("request_method", method), ("request_url", url), ("url_path", path)),
                )
            )
            peer = [(PERSIST_CONN, "conn"), (PERSIST_CONN, "tlsState"), (NET_FD, "raddr"),
                    (TLS_CONN, "conn"), (TCP_ADDR, "IP"), (TCP_ADDR, "Port")]  # fmt: skip
            where = [offset(*m) for m in peer]
            if (
                HTTP_PEER_SYMBOL in table
                and not _missing(HTTP_PEER_SYMBOL, peer, where, layout)
                and (where[4], where[5]) == (0, TCP_ADDR_PORT)
            ):
                probes.append(
                    ClientProbe(
                        HTTP_PEER_SYMBOL,
                        SITE_FLAG_CLIENT_HTTP_PEER,
                        (where[0], where[1], where[2], where[3]),
                        span_symbol=HTTP_CLIENT_SYMBOL,
                        entry_only=True,
                    )
                )
    if GRPC_CLIENT_SYMBOL in table:
        wanted = [(GRPC_ERROR, "e"), (RPC_STATUS, "Code")]
        found = [offset(*m) for m in wanted]
        if not _missing(GRPC_CLIENT_SYMBOL, wanted, found, layout):
            probes.append(
                ClientProbe(GRPC_CLIENT_SYMBOL, SITE_FLAG_CLIENT_GRPC, (found[0], found[1], -1, -1))
            )
            streaming = False
            streams = [(STREAM_DESC, "ServerStreams"), (STREAM_DESC, "ClientStreams")]
            desc = [offset(*m) for m in streams]
            if (
                GRPC_STREAM_SYMBOL in table
                and GRPC_STREAM_END_SYMBOL in table
                and not _missing(GRPC_STREAM_SYMBOL, streams, desc, layout)
            ):
                probes.append(
                    ClientProbe(
                        GRPC_STREAM_SYMBOL,
                        SITE_FLAG_CLIENT_GRPC_STREAM,
                        (desc[0], desc[1], -1, -1),
                        entry_only=True,
                    )
                )
                streaming = True
                probes.append(
                    ClientProbe(
                        GRPC_STREAM_END_SYMBOL,
                        SITE_FLAG_CLIENT_GRPC_END,
                        (found[0], found[1], -1, -1),
                        span_symbol=GRPC_STREAM_SYMBOL,
                        entry_only=True,
                    )
                )
            peer = [(HTTP2_CLIENT, "remoteAddr"), (TCP_ADDR, "IP"), (TCP_ADDR, "Port")]
            where = [offset(*m) for m in peer]
            if (
                GRPC_PEER_SYMBOL in table
                and not _missing(GRPC_PEER_SYMBOL, peer, where, layout)
                and where[1] == 0
            ):
                probes.append(
                    ClientProbe(
                        GRPC_PEER_SYMBOL,
                        SITE_FLAG_CLIENT_PEER,
                        (where[0], where[2], -1, -1),
                        span_symbol=GRPC_CLIENT_SYMBOL,
                        entry_only=True,
                        other_span=GRPC_STREAM_SYMBOL if streaming else "",
                    )
                )
    sql = [symbol for symbol in SQL_SYMBOLS if symbol in table]
    if sql:
        system = DB_SYSTEMS.index(db_system(table))
        for symbol in sql:
            fields = (SQL_SYMBOLS[symbol], system, -1, -1)
            probes.append(ClientProbe(symbol, SITE_FLAG_CLIENT_SQL, fields))
    return probes


def _offsets(layout: GoLayout) -> Callable[[str, str], int]:
    return member_offsets(layout, GO_TABLE, LIBRARY_TABLE)


def _missing(symbol: str, wanted: list[Member], fields: list[int], layout: GoLayout) -> bool:
    return offsets_missing(symbol, wanted, fields, layout, "calls")
