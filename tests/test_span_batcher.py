"""SpanBatcher: grouping per process, flush on size and age, and the batch codec round trip."""

from __future__ import annotations

import numpy as np
import pytest

from ebpf_apm.producer.event_layout import (
    EVENT_KIND_HTTP_SPAN,
    EVENT_KIND_SPAN,
    HTTP_SPAN_EVENT,
    SPAN_EVENT,
)
from ebpf_apm.producer.span_batcher import ProcessInfo, SpanBatcher
from ebpf_apm.schemas.event_batch import BatchDecodeError, decode_span_batch, iter_events

FUNCS = ["main.a", "main.(*server).handleSleep", "net/http.serverHandler.ServeHTTP"]


def spans(pids: list[int], func_id: int = 1) -> np.ndarray:
    records = np.zeros(len(pids), dtype=SPAN_EVENT)
    records["kind"] = EVENT_KIND_SPAN
    records["size"] = SPAN_EVENT.itemsize
    records["pid"] = pids
    records["start_ns"] = np.arange(len(pids)) * 1000 + 5_000
    records["ts_ns"] = records["start_ns"] + 777
    records["goid"] = np.arange(len(pids)) + 40
    records["tid"] = 7
    records["end_tid"] = 8
    records["func_id"] = func_id
    with_ids(records)
    return records


def with_ids(records: np.ndarray) -> None:
    """Ids as the kernel draws them: a trace id, an own id (never 0), a parent (0: root)."""
    n = len(records)
    records["trace_id"] = np.arange(1, 16 * n + 1, dtype=np.uint64).reshape(n, 16) % 251 + 1
    records["span_id"] = np.arange(n, dtype=np.uint64) + 0x1234_5678_9ABC_0000
    records["parent_span_id"] = np.where(np.arange(n) % 2, records["span_id"] - 1, 0)


def http_records(pid: int, paths: list[bytes], statuses: list[int]) -> np.ndarray:
    records = np.zeros(len(paths), dtype=HTTP_SPAN_EVENT)
    records["kind"] = EVENT_KIND_HTTP_SPAN
    records["size"] = HTTP_SPAN_EVENT.itemsize
    records["pid"] = pid
    records["start_ns"] = 100
    records["ts_ns"] = 600
    records["goid"] = -1
    records["func_id"] = 2
    records["method"] = b"POST"
    records["method_len"] = 4
    records["path"] = paths
    with_ids(records)
    records["path_len"] = [len(p) for p in paths]
    records["status"] = statuses
    return records


def make_batcher(max_events: int = 1000) -> SpanBatcher:
    return SpanBatcher(
        "node-a",
        FUNCS,
        {11: ProcessInfo("/srv/app"), 12: ProcessInfo("/srv/other")},
        boot_to_epoch_ns=1_700_000_000_000_000_000,
        max_events=max_events,
        max_delay_ns=200,
    )


def test_groups_mixed_processes_into_one_batch_each_keyed_node_pid() -> None:
    batcher = make_batcher()
    pids = [11, 12, 11, 11, 12] * 5  # 23 would do too: 25 spans, 15 of pid 11
    assert batcher.add([spans(pids), http_records(11, [], [])], now_ns=0) == []
    assert batcher.due(now_ns=199) == []
    out = {b.key: b for b in batcher.due(now_ns=200)}
    assert set(out) == {b"node-a/11", b"node-a/12"}
    assert out[b"node-a/11"].events == 15 and out[b"node-a/12"].events == 10
    decoded = decode_span_batch(out[b"node-a/11"].value)
    assert decoded.pid == 11 and decoded.exe == "/srv/app" and decoded.funcs == [FUNCS[1]]
    events = list(iter_events(decoded))
    assert len(events) == 15
    first = events[0]
    assert first["func"] == FUNCS[1]
    assert first["duration_ns"] == 777
    assert first["start_ns"] == 1_700_000_000_000_000_000 + 5_000
    assert first["tid"] == 7 and first["end_tid"] == 8 and first["goid"] == 40
    assert "http_method" not in first
    assert batcher.pending_events == 0


