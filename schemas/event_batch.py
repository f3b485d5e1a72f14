"""The msgpack batch formats of `apm.uprobe.events` and `apm.kprobe.events` (schemas/*.md).

One Kafka message carries many spans of one process, stored column by column: each numeric
column is one little-endian byte string, so the agent encodes a batch with a handful of numpy
calls and a consumer decodes it into arrays without a Python call per span. `iter_events`
turns a batch back into one dict per span, the shape `ebpf-apm tail --json` prints.

The decoders are the one place these formats are checked: anyone who can write to the
topics can send anything, so every type, size and value range the consumers rely on is
checked here (msgpack limits first, so that decoding itself is bounded), and anything else
raises `BatchDecodeError` with the reason (schemas/uprobe_events.md lists the limits).
`check_span_times` and `check_net_times` add the bounds around the reader's clock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from ebpf_apm.schemas.input_limits import MAX_MESSAGE_BYTES, InputRejected, TimeBounds, check_size

FORMAT_VERSION = 1
KIND_SPAN = "span"

# Column name -> numpy dtype. The order and types are part of the topic's contract.
SPAN_COLUMNS: dict[str, np.dtype[Any]] = {
    "tid": np.dtype("<u4"),
    "end_tid": np.dtype("<u4"),
    "goid": np.dtype("<i8"),
    "func": np.dtype("<u4"),
    "start_ns": np.dtype("<i8"),
    "end_ns": np.dtype("<i8"),
}
HTTP_ROW = np.dtype("<u4")
HTTP_STATUS = np.dtype("<u2")
HTTP_FLUSHED = np.dtype("<i8")
RPC_ROW = np.dtype("<u4")
RPC_STATUS = np.dtype("u1")
SPAN_KIND = np.dtype("u1")
TRACE_ID = np.dtype("u1")  # 16 per span
SPAN_ID = np.dtype("<u8")
#: span_kind column values -> the names `tail --json` shows (OpenTelemetry's span kinds).
SPAN_KINDS = ("internal", "server", "client")
SPAN_KIND_INTERNAL, SPAN_KIND_SERVER, SPAN_KIND_CLIENT = 0, 1, 2
#: gRPC status codes are 0 (OK) to 16 (UNAUTHENTICATED); the batch says 255 for unknown.
RPC_STATUS_MAX = 16
RPC_STATUS_UNKNOWN = 255
CLIENT_ROW = np.dtype("<u4")
CLIENT_ERROR = np.dtype("u1")
PEER_FAMILY = np.dtype("u1")
PEER_PORT = np.dtype("<u2")
PEER_ADDR = np.dtype("S16")


# What a reader accepts (schemas/uprobe_events.md lists them with the reasons).
MAX_BATCH_EVENTS = 65_536  # the agent cuts batches at 16384 events by default
MAX_FUNCS = 65_536
MAX_NAME_LEN = 4096  # node, exe, function names, k8s values (characters)
MAX_STRING_BYTES = 8192  # any string, e.g. an HTTP method or path (UTF-8 bytes)
MAX_K8S_FIELDS = 16
MAX_CONTAINERS = 11  # maps and lists in one message: the format has at most 10
# (The agent sends each kind of client span in messages of their own so that this holds:
# client HTTP spans carry http + client, gRPC rpc + client, SQL db + client.)
# Items in all lists of a message: funcs, and at most 3 lists with one item per span
# (client HTTP spans: http.method, http.path, client.host; SQL: db's 3 lists)
MAX_LIST_ITEMS = MAX_FUNCS + 3 * MAX_BATCH_EVENTS
MAX_PID = (1 << 32) - 1
# The join keeps a goroutine id in the low 48 bits of a key, above the 32-bit thread ids
# (consumers/net_event_store.py).
MAX_GOID = (1 << 48) - (1 << 32) - 1
MAX_IO_BYTES = 1 << 31  # one send or receive system call moves less than 2 GiB
MAX_FLUSH_DELAY_NS = 60 * 1_000_000_000  # a response flushed this long after its handler
_FAMILY_OK = np.zeros(256, dtype=np.bool_)
_FAMILY_OK[[0, 2, 10]] = True  # unknown, AF_INET, AF_INET6
_UNPACK_LIMITS = {
    "max_str_len": MAX_STRING_BYTES,
    "max_bin_len": MAX_MESSAGE_BYTES,
    "max_array_len": MAX_BATCH_EVENTS,
    "max_map_len": 64,
    "max_ext_len": 0,
}


class BatchDecodeError(InputRejected):
    """A message on an event topic is not a batch this version can read (the reason)."""


@dataclass
class HttpColumns:
    """HTTP fields of the spans that are HTTP requests: `rows` index the batch's spans."""

    rows: np.ndarray
    method: list[str]
    path: list[str]
    status: np.ndarray
    # When net/http had written the response (Unix epoch ns, after the span's end; HTTP/1),
    # 0 when unknown. The join counts the span's sends up to here.
    flushed_ns: np.ndarray | None = None


