"""A message that decodes but cannot be processed is dead-lettered, never stops a service.

The join: a batch that reached the join without the decoder's checks (here built directly,
as the issue's poison was before the checks existed: `k8s` a list) makes `encode_spans`
raise; the join encodes the other parts and dead-letters that part's input message with the
reason. The aggregator: span records with impossible values get a reason each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from join_data import Span, span_batch

from ebpf_apm.consumers.join_service import COPIES, JoinConfig, JoinService
from ebpf_apm.consumers.net_event_store import IoSums
from ebpf_apm.consumers.offset_ledger import InputMessage
from ebpf_apm.consumers.span_columns import check_span_values, decode_spans
from ebpf_apm.consumers.span_joiner import JoinedSpans, JoinSettings
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.schemas.avro_codec import codec
from ebpf_apm.schemas.input_limits import TimeBounds

S = 1_000_000_000
NOW = 1_750_000_000 * S


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def joined(k8s: object, offset: int) -> JoinedSpans:
    batch = span_batch("n", 7, [Span("f", NOW, NOW + 5, tid=1)])
    batch.k8s = k8s  # type: ignore[assignment]
    record = Record("apm.uprobe.events", 3, offset, b"n/7", b"original bytes %d" % offset)
    zeros = np.zeros(1, dtype=np.int64)
    message = InputMessage(offset, 1, None, record)
    return JoinedSpans(batch, np.arange(1), IoSums(zeros, zeros, zeros, zeros), message)


def test_the_join_dead_letters_the_input_of_spans_it_cannot_encode() -> None:
    service = JoinService(JoinConfig(KafkaConnection("127.0.0.1:1"), JoinSettings()))
    good, bad = joined({"k8s_namespace": "ns"}, 10), joined(["a", "b"], 11)
    assert service._encodable([good, bad]) == [good]
    ((letter, message, count),) = service._dead
    assert (letter.key, letter.value, letter.source) == (
        b"n/7",
        b"original bytes 11",
        "apm.uprobe.events/3/11",
    )
    assert letter.reason.startswith("encoding spans failed: AttributeError")
    assert message is bad.token and count == COPIES  # its outputs on both span topics


def test_the_aggregator_rejects_impossible_span_values_with_reasons() -> None:
    span_codec = codec("span.avsc")
    base = {
        "span_id": "0" * 32, "node": "n", "pid": 1, "exe": "/x", "tid": 1, "goid": 1,
        "func": "f", "start_ns": NOW - S, "end_ns": NOW, "duration_ns": S,
        "http_method": None, "http_path": None, "http_status": None,
        "k8s_namespace": None, "k8s_pod": None, "k8s_container": None, "k8s_workload": None,
        "bytes_sent": 0, "bytes_received": 0, "net_sends": 0, "net_recvs": 0,
    }  # fmt: skip
    cases = {
        "good": {},
        "negative duration_ns": {"duration_ns": -1},
        "span starts before the Unix epoch": {"duration_ns": NOW + 1},
        "older than the maximum age": {"end_ns": NOW - 8 * 24 * 3600 * S},
        "allowed clock skew": {"end_ns": NOW + 3600 * S},
        "http_status outside 100..599": {"http_method": "GET", "http_status": 1000},
        "http_path longer than": {"http_method": "GET", "http_path": "/" + "a" * 40_000},
    }
    values = [span_codec.encode({**base, **fields}) for fields in cases.values()]
    columns = decode_spans(values)
    assert not columns.bad.any()
    reasons = check_span_values(columns, NOW, TimeBounds())
    assert sorted(reasons) == list(range(1, len(cases)))
    for row, expected in enumerate(cases):
        if row:
            assert expected in reasons[row], (expected, reasons[row])