def test_full_batches_leave_at_once_and_are_capped() -> None:
    batcher = make_batcher(max_events=10)
    records = spans([11] * 23)
    out = batcher.add([records, http_records(11, [], [])], now_ns=0)
    # Cut as soon as 10 wait, in the order the kernel wrote them: 10, 10, then the rest.
    assert [b.events for b in out] == [10, 10, 3]
    assert all(b.key == b"node-a/11" for b in out)
    starts = [e["start_ns"] for b in out for e in iter_events(decode_span_batch(b.value))]
    assert starts == (records["start_ns"] + 1_700_000_000_000_000_000).tolist()
    assert batcher.pending_events == 0 and batcher.flush_all() == []


def test_http_spans_carry_method_path_status() -> None:
    batcher = make_batcher()
    http = http_records(12, [b"/api/user/7", b"/health", b"/x"], [201, 0, 0x4141])
    batcher.add([spans([]), http], 0)
    (batch,) = batcher.flush_all()
    events = list(iter_events(decode_span_batch(batch.value)))
    assert [e["http_path"] for e in events] == ["/api/user/7", "/health", "/x"]
    assert [e["http_method"] for e in events] == ["POST"] * 3
    # 0 means the handler wrote nothing (net/http sends 200); out of range means unknown.
    assert [e["http_status"] for e in events] == [201, 200, 0]
    assert events[0]["goid"] is None and events[0]["duration_ns"] == 500


def test_truncated_paths_keep_their_first_bytes() -> None:
    batcher = make_batcher()
    path = "/" + "route/" * 21 + "x"  # 128 bytes of ordinary segments (nothing redacted)
    records = http_records(11, [path.encode()], [200])
    records["path_len"] = 300
    batcher.add([spans([]), records], 0)
    (batch,) = batcher.flush_all()
    (event,) = iter_events(decode_span_batch(batch.value))
    assert event["http_path"] == path


def test_paths_are_redacted_before_they_are_encoded() -> None:
    batcher = make_batcher()
    token = "sk_live_4eC39HqLyjWDarjtT1zdp7dc"
    records = http_records(11, [f"/keys/{token}?q=1".encode(), b"/api/user/42"], [200, 200])
    batcher.add([spans([]), records], 0)
    (batch,) = batcher.flush_all()
    assert token.encode() not in batch.value and b"q=1" not in batch.value
    paths = [e["http_path"] for e in iter_events(decode_span_batch(batch.value))]
    assert paths == ["/keys/:redacted", "/api/user/42"]


@pytest.mark.parametrize("garbage", [b"", b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa1v\x02"])
def test_decoder_rejects_malformed_messages(garbage: bytes) -> None:
    with pytest.raises(BatchDecodeError):
        decode_span_batch(garbage)


def test_decoder_checks_column_sizes() -> None:
    import msgpack

    batcher = make_batcher()
    batcher.add([spans([11, 11]), http_records(11, [], [])], 0)
    (batch,) = batcher.flush_all()
    message = msgpack.unpackb(batch.value)
    message["cols"]["goid"] = message["cols"]["goid"][:-1]
    with pytest.raises(BatchDecodeError, match="goid"):
        decode_span_batch(msgpack.packb(message))


def test_function_spans_leave_before_http_spans_whatever_came_first() -> None:
    """A handler's span precedes its request's HTTP span in the topic, even when the
    process's first records were HTTP spans of unprobed handlers."""
    batcher = make_batcher()
    batcher.add([spans([]), http_records(11, [b"/health"], [200])], 0)
    batcher.add([spans([11]), http_records(11, [b"/api"], [200])], 1)
    kinds = [
        "http_method" in next(iter_events(decode_span_batch(b.value))) for b in batcher.flush_all()
    ]
    assert kinds == [False, True]