@dataclass
class RpcColumns:
    """gRPC fields of the spans that are gRPC calls: `rows` index the batch's spans."""

    rows: np.ndarray
    method: list[str]  # the full method, /package.Service/Method
    status: np.ndarray  # the gRPC status code 0..16, RPC_STATUS_UNKNOWN when not seen


@dataclass
class ClientColumns:
    """Fields every client span has (HTTP, gRPC, SQL): `rows` index the batch's spans."""

    rows: np.ndarray
    host: list[str] | None  # HTTP: the request URL's host as requested; None for gRPC, SQL
    error: np.ndarray  # 1: the call returned an error (HTTP: a transport error, status 0)
    # The connection's remote end where the agent read it (gRPC): family 0 (unknown), 2 or
    # 10, the address (IPv4 in the first 4 bytes) and port; None when no row has one.
    peer_family: np.ndarray | None = None
    peer_addr: np.ndarray | None = None
    peer_port: np.ndarray | None = None


@dataclass
class DbColumns:
    """database/sql statements: `rows` index the batch's spans."""

    rows: np.ndarray
    system: list[str]  # OpenTelemetry db.system ("postgresql"...), "" when not known
    operation: list[str]  # SELECT, INSERT, ... (the statement's first word)
    statement: list[str]  # sanitized by the agent: literals are ?, at most 256 bytes


@dataclass
class SpanIds:
    """Every span's place in its trace, fixed by the kernel when the span was recorded."""

    trace_id: np.ndarray  # (n, 16) uint8: W3C trace ids, in byte order
    span_id: np.ndarray  # uint64, never 0; its hex is the number's 16 digits
    parent_span_id: np.ndarray  # uint64, 0 for a root span


def span_id_hex(value: int) -> str:
    """A span id (uint64) as W3C's 16 lowercase hex digits."""
    return f"{value:016x}"


