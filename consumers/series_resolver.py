"""Span columns -> a series id per span, with Python work only per new distinct series.

A series is (workload, operation, status class):
- workload: `namespace/workload` from Kubernetes when the span has a workload, else the
  executable's file name;
- operation: `METHOD route` for an HTTP span (see route_template), the full method
  (`/package.Service/Method`) for a gRPC call, else the function. Client spans (calls the
  program made) never share a series with the spans it served: their operation starts with
  `client `: `client METHOD host route` (HTTP), `client /package.Service/Method` (gRPC),
  `client shape` (SQL: the sanitized statement with runs of `?, ?` collapsed, preceded by its
  OPERATION when the statement does not start with it, as after WITH; so
  `IN (?, ?)` and `IN (?, ?, ?)` are one series);
- status class: `2xx`..`5xx`, or `unknown`, for an HTTP span; the gRPC code's name (`OK`,
  `NOT_FOUND`, ..., `UNAUTHENTICATED`), or `unknown`, for a gRPC call; `error` for a client
  call that failed without a status (HTTP transport error, SQL error), `OK` for a statement
  that did not; none otherwise.

Each span gets a 64-bit hash of the strings that decide its series (the path through its
route), computed for the whole batch in numpy. Distinct hashes are looked up in a cache;
only a hash never seen before costs Python work: its series key is built from one of its
spans and registered (which applies the cap per workload). Several hashes may name one
series (two executables of the same name, say); a 64-bit collision between two different
series is possible in principle (around 1e-9 with a million distinct keys) and would merge
them.
"""

from __future__ import annotations

import re

import numpy as np

from ebpf_apm.consumers.byte_hash import hash_ranges, mix64
from ebpf_apm.consumers.route_template import SeriesKey, SeriesRegistry, route_hashes, route_of
from ebpf_apm.consumers.span_batch import workload_of
from ebpf_apm.consumers.span_columns import SpanColumns

_K_WORKLOAD = np.uint64(0x2545F4914F6CDD1D)
_K_EXE = np.uint64(0x27BB2EE687B0B0FD)
_K_OPERATION = np.uint64(0x4F1BBCDCBFA53E0B)
_K_HTTP = np.uint64(0x7A646E4D0B5AC3E1)
_K_STATUS = np.uint64(0x5851F42D4C957F2D)
_K_RPC = np.uint64(0x3C6EF372FE94F82B)
_K_CLIENT = np.uint64(0x6A09E667F3BCC909)
_K_HOST = np.uint64(0x510E527FADE682D1)
_K_SQL = np.uint64(0x1F83D9ABFB41BD6B)
_HASHED = ("exe", "func", "http_method", "k8s_namespace", "k8s_workload", "rpc_method",
           "http_host", "db_operation", "db_statement")  # fmt: skip
CLIENT_PREFIX = "client "
ERROR_CLASS = 8  # a client call that failed without a status (transport or driver error)
UNKNOWN_CLASS = 9  # status code outside 100-599, or none, on an HTTP span (or a gRPC call)
#: gRPC status class numbers: RPC_CLASS + code (0..16); an unknown code is UNKNOWN_CLASS.
RPC_CLASS = 10
GRPC_CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)  # fmt: skip


def status_classes(status: np.ndarray, is_http: np.ndarray) -> np.ndarray:
    """0 for a span without HTTP, 1-5 for 1xx-5xx, UNKNOWN_CLASS otherwise."""
    hundreds = status // 100
    known = (status >= 100) & (status <= 599)
    return np.where(is_http, np.where(known, hundreds, UNKNOWN_CLASS), 0)


def rpc_classes(code: np.ndarray, is_rpc: np.ndarray) -> np.ndarray:
    """RPC_CLASS + code for gRPC calls with a known code, UNKNOWN_CLASS for the others."""
    known = (code >= 0) & (code < len(GRPC_CODES))
    return np.where(is_rpc, np.where(known, RPC_CLASS + code, UNKNOWN_CLASS), 0)


def client_classes(error: np.ndarray, classes: np.ndarray, is_sql: np.ndarray) -> np.ndarray:
    """Client spans: ERROR_CLASS for a failed call without a status (HTTP: a transport error;
    SQL: any error), OK for a statement that did not fail; `classes` otherwise."""
    failed = (error == 1) & ((classes == 0) | (classes == UNKNOWN_CLASS) | is_sql)
    return np.where(failed, ERROR_CLASS, np.where(is_sql, RPC_CLASS, classes))


_PLACEHOLDER_RUN = re.compile(r"\?(?:\s*,\s*\?)+")
_VALUES_RUN = re.compile(r"\(\?\)(?:\s*,\s*\(\?\))+")


def statement_shape(statement: str) -> str:
    """A sanitized statement with its lists of placeholders collapsed: `IN (?, ?, ?)` and
    `VALUES (?, ?), (?, ?)` read `IN (?)` and `VALUES (?)`."""
    return _VALUES_RUN.sub("(?)", _PLACEHOLDER_RUN.sub("?", statement))


def class_name(code: int) -> str | None:
    if code == 0:
        return None
    if code == ERROR_CLASS:
        return "error"
    if code >= RPC_CLASS:
        return GRPC_CODES[code - RPC_CLASS]
    return "unknown" if code == UNKNOWN_CLASS else f"{code}xx"


