"""apm.span.batches messages: sliced back into the very span records they carry, broken
batches named, and the aggregator's use of them (every good span counted, bad messages
dead-lettered with a reason)."""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
from test_span_columns import random_span

from ebpf_apm.consumers.aggregate_service import AggregateConfig, AggregateService
from ebpf_apm.consumers.latency_store import open_store
from ebpf_apm.consumers.span_batch import encode_batch, slice_messages, workload_of
from ebpf_apm.consumers.span_columns import decode_slices, decode_spans, padded
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.schemas.avro_codec import codec

SPAN = codec("span.avsc")
S = 1_000_000_000


def test_batches_and_plain_records_slice_into_the_same_columns() -> None:
    rng = random.Random(3)
    values = [SPAN.encode(random_span(rng)) for _ in range(300)]
    messages = [encode_batch(values[:100]), values[100], encode_batch(values[101:300]), b""]
    slices = slice_messages([*messages[:3], encode_batch([])])
    assert slices.problems == {}
    assert slices.message.tolist() == [0] * 100 + [1] + [2] * 199
    together = decode_slices(padded(slices.buf), slices.starts, slices.sizes)
    alone = decode_spans(values)
    assert not together.bad.any()
    for name in alone.ints:
        assert np.array_equal(together.ints[name], alone.ints[name])
    for name in alone.lengths:
        assert [together.text(name, i) for i in range(300)] == [
            alone.text(name, i) for i in range(300)
        ]


def test_broken_batches_are_one_bad_entry_each_with_the_reason() -> None:
    good = SPAN.encode(random_span(random.Random(5)))
    whole = encode_batch([good, good])
    truncated = whole[:-3]
    short_head = whole[:7]
    slices = slice_messages([truncated, short_head, whole])
    assert slices.message.tolist() == [0, 1, 2, 2]
    assert slices.sizes.tolist()[:2] == [-1, -1]
    assert "sizes add up to" in slices.problems[0]
    assert "truncated" in slices.problems[1]
    columns = decode_slices(padded(slices.buf), slices.starts, slices.sizes)
    assert columns.bad.tolist() == [True, True, False, False]


def test_workload_is_the_series_workload() -> None:
    assert workload_of("shop", "api", "/srv/bin/app") == "shop/api"
    assert workload_of(None, "api", "/srv/bin/app") == "api"
    assert workload_of(None, None, "/srv/bin/app") == "app"
    assert workload_of(None, None, "") == "unknown"


def span(end_ns: int, duration_ns: int, exe: str = "/bin/app") -> bytes:
    record = random_span(random.Random(end_ns))
    record.update(
        end_ns=end_ns, duration_ns=duration_ns, start_ns=end_ns - duration_ns, exe=exe,
        http_method=None, http_path=None, http_status=None, k8s_workload=None,
        k8s_namespace=None, func="main.work",
    )  # fmt: skip
    value: bytes = SPAN.encode(record)
    return value


def test_the_aggregator_counts_every_good_span_and_names_bad_messages(tmp_path: object) -> None:
    now = time.time_ns()
    t0 = now - 60 * S
    good = [span(t0 + i * 1000, 1000 + i) for i in range(50)]
    negative = span(t0, -5)
    values: list[bytes | None] = [
        encode_batch(good[:20]),
        encode_batch([*good[20:40], negative]),  # one bad span: the batch is dead-lettered
        encode_batch(good[40:])[:-1],  # truncated: nothing of it is counted
    ]

    async def run() -> tuple[dict[int, str], int]:
        config = AggregateConfig(KafkaConnection("unused:9092"), "sqlite:///:memory:")
        store = await open_store(config.storage)
        service = await AggregateService.resume(config, store)
        await service.load(3)
        partitions = np.full(3, 3, dtype=np.int64)
        bad = service.add_spans(values, partitions, partitions, np.arange(3), now)
        await store.close()
        return bad, service.stats.spans

    bad, counted = asyncio.run(run())
    assert sorted(bad) == [1, 2]
    assert "negative duration_ns" in bad[1] and bad[1].startswith("a span of the batch")
    assert "truncated" in bad[2] or "add up to" in bad[2]
    assert counted == 40