@dataclass
class SpanBatch:
    node: str
    pid: int
    exe: str
    funcs: list[str]
    columns: dict[str, np.ndarray]
    http: HttpColumns | None = None
    k8s: dict[str, str | None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    rpc: RpcColumns | None = None
    # SPAN_KIND_* per span; None (an older writer): HTTP and gRPC rows are server spans,
    # the others internal (see span_kinds()).
    span_kind: np.ndarray | None = None
    client: ClientColumns | None = None
    db: DbColumns | None = None
    # None (an older writer): the spans have no kernel ids (the join then hashes span_id).
    ids: SpanIds | None = None

    def span_kinds(self) -> np.ndarray:
        """The kind of every span, derived for batches that do not carry the column."""
        if self.span_kind is not None:
            return self.span_kind
        kinds = np.full(len(self), SPAN_KIND_INTERNAL, dtype=SPAN_KIND)
        for part in (self.http, self.rpc):
            if part is not None:
                kinds[part.rows] = SPAN_KIND_SERVER
        return kinds

    def __len__(self) -> int:
        return len(self.columns["tid"])


def _header(
    kind: str,
    node: str,
    pid: int,
    exe: str,
    columns: dict[str, np.ndarray],
    spec: dict[str, np.dtype[Any]],
) -> dict[str, Any]:
    """The map every batch shares, with its columns converted to the contract's dtypes."""
    n = len(columns["tid"])
    cols: dict[str, bytes] = {}
    for name, dtype in spec.items():
        column = columns[name]
        if len(column) != n:
            raise ValueError(f"column {name!r} has {len(column)} values, expected {n}")
        cols[name] = np.ascontiguousarray(column, dtype=dtype).tobytes()
    return {"v": FORMAT_VERSION, "kind": kind, "node": node, "pid": pid, "exe": exe, "n": n,
            "cols": cols}  # fmt: skip


def encode_span_batch(batch: SpanBatch) -> bytes:
    """Serialize a batch; columns are converted to the contract's dtypes."""
    message = _header(KIND_SPAN, batch.node, batch.pid, batch.exe, batch.columns, SPAN_COLUMNS)
    message["funcs"] = batch.funcs
    if batch.http is not None and len(batch.http.rows):
        message["http"] = {
            "row": np.ascontiguousarray(batch.http.rows, dtype=HTTP_ROW).tobytes(),
            "method": batch.http.method,
            "path": batch.http.path,
            "status": np.ascontiguousarray(batch.http.status, dtype=HTTP_STATUS).tobytes(),
        }
        if batch.http.flushed_ns is not None:
            flushed = np.ascontiguousarray(batch.http.flushed_ns, dtype=HTTP_FLUSHED)
            message["http"]["flushed_ns"] = flushed.tobytes()
    if batch.rpc is not None and len(batch.rpc.rows):
        message["rpc"] = {
            "row": np.ascontiguousarray(batch.rpc.rows, dtype=RPC_ROW).tobytes(),
            "method": batch.rpc.method,
            "status": np.ascontiguousarray(batch.rpc.status, dtype=RPC_STATUS).tobytes(),
        }
    if batch.client is not None and len(batch.client.rows):
        message["client"] = {
            "row": np.ascontiguousarray(batch.client.rows, dtype=CLIENT_ROW).tobytes(),
            "error": np.ascontiguousarray(batch.client.error, dtype=CLIENT_ERROR).tobytes(),
        }
        if batch.client.host is not None:
            message["client"]["host"] = batch.client.host
        if batch.client.peer_family is not None and batch.client.peer_family.any():
            c = batch.client
            message["client"]["peer_family"] = np.ascontiguousarray(
                c.peer_family, PEER_FAMILY
            ).tobytes()
            message["client"]["peer_addr"] = np.ascontiguousarray(c.peer_addr, PEER_ADDR).tobytes()
            message["client"]["peer_port"] = np.ascontiguousarray(c.peer_port, PEER_PORT).tobytes()
    if batch.db is not None and len(batch.db.rows):
        message["db"] = {
            "row": np.ascontiguousarray(batch.db.rows, dtype=CLIENT_ROW).tobytes(),
            "system": batch.db.system,
            "operation": batch.db.operation,
            "statement": batch.db.statement,
        }
    if batch.span_kind is not None:
        message["span_kind"] = np.ascontiguousarray(batch.span_kind, dtype=SPAN_KIND).tobytes()
    if batch.ids is not None:
        message["ids"] = {
            "trace": np.ascontiguousarray(batch.ids.trace_id, dtype=TRACE_ID).tobytes(),
            "span": np.ascontiguousarray(batch.ids.span_id, dtype=SPAN_ID).tobytes(),
            "parent": np.ascontiguousarray(batch.ids.parent_span_id, dtype=SPAN_ID).tobytes(),
        }
    if batch.k8s is not None:
        message["k8s"] = batch.k8s
    return msgpack.packb(message, use_bin_type=True)


def _column(raw: Any, dtype: np.dtype[Any], n: int, name: str) -> np.ndarray:
    if not isinstance(raw, bytes) or len(raw) != n * dtype.itemsize:
        size = len(raw) if isinstance(raw, bytes) else type(raw).__name__
        raise BatchDecodeError(
            f"column {name!r}: expected {n} x {dtype.itemsize} bytes, got {size}"
        )
    return np.frombuffer(raw, dtype=dtype)


def _unpack(value: bytes, kind: str | None) -> dict[str, Any]:
    if not isinstance(value, bytes):
        raise BatchDecodeError(f"expected bytes, got {type(value).__name__}")
    check_size(value, "batch", MAX_MESSAGE_BYTES)
    containers = items = 0

    def count(container: Any) -> Any:
        # A batch has a handful of maps and lists; a message of many small ones costs
        # ~70x its size in Python objects, so stop at the first one too many.
        nonlocal containers, items
        containers += 1
        if containers > MAX_CONTAINERS:
            raise BatchDecodeError(f"more than {MAX_CONTAINERS} maps and lists")
        if isinstance(container, list):
            items += len(container)
            if items > MAX_LIST_ITEMS:
                raise BatchDecodeError(f"more than {MAX_LIST_ITEMS} list items")
        return container

    try:
        message = msgpack.unpackb(
            value, raw=False, strict_map_key=True, object_hook=count, list_hook=count,
            **_UNPACK_LIMITS,
        )  # fmt: skip
    except BatchDecodeError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise BatchDecodeError(f"not msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(message, dict):
        raise BatchDecodeError(f"expected a msgpack map, got {type(message).__name__}")
    known = (kind,) if kind else (KIND_SPAN, KIND_NET)
    if message.get("v") != FORMAT_VERSION or message.get("kind") not in known:
        raise BatchDecodeError(
            f"unsupported batch v={_show(message.get('v'))} kind={_show(message.get('kind'))}; "
            f"this reader knows v={FORMAT_VERSION} kind in {known}"
        )
    return message


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _int(message: dict[str, Any], key: str, low: int, high: int) -> int:
    value = message.get(key)
    if type(value) is not int or not low <= value <= high:  # bool is not a count
        raise BatchDecodeError(
            f"{key}: expected a whole number in [{low}, {high}], got {_show(value)}"
        )
    return value


def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit:
        size = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
        raise BatchDecodeError(
            f"{what}: expected a string of at most {limit} characters, got {size}"
        )
    return value


def _texts(value: Any, what: str, count: int) -> list[str]:
    """A list of `count` strings (each at most MAX_STRING_BYTES: the msgpack limit)."""
    if not isinstance(value, list) or len(value) != count:
        size = f"{len(value)} items" if isinstance(value, list) else type(value).__name__
        raise BatchDecodeError(f"{what}: expected a list of {count} strings, got {size}")
    try:  # a type check in C: these lists have one item per HTTP span
        "".join(value)
    except TypeError:
        raise BatchDecodeError(f"{what}: expected a list of strings") from None
    return value


def _map(message: dict[str, Any], key: str) -> dict[str, Any]:
    value = message.get(key)
    if not isinstance(value, dict):
        raise BatchDecodeError(f"{key}: expected a map, got {type(value).__name__}")
    return value


def _k8s(message: dict[str, Any]) -> dict[str, str | None] | None:
    value = message.get("k8s")
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_K8S_FIELDS:
        raise BatchDecodeError(
            f"k8s: expected a map of at most {MAX_K8S_FIELDS} strings, got {_show(value)}"
        )
    for name, text in value.items():
        _text(name, "k8s field name", MAX_NAME_LEN)
        if text is not None:
            _text(text, f"k8s.{name}", MAX_NAME_LEN)
    return value


def _columns(message: dict[str, Any], spec: dict[str, np.dtype[Any]]) -> dict[str, np.ndarray]:
    n = _int(message, "n", 0, MAX_BATCH_EVENTS)
    raw = _map(message, "cols")
    return {name: _column(raw.get(name), dtype, n, name) for name, dtype in spec.items()}


def _check_goid(goid: np.ndarray) -> None:
    if len(goid) and int(goid.max()) > MAX_GOID:
        raise BatchDecodeError(f"goroutine id above {MAX_GOID}")


def _rows(raw: Any, part: str, n: int) -> np.ndarray:
    """The `row` column of an optional part: increasing indexes of the batch's n spans."""
    if not isinstance(raw, dict):
        raise BatchDecodeError(f"{part}: expected a map, got {type(raw).__name__}")
    row = raw.get("row")
    if (
        not isinstance(row, bytes)
        or len(row) % HTTP_ROW.itemsize
        or len(row) > n * HTTP_ROW.itemsize
    ):
        raise BatchDecodeError(f"{part}.row: expected at most {n} x 4 bytes, got {_show(row)}")
    rows = np.frombuffer(row, dtype=HTTP_ROW)
    if len(rows) and (int(rows.max()) >= n or bool((np.diff(rows.astype(np.int64)) <= 0).any())):
        raise BatchDecodeError(f"{part}.row: rows must be increasing indexes of the batch's spans")
    return rows


def _rpc(raw: Any, n: int, http: HttpColumns | None) -> RpcColumns:
    rows = _rows(raw, "rpc", n)
    m = len(rows)
    if http is not None and len(np.intersect1d(rows, http.rows)):
        raise BatchDecodeError("rpc.row: a span cannot be both an HTTP request and a gRPC call")
    status = _column(raw.get("status"), RPC_STATUS, m, "rpc.status")
    if bool(((status > RPC_STATUS_MAX) & (status != RPC_STATUS_UNKNOWN)).any()):
        raise BatchDecodeError(
            f"rpc.status: a code outside 0..{RPC_STATUS_MAX} ({RPC_STATUS_UNKNOWN} for unknown)"
        )
    return RpcColumns(rows=rows, method=_texts(raw.get("method"), "rpc.method", m), status=status)


def _span_kind(raw: Any, n: int) -> np.ndarray:
    kinds = _column(raw, SPAN_KIND, n, "span_kind")
    if len(kinds) and int(kinds.max()) >= len(SPAN_KINDS):
        raise BatchDecodeError(
            f"span_kind: values are 0..{len(SPAN_KINDS) - 1} ({', '.join(SPAN_KINDS)})"
        )
    return kinds


def _client(raw: Any, n: int) -> ClientColumns:
    rows = _rows(raw, "client", n)
    m = len(rows)
    error = _column(raw.get("error"), CLIENT_ERROR, m, "client.error")
    if len(error) and int(error.max()) > 1:
        raise BatchDecodeError("client.error: values are 0 (no error) or 1 (error)")
    host = raw.get("host")
    peer: list[np.ndarray | None] = [None, None, None]
    if raw.get("peer_family") is not None:
        peer = [
            _column(raw.get(f"peer_{name}"), dtype, m, f"client.peer_{name}")
            for name, dtype in (("family", PEER_FAMILY), ("addr", PEER_ADDR), ("port", PEER_PORT))
        ]
        if not _FAMILY_OK[peer[0]].all():
            raise BatchDecodeError("client.peer_family: 0 (unknown), 2 (IPv4) or 10 (IPv6)")
    return ClientColumns(
        rows=rows,
        host=None if host is None else _texts(host, "client.host", m),
        error=error,
        peer_family=peer[0],
        peer_addr=peer[1],
        peer_port=peer[2],
    )


def _db(raw: Any, n: int, others: list[np.ndarray]) -> DbColumns:
    rows = _rows(raw, "db", n)
    m = len(rows)
    if any(len(np.intersect1d(rows, other)) for other in others):
        raise BatchDecodeError("db.row: a statement cannot be an HTTP request or gRPC call too")
    return DbColumns(
        rows=rows,
        system=_texts(raw.get("system"), "db.system", m),
        operation=_texts(raw.get("operation"), "db.operation", m),
        statement=_texts(raw.get("statement"), "db.statement", m),
    )


def _ids(raw: Any, n: int) -> SpanIds:
    if not isinstance(raw, dict):
        raise BatchDecodeError(f"ids: expected a map, got {_show(raw)}")
    trace = _column(raw.get("trace"), TRACE_ID, 16 * n, "ids.trace").reshape(n, 16)
    span = _column(raw.get("span"), SPAN_ID, n, "ids.span")
    parent = _column(raw.get("parent"), SPAN_ID, n, "ids.parent")
    if n and bool((span == 0).any()):
        raise BatchDecodeError("ids.span: 0 is not a span id")
    if n and bool((~trace.any(axis=1)).any()):
        raise BatchDecodeError("ids.trace: an all-zero trace id")
    return SpanIds(trace_id=trace, span_id=span, parent_span_id=parent)


def _http(raw: Any, columns: dict[str, np.ndarray]) -> HttpColumns:
    rows = _rows(raw, "http", len(columns["tid"]))
    m = len(rows)
    status = _column(raw.get("status"), HTTP_STATUS, m, "http.status")
    if bool(((status != 0) & ((status < 100) | (status > 599))).any()):
        raise BatchDecodeError("http.status: a status outside 100..599 (0 for unknown)")
    flushed = None
    if raw.get("flushed_ns") is not None:
        flushed = _column(raw["flushed_ns"], HTTP_FLUSHED, m, "http.flushed_ns")
        end = columns["end_ns"][rows]
        known = flushed != 0
        if bool((known & ((flushed < end) | (flushed - end > MAX_FLUSH_DELAY_NS))).any()):
            raise BatchDecodeError(
                "http.flushed_ns: a response flushed before its span's end or more than "
                f"{MAX_FLUSH_DELAY_NS // 1_000_000_000} s after it"
            )
    return HttpColumns(
        rows=rows,
        method=_texts(raw.get("method"), "http.method", m),
        path=_texts(raw.get("path"), "http.path", m),
        status=status,
        flushed_ns=flushed,
    )


def decode_span_batch(value: bytes) -> SpanBatch:
    """Parse and check one message value (schemas/uprobe_events.md, "What a reader
    rejects"); BatchDecodeError, with the reason, for anything else."""
    message = _unpack(value, KIND_SPAN)
    columns = _columns(message, SPAN_COLUMNS)
    n = len(columns["tid"])
    raw_funcs = message.get("funcs")
    if not isinstance(raw_funcs, list) or len(raw_funcs) > MAX_FUNCS:
        raise BatchDecodeError(
            f"funcs: expected a list of at most {MAX_FUNCS} names, got {_show(raw_funcs)}"
        )
    funcs = [_text(f, "funcs", MAX_NAME_LEN) for f in raw_funcs]
    if n:
        if int(columns["func"].max()) >= len(funcs):
            raise BatchDecodeError("func index outside the batch's function table")
        start, end = columns["start_ns"], columns["end_ns"]
        if int(start.min()) < 0:
            raise BatchDecodeError("span times outside the Unix epoch nanosecond range")
        if bool((end < start).any()):
            raise BatchDecodeError("a span ends before it starts")
        _check_goid(columns["goid"])
    http = _http(message["http"], columns) if message.get("http") is not None else None
    rpc = _rpc(message["rpc"], n, http) if message.get("rpc") is not None else None
    kinds = _span_kind(message["span_kind"], n) if message.get("span_kind") is not None else None
    client = _client(message["client"], n) if message.get("client") is not None else None
    others = [part.rows for part in (http, rpc) if part is not None]
    db = _db(message["db"], n, others) if message.get("db") is not None else None
    if (client is not None or db is not None) and kinds is None:
        raise BatchDecodeError("client and db parts need the span_kind column")
    ids = _ids(message["ids"], n) if message.get("ids") is not None else None
    return SpanBatch(
        node=_text(message.get("node"), "node", MAX_NAME_LEN),
        pid=_int(message, "pid", 0, MAX_PID),
        exe=_text(message.get("exe", ""), "exe", MAX_NAME_LEN),
        funcs=funcs,
        columns=columns,
        http=http,
        k8s=_k8s(message),
        rpc=rpc,
        span_kind=kinds,
        client=client,
        db=db,
        ids=ids,
    )


def check_span_times(batch: SpanBatch, now_ns: int, bounds: TimeBounds) -> None:
    """Reject a batch whose times are outside `bounds` around the reader's clock `now_ns`."""
    if len(batch):
        end = batch.columns["end_ns"]
        newest = int(end.max())
        http = batch.http
        if http is not None and http.flushed_ns is not None and len(http.flushed_ns):
            newest = max(newest, int(http.flushed_ns.max()))
        bounds.check(int(batch.columns["start_ns"].min()), newest, now_ns, "span time")


K8S_FIELDS = ("k8s_namespace", "k8s_pod", "k8s_container", "k8s_workload")


def iter_events(batch: SpanBatch) -> Iterator[dict[str, Any]]:
    """One dict per span, with the fields `ebpf-apm tail --json` promises."""
    cols = {name: column.tolist() for name, column in batch.columns.items()}
    http_at: dict[int, int] = {}
    if batch.http is not None:
        http_at = {row: i for i, row in enumerate(batch.http.rows.tolist())}
    rpc_at: dict[int, int] = {}
    if batch.rpc is not None:
        rpc_at = {row: i for i, row in enumerate(batch.rpc.rows.tolist())}
    client_at: dict[int, int] = {}
    if batch.client is not None:
        client_at = {row: i for i, row in enumerate(batch.client.rows.tolist())}
    db_at: dict[int, int] = {}
    if batch.db is not None:
        db_at = {row: i for i, row in enumerate(batch.db.rows.tolist())}
    kinds = batch.span_kinds().tolist()
    k8s = batch.k8s or {}
    ids = batch.ids
    if ids is not None:
        traces = [bytes(t).hex() for t in ids.trace_id]
        own, parents = ids.span_id.tolist(), ids.parent_span_id.tolist()
    for i in range(len(batch)):
        goid = cols["goid"][i]
        event: dict[str, Any] = {
            "node": batch.node,
            "pid": batch.pid,
            "exe": batch.exe,
            "tid": cols["tid"][i],
            "end_tid": cols["end_tid"][i],
            "goid": None if goid < 0 else goid,
            "func": batch.funcs[cols["func"][i]],
            "start_ns": cols["start_ns"][i],
            "end_ns": cols["end_ns"][i],
            "duration_ns": cols["end_ns"][i] - cols["start_ns"][i],
            "span_kind": SPAN_KINDS[kinds[i]],
            "trace_id": None,
            "span_id": None,
            "parent_span_id": None,
        }
        if ids is not None:
            event["trace_id"] = traces[i]
            event["span_id"] = span_id_hex(own[i])
            event["parent_span_id"] = span_id_hex(parents[i]) if parents[i] else None
        j = http_at.get(i)
        if j is not None and batch.http is not None:
            event["http_method"] = batch.http.method[j]
            event["http_path"] = batch.http.path[j]
            event["http_status"] = int(batch.http.status[j])
            flushed = 0 if batch.http.flushed_ns is None else int(batch.http.flushed_ns[j])
            event["http_flushed_ns"] = flushed or None
        r = rpc_at.get(i)
        if r is not None and batch.rpc is not None:
            event["rpc_method"] = batch.rpc.method[r]
            code = int(batch.rpc.status[r])
            event["rpc_status"] = None if code == RPC_STATUS_UNKNOWN else code
        c = client_at.get(i)
        if c is not None and batch.client is not None:
            if j is not None and batch.client.host is not None:
                event["http_host"] = batch.client.host[c]
            event["error"] = int(batch.client.error[c])  # 0 or 1, as in apm.spans
            fam = batch.client.peer_family
            if fam is not None and fam[c] and batch.client.peer_addr is not None:
                event["peer_addr"] = _address(int(fam[c]), batch.client.peer_addr[c])
                event["peer_port"] = int(batch.client.peer_port[c])  # type: ignore[index]
        d = db_at.get(i)
        if d is not None and batch.db is not None:
            event["db_system"] = batch.db.system[d] or None
            event["db_operation"] = batch.db.operation[d]
            event["db_statement"] = batch.db.statement[d]
        for name in K8S_FIELDS:
            event[name] = k8s.get(name)
        yield event


# --- apm.kprobe.events: socket sends and receives (schemas/kprobe_events.md) -------------

KIND_NET = "net"
DIRECTION_SEND = 0
DIRECTION_RECV = 1
DIRECTIONS = ("send", "recv")

NET_COLUMNS: dict[str, np.dtype[Any]] = {
    "tid": np.dtype("<u4"),
    "goid": np.dtype("<i8"),
    "ts_ns": np.dtype("<i8"),
    "bytes": np.dtype("<i8"),
    "direction": np.dtype("u1"),
    "family": np.dtype("u1"),  # 0 unknown, 2 AF_INET, 10 AF_INET6
    "sport": np.dtype("<u2"),
    "dport": np.dtype("<u2"),
    "saddr": np.dtype("S16"),  # IPv4 in the first 4 bytes
    "daddr": np.dtype("S16"),
}


@dataclass
class NetBatch:
    node: str
    pid: int
    exe: str
    columns: dict[str, np.ndarray]
    k8s: dict[str, str | None] | None = None

    def __len__(self) -> int:
        return len(self.columns["tid"])


def encode_net_batch(batch: NetBatch) -> bytes:
    message = _header(KIND_NET, batch.node, batch.pid, batch.exe, batch.columns, NET_COLUMNS)
    if batch.k8s is not None:
        message["k8s"] = batch.k8s
    return msgpack.packb(message, use_bin_type=True)


def decode_net_batch(value: bytes) -> NetBatch:
    """Parse and check one message value (schemas/kprobe_events.md, "What a reader
    rejects"); BatchDecodeError, with the reason, for anything else."""
    message = _unpack(value, KIND_NET)
    columns = _columns(message, NET_COLUMNS)
    if len(columns["tid"]):
        if int(columns["direction"].max()) > DIRECTION_RECV:
            raise BatchDecodeError("direction outside send/recv")
        if int(columns["ts_ns"].min()) < 0:
            raise BatchDecodeError("event times outside the Unix epoch nanosecond range")
        nbytes = columns["bytes"]
        if int(nbytes.min()) < 0:
            raise BatchDecodeError("negative byte count (an error result, not bytes moved)")
        if int(nbytes.max()) > MAX_IO_BYTES:
            raise BatchDecodeError(f"a byte count above {MAX_IO_BYTES} (one system call)")
        if not _FAMILY_OK[columns["family"]].all():
            raise BatchDecodeError("family outside 0 (unknown), 2 (IPv4), 10 (IPv6)")
        _check_goid(columns["goid"])
    return NetBatch(
        node=_text(message.get("node"), "node", MAX_NAME_LEN),
        pid=_int(message, "pid", 0, MAX_PID),
        exe=_text(message.get("exe", ""), "exe", MAX_NAME_LEN),
        columns=columns,
        k8s=_k8s(message),
    )


def check_net_times(batch: NetBatch, now_ns: int, bounds: TimeBounds) -> None:
    """Reject a batch whose times are outside `bounds` around the reader's clock `now_ns`."""
    if len(batch):
        ts = batch.columns["ts_ns"]
        bounds.check(int(ts.min()), int(ts.max()), now_ns, "event time")


def _address(family: int, raw: bytes) -> str | None:
    if family == 2:
        return str(ipaddress.IPv4Address(raw[:4].ljust(4, b"\0")))
    if family == 10:
        return str(ipaddress.IPv6Address(raw.ljust(16, b"\0")))
    return None


def iter_net_events(batch: NetBatch) -> Iterator[dict[str, Any]]:
    """One dict per socket send or receive, as `ebpf-apm tail apm.kprobe.events --json`."""
    cols = {name: column.tolist() for name, column in batch.columns.items()}
    k8s = batch.k8s or {}
    for i in range(len(batch)):
        goid = cols["goid"][i]
        family = cols["family"][i]
        event: dict[str, Any] = {
            "node": batch.node,
            "pid": batch.pid,
            "exe": batch.exe,
            "tid": cols["tid"][i],
            "goid": None if goid < 0 else goid,
            "ts_ns": cols["ts_ns"][i],
            "bytes": cols["bytes"][i],
            "direction": DIRECTIONS[cols["direction"][i]],
            "saddr": _address(family, cols["saddr"][i]),
            "sport": cols["sport"][i] if family else None,
            "daddr": _address(family, cols["daddr"][i]),
            "dport": cols["dport"][i] if family else None,
        }
        for name in K8S_FIELDS:
            event[name] = k8s.get(name)
        yield event


def batch_kind(value: bytes) -> str:
    """`span` or `net`, without decoding the columns (BatchDecodeError if neither)."""
    return str(_unpack(value, None)["kind"])
