"""Records from the kernel -> one msgpack batch per process, flushed on size or age.

Pure: the caller passes the time, so the flush policy is tested without sleeping. Records of
many processes arrive mixed; they are grouped by pid because a Kafka message carries one
process (its key is node/pid and consumers rely on that partitioning).

Both batchers take what the agent drained from their rings as a list of record arrays, one
per ring, in the order of `RINGS` (`add(drained, now_ns)`): the pipeline treats both record
streams alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ebpf_apm.producer.event_layout import (
    CLIENT_GRPC,
    CLIENT_HOST_MAX,
    CLIENT_HTTP,
    CLIENT_SPAN_EVENT,
    CLIENT_SQL,
    CLIENT_TEXT_MAX,
    DB_SYSTEMS,
    HTTP_PATH_MAX,
    PROTO_GRPC,
)
from ebpf_apm.producer.path_redaction import PathRedactor
from ebpf_apm.producer.sql_sanitizer import sanitize, sql_operation
from ebpf_apm.schemas.event_batch import (
    RPC_STATUS_MAX,
    RPC_STATUS_UNKNOWN,
    SPAN_KIND,
    SPAN_KIND_CLIENT,
    SPAN_KIND_INTERNAL,
    SPAN_KIND_SERVER,
    ClientColumns,
    DbColumns,
    HttpColumns,
    NetBatch,
    RpcColumns,
    SpanBatch,
    SpanIds,
    encode_net_batch,
    encode_span_batch,
)


@dataclass(frozen=True)
class ProcessInfo:
    exe: str
    k8s: dict[str, str | None] | None = None


@dataclass(frozen=True)
class OutgoingBatch:
    key: bytes
    value: bytes
    events: int


@dataclass
class _Pending:
    first_seen_ns: int
    parts: dict[str, list[np.ndarray]] = field(default_factory=dict)
    count: int = 0


def _split_by_pid(records: np.ndarray) -> list[tuple[int, np.ndarray]]:
    if len(records) == 0:
        return []
    pids = records["pid"]
    first = pids[0]
    if (pids == first).all():  # the common case: one busy process
        return [(int(first), records)]
    order = np.argsort(pids, kind="stable")
    ordered = records[order]
    cuts = np.flatnonzero(np.diff(ordered["pid"])) + 1
    return [(int(part["pid"][0]), part) for part in np.split(ordered, cuts)]


def _decode_text(raw: Any, length: int) -> str:
    return bytes(raw[:length]).decode("utf-8", "replace")


def _http_status(raw: int) -> int:
    """0 in the record: the handler wrote nothing, and net/http answers 200 for it. A value
    outside HTTP's range means the writer was not net/http's HTTP/1 response (HTTP/2):
    reported as 0, unknown."""
    if raw == 0:
        return 200
    return raw if 100 <= raw <= 599 else 0


class ProcessBatcher:
    """Accumulates record arrays per process and cuts batches of at most `max_events`.

    Subclasses say how one process's records become one message (`_encode_parts`); this
    class owns grouping and the flush policy (count or age)."""

    # The rings whose records `add` takes, in that order; also the order in which one
    # process's records of each ring are published.
    RINGS: tuple[str, ...] = ()

    def __init__(
        self,
        node: str,
        process_info: Mapping[int, ProcessInfo],
        boot_to_epoch_ns: int,
        max_events: int = 16384,
        max_delay_ns: int = 200_000_000,
    ) -> None:
        self.node = node
        self.process_info = process_info  # shared, maintained by the agent
        self.boot_to_epoch_ns = boot_to_epoch_ns  # kernel times are CLOCK_BOOTTIME
        self.max_events = max_events
        self.max_delay_ns = max_delay_ns
        self._pending: dict[int, _Pending] = {}

    @property
    def pending_events(self) -> int:
        return sum(p.count for p in self._pending.values())

    def has_pending(self, pid: int) -> bool:
        return pid in self._pending

    def add(self, drained: Sequence[np.ndarray], now_ns: int) -> list[OutgoingBatch]:
        """Take new records, one array per ring of `RINGS`; returns the batches that became
        full."""
        if len(drained) != len(self.RINGS):
            raise ValueError(f"expected records of {len(self.RINGS)} rings {self.RINGS}")
        full: list[OutgoingBatch] = []
        for tag, records in zip(self.RINGS, drained, strict=True):
            for pid, part in _split_by_pid(records):
                pending = self._pending.get(pid)
                if pending is None:
                    pending = self._pending[pid] = _Pending(first_seen_ns=now_ns)
                pending.parts.setdefault(tag, []).append(part)
                pending.count += len(part)
                if pending.count >= self.max_events:
                    full.extend(self._cut(pid))
        return full

    def due(self, now_ns: int) -> list[OutgoingBatch]:
        """Batches whose oldest record has waited `max_delay_ns`."""
        waited = [
            pid for pid, p in self._pending.items() if now_ns - p.first_seen_ns >= self.max_delay_ns
        ]
        return [batch for pid in waited for batch in self._cut(pid)]

    def flush_all(self) -> list[OutgoingBatch]:
        return [batch for pid in list(self._pending) for batch in self._cut(pid)]

    def _cut(self, pid: int) -> list[OutgoingBatch]:
        pending = self._pending.pop(pid)
        out = []
        # Fixed order: a request's handler span must not follow its HTTP span in the topic.
        for tag in self.RINGS:
            parts = pending.parts.get(tag)
            if not parts:
                continue
            records = np.concatenate(parts)
            for start in range(0, len(records), self.max_events):
                chunk = records[start : start + self.max_events]
                out.append(
                    OutgoingBatch(
                        key=f"{self.node}/{pid}".encode(),
                        value=self._encode_parts(pid, tag, chunk),
                        events=len(chunk),
                    )
                )
        return out

    def _encode_parts(self, pid: int, tag: str, records: np.ndarray) -> bytes:
        raise NotImplementedError


#: Client records are published in one message per kind of call, so that no message has
#: more parts than a reader accepts (schemas/event_batch.py MAX_CONTAINERS).
CLIENT_TAGS = {CLIENT_HTTP: "client_http", CLIENT_GRPC: "client_grpc", CLIENT_SQL: "client_sql"}


class SpanBatcher(ProcessBatcher):
    """Function spans, server spans (HTTP, gRPC) and client spans (HTTP, gRPC, SQL) ->
    `apm.uprobe.events` batches.

    `add` takes the span, http and client rings' records; the client records are split by
    kind (CLIENT_TAGS), each kind its own messages."""

    RINGS = ("span", "http", *CLIENT_TAGS.values())

    def add(self, drained: Sequence[np.ndarray], now_ns: int) -> list[OutgoingBatch]:
        """Records of the span, http and client rings (the client ring may be left out)."""
        if len(drained) in (2, 3):
            client = drained[2] if len(drained) == 3 else np.empty(0, CLIENT_SPAN_EVENT)
            split = [client[client["client"] == kind] for kind in CLIENT_TAGS]
            drained = [drained[0], drained[1], *split]
        return super().add(drained, now_ns)

    def __init__(
        self,
        node: str,
        function_names: Sequence[str],
        process_info: Mapping[int, ProcessInfo],
        boot_to_epoch_ns: int,
        max_events: int = 16384,
        max_delay_ns: int = 200_000_000,
        redactor: PathRedactor | None = None,
    ) -> None:
        super().__init__(node, process_info, boot_to_epoch_ns, max_events, max_delay_ns)
        self.function_names = function_names  # shared, grows as functions are attached
        # Secrets in paths never leave the node: redacted before the batch is encoded.
        self.redactor = redactor if redactor is not None else PathRedactor()

    def _encode_parts(self, pid: int, tag: str, records: np.ndarray) -> bytes:
        if tag == "http":
            return self._encode(pid, None, records)
        if tag in CLIENT_TAGS.values():
            return self._encode(pid, None, None, records)
        return self._encode(pid, records, None)

    def _encode(
        self,
        pid: int,
        spans: np.ndarray | None,
        http: np.ndarray | None,
        client: np.ndarray | None = None,
    ) -> bytes:
        records = spans if spans is not None else http if http is not None else client
        assert records is not None
        n = len(records)
        func_ids, local_func = np.unique(records["func_id"], return_inverse=True)
        offset = np.int64(self.boot_to_epoch_ns)
        columns = {
            "tid": records["tid"],
            "end_tid": records["end_tid"],
            "goid": records["goid"],
            "func": local_func.astype(np.uint32),
            "start_ns": records["start_ns"].astype(np.int64) + offset,
            "end_ns": records["ts_ns"].astype(np.int64) + offset,
        }
        http_columns = rpc_columns = None
        kinds = np.full(n, SPAN_KIND_INTERNAL, dtype=SPAN_KIND)
        if http is not None:
            # One record type for every server span: gRPC calls carry the full method in
            # `path` and the status code in `status`.
            kinds[:] = SPAN_KIND_SERVER
            is_rpc = http["protocol"] == PROTO_GRPC
            rpc_rows = np.flatnonzero(is_rpc).astype(np.uint32)
            http_rows = np.flatnonzero(~is_rpc).astype(np.uint32)
            if len(http_rows):
                rows = http[http_rows]
                redact = self.redactor.redact
                http_columns = HttpColumns(
                    rows=http_rows,
                    method=[
                        _decode_text(m, int(n_))
                        for m, n_ in zip(rows["method"], rows["method_len"], strict=True)
                    ],
                    path=[
                        redact(_decode_text(p, min(int(n_), HTTP_PATH_MAX)))
                        for p, n_ in zip(rows["path"], rows["path_len"], strict=True)
                    ],
                    status=np.array(
                        [_http_status(int(s)) for s in rows["status"]], dtype=np.uint16
                    ),
                    flushed_ns=np.where(
                        rows["flushed_ns"] > 0, rows["flushed_ns"].astype(np.int64) + offset, 0
                    ),
                )
            if len(rpc_rows):
                rows = http[rpc_rows]
                codes = rows["status"]
                rpc_columns = RpcColumns(
                    rows=rpc_rows,
                    method=[
                        _decode_text(p, min(int(n_), HTTP_PATH_MAX))
                        for p, n_ in zip(rows["path"], rows["path_len"], strict=True)
                    ],
                    status=np.where(codes <= RPC_STATUS_MAX, codes, RPC_STATUS_UNKNOWN).astype(
                        np.uint8
                    ),
                )
        client_columns = db_columns = None
        if client is not None:
            kinds[:] = SPAN_KIND_CLIENT
            http_columns, rpc_columns, client_columns, db_columns = self._client_parts(client)
        info = self.process_info.get(pid, ProcessInfo(exe=""))
        batch = SpanBatch(
            node=self.node,
            pid=pid,
            exe=info.exe,
            funcs=[self.function_names[int(i)] for i in func_ids],
            columns=columns,
            http=http_columns,
            k8s=info.k8s,
            rpc=rpc_columns,
            span_kind=kinds,
            client=client_columns,
            db=db_columns,
            ids=SpanIds(
                trace_id=records["trace_id"],
                span_id=records["span_id"],
                parent_span_id=records["parent_span_id"],
            ),
        )
        return encode_span_batch(batch)

    def _client_parts(
        self, client: np.ndarray
    ) -> tuple[HttpColumns | None, RpcColumns | None, ClientColumns, DbColumns | None]:
        """The parts of one kind of client records (all HTTP, all gRPC or all SQL)."""
        n = len(client)
        rows = np.arange(n, dtype=np.uint32)
        error = client["error"].astype(np.uint8)
        text = [
            _decode_text(t, min(int(n_), CLIENT_TEXT_MAX))
            for t, n_ in zip(client["text"], client["text_len"], strict=True)
        ]
        kind = int(client["client"][0]) if n else CLIENT_HTTP
        http = rpc = db = None
        host = None
        if kind == CLIENT_HTTP:
            host = [
                _decode_text(h, min(int(n_), CLIENT_HOST_MAX))
                for h, n_ in zip(client["host"], client["host_len"], strict=True)
            ]
            status = client["status"]
            http = HttpColumns(
                rows=rows,
                method=[
                    _decode_text(m, int(n_))
                    for m, n_ in zip(client["method"], client["method_len"], strict=True)
                ],
                path=[self.redactor.redact(p) for p in text],
                # a transport error (or a status outside HTTP's range) is 0
                status=np.where((status >= 100) & (status <= 599) & (error == 0), status, 0)
                .astype(np.uint16),
            )  # fmt: skip
        elif kind == CLIENT_GRPC:
            codes = client["status"]
            known = (codes >= 0) & (codes <= RPC_STATUS_MAX)
            rpc = RpcColumns(
                rows=rows,
                method=text,
                status=np.where(known, codes, RPC_STATUS_UNKNOWN).astype(np.uint8),
            )
        else:
            systems = [DB_SYSTEMS[s] if s < len(DB_SYSTEMS) else "" for s in client["db_system"]]
            # Literals never leave the node: sanitized here, before the batch is encoded.
            statements = [sanitize(t, system) for t, system in zip(text, systems, strict=True)]
            db = DbColumns(
                rows=rows,
                system=systems,
                operation=[sql_operation(s) for s in statements],
                statement=statements,
            )
        client_columns = ClientColumns(rows=rows, host=host, error=error)
        if client["peer_family"].any():
            client_columns.peer_family = client["peer_family"].astype(np.uint8)
            client_columns.peer_addr = client["peer_addr"]
            client_columns.peer_port = client["peer_port"]
        return http, rpc, client_columns, db


class NetBatcher(ProcessBatcher):
    """Socket sends and receives -> `apm.kprobe.events` batches."""

    RINGS = ("net",)

    def _encode_parts(self, pid: int, tag: str, records: np.ndarray) -> bytes:
        info = self.process_info.get(pid, ProcessInfo(exe=""))
        columns = {
            "tid": records["tid"],
            "goid": records["goid"],
            "ts_ns": records["ts_ns"].astype(np.int64) + np.int64(self.boot_to_epoch_ns),
            "bytes": records["bytes"],
            "direction": records["direction"],
            "family": records["family"],
            "sport": records["sport"],
            "dport": records["dport"],
            "saddr": records["saddr"],
            "daddr": records["daddr"],
        }
        batch = NetBatch(node=self.node, pid=pid, exe=info.exe, columns=columns, k8s=info.k8s)
        return encode_net_batch(batch)
