"""The msgpack batch formats of `apm.uprobe.events` and `apm.kprobe.events` (schemas/*.md).

One Kafka message carries many spans of one process, stored column by column: each numeric
column is one little-endian byte string, so the agent encodes a batch with a handful of numpy
calls and a consumer decodes it into arrays without a Python call per span. `iter_events`
turns a batch back into one dict per span, the shape `ebpf-apm tail --json` prints.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

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


class BatchDecodeError(ValueError):
    """A message on an event topic is not a batch this version can read."""


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
class SpanBatch:
    node: str
    pid: int
    exe: str
    funcs: list[str]
    columns: dict[str, np.ndarray]
    http: HttpColumns | None = None
    k8s: dict[str, str | None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

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
    try:
        message = msgpack.unpackb(value, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BatchDecodeError(f"not msgpack: {exc}") from exc
    if not isinstance(message, dict):
        raise BatchDecodeError(f"expected a msgpack map, got {type(message).__name__}")
    known = (kind,) if kind else (KIND_SPAN, KIND_NET)
    if message.get("v") != FORMAT_VERSION or message.get("kind") not in known:
        raise BatchDecodeError(
            f"unsupported batch v={message.get('v')!r} kind={message.get('kind')!r}; "
            f"this reader knows v={FORMAT_VERSION} kind in {known}"
        )
    return message


def decode_span_batch(value: bytes) -> SpanBatch:
    """Parse one message value; every size is checked before it is trusted."""
    message = _unpack(value, KIND_SPAN)
    try:
        n = int(message["n"])
        raw_cols = message["cols"]
        columns = {
            name: _column(raw_cols.get(name), dtype, n, name)
            for name, dtype in SPAN_COLUMNS.items()
        }
        funcs = [str(f) for f in message["funcs"]]
        if n and int(columns["func"].max()) >= len(funcs):
            raise BatchDecodeError("func index outside the batch's function table")
        http = None
        if "http" in message:
            h = message["http"]
            rows = np.frombuffer(h["row"], dtype=HTTP_ROW)
            m = len(rows)
            http = HttpColumns(
                rows=rows,
                method=list(h["method"]),
                path=list(h["path"]),
                status=_column(h["status"], HTTP_STATUS, m, "http.status"),
                flushed_ns=(
                    _column(h["flushed_ns"], HTTP_FLUSHED, m, "http.flushed_ns")
                    if "flushed_ns" in h
                    else None
                ),
            )
            if len(http.method) != m or len(http.path) != m or (m and int(rows.max()) >= n):
                raise BatchDecodeError("http columns do not match the batch's spans")
        return SpanBatch(
            node=str(message["node"]),
            pid=int(message["pid"]),
            exe=str(message.get("exe", "")),
            funcs=funcs,
            columns=columns,
            http=http,
            k8s=message.get("k8s"),
        )
    except BatchDecodeError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BatchDecodeError(f"malformed span batch: {exc!r}") from exc


K8S_FIELDS = ("k8s_namespace", "k8s_pod", "k8s_container", "k8s_workload")


def iter_events(batch: SpanBatch) -> Iterator[dict[str, Any]]:
    """One dict per span, with the fields `ebpf-apm tail --json` promises."""
    cols = {name: column.tolist() for name, column in batch.columns.items()}
    http_at: dict[int, int] = {}
    if batch.http is not None:
        http_at = {row: i for i, row in enumerate(batch.http.rows.tolist())}
    k8s = batch.k8s or {}
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
        }
        j = http_at.get(i)
        if j is not None and batch.http is not None:
            event["http_method"] = batch.http.method[j]
            event["http_path"] = batch.http.path[j]
            event["http_status"] = int(batch.http.status[j])
            flushed = 0 if batch.http.flushed_ns is None else int(batch.http.flushed_ns[j])
            event["http_flushed_ns"] = flushed or None
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
    message = _unpack(value, KIND_NET)
    try:
        n = int(message["n"])
        raw_cols = message["cols"]
        columns = {
            name: _column(raw_cols.get(name), dtype, n, name) for name, dtype in NET_COLUMNS.items()
        }
        if n and int(columns["direction"].max()) > DIRECTION_RECV:
            raise BatchDecodeError("direction outside send/recv")
        return NetBatch(
            node=str(message["node"]),
            pid=int(message["pid"]),
            exe=str(message.get("exe", "")),
            columns=columns,
            k8s=message.get("k8s"),
        )
    except BatchDecodeError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BatchDecodeError(f"malformed net batch: {exc!r}") from exc


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