def series_key_of(columns: SpanColumns, row: int) -> SeriesKey:
    """The series of one span, from its strings (the readable definition)."""
    workload = workload_of(
        columns.text("k8s_namespace", row),
        columns.text("k8s_workload", row),
        columns.text("exe", row) or "",
    )
    method = columns.text("http_method", row)
    rpc_method = columns.text("rpc_method", row)
    error = int(columns.ints["error"][row])
    statement = columns.text("db_statement", row)
    if error >= 0:  # a client span
        if statement is not None:
            verb, shape = columns.text("db_operation", row) or "", statement_shape(statement)
            # The shape names its operation already, except after WITH (the outer one's).
            same = shape.split(" ", 1)[0].upper() == verb
            operation = shape if same else f"{verb} {shape}".strip()
            code = 0
        elif rpc_method is not None:
            operation = rpc_method
            code = int(
                rpc_classes(np.array([columns.ints["rpc_status"][row]]), np.array([True]))[0]
            )
        else:
            host = columns.text("http_host", row) or ""
            operation = f"{method} {host} {route_of(columns.text('http_path', row) or '')}"
            status = int(columns.ints["http_status"][row])
            code = int(status_classes(np.array([status]), np.array([method is not None]))[0])
        code = int(client_classes(np.array([error]), np.array([code]),
                                  np.array([statement is not None]))[0])  # fmt: skip
        return SeriesKey(workload, CLIENT_PREFIX + operation, class_name(code))
    if rpc_method is not None:
        operation = rpc_method
        rpc_code = int(columns.ints["rpc_status"][row])
        code = int(rpc_classes(np.array([rpc_code]), np.array([True]))[0])
    elif method is not None:
        operation = f"{method} {route_of(columns.text('http_path', row) or '')}"
        status = int(columns.ints["http_status"][row])
        code = int(status_classes(np.array([status]), np.array([True]))[0])
    else:
        operation = columns.text("func", row) or ""
        code = 0
    return SeriesKey(workload, operation, class_name(code))


class SeriesResolver:
    """Maps spans to series ids of a SeriesRegistry."""

    def __init__(self, registry: SeriesRegistry, cache_limit: int = 1 << 20) -> None:
        self.registry = registry
        self._cache: dict[int, int] = {}
        self._cache_limit = cache_limit

    def key_hashes(self, columns: SpanColumns, rows: np.ndarray) -> np.ndarray:
        """One uint64 per row that is equal for spans of the same series."""
        buf = columns.buf
        exe, func, method, namespace, k8s_workload, rpc_method, host, db_op, statement = (
            hash_ranges(buf, columns.starts[f][rows], columns.lengths[f][rows]) for f in _HASHED
        )
        has_workload = columns.lengths["k8s_workload"][rows] > 0
        workload = np.where(
            has_workload, mix64(namespace ^ mix64(k8s_workload + _K_WORKLOAD)), exe + _K_EXE
        )
        is_http = columns.lengths["http_method"][rows] >= 0
        operation = func
        http = np.flatnonzero(is_http)
        if http.size:
            path_rows = rows[http]
            routes = route_hashes(
                buf,
                columns.starts["http_path"][path_rows],
                np.maximum(columns.lengths["http_path"][path_rows], 0),
            )
            operation[http] = method[http] ^ mix64(routes + _K_HTTP)
        classes = status_classes(columns.ints["http_status"][rows], is_http)
        is_rpc = columns.lengths["rpc_method"][rows] >= 0
        rpc = np.flatnonzero(is_rpc)
        if rpc.size:
            operation[rpc] = mix64(rpc_method[rpc] + _K_RPC)
            classes = np.where(
                is_rpc, rpc_classes(columns.ints["rpc_status"][rows], is_rpc), classes
            )
        error = columns.ints["error"][rows]
        client = np.flatnonzero(error >= 0)
        if client.size:
            # Several statements of one shape hash apart (IN lists of other lengths): they
            # resolve to the same series, only the cache holds one entry more.
            is_sql = columns.lengths["db_statement"][rows] >= 0
            sql = np.flatnonzero(is_sql)
            operation[sql] = mix64(db_op[sql] ^ mix64(statement[sql] + _K_SQL))
            with_host = np.flatnonzero(is_http & (error >= 0))
            operation[with_host] ^= mix64(host[with_host] + _K_HOST)
            operation[client] = mix64(operation[client] + _K_CLIENT)
            classes = np.where(error >= 0, client_classes(error, classes, is_sql), classes)
        return mix64(
            mix64(workload ^ _K_OPERATION) ^ operation ^ (classes.astype(np.uint64) * _K_STATUS)
        )

    def resolve(self, columns: SpanColumns, rows: np.ndarray) -> np.ndarray:
        """The series id (int64) of each of `rows` (good rows of `columns`)."""
        if rows.size == 0:
            return np.zeros(0, dtype=np.int64)
        hashes = self.key_hashes(columns, rows)
        distinct, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        cache = self._cache
        if len(cache) + distinct.size > self._cache_limit:
            cache.clear()  # rebuilt from the registry's ids as spans come
        ids = np.empty(distinct.size, dtype=np.int64)
        # In order of first appearance: new series take the cap's free slots first come,
        # first served.
        for i in np.argsort(first, kind="stable").tolist():
            h, row = int(distinct[i]), int(first[i])
            found = cache.get(h)
            if found is None:
                found = self.registry.resolve(series_key_of(columns, int(rows[row])))
                cache[h] = found
            ids[i] = found
        return ids[inverse]
