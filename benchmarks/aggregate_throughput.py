"""Spans per second through the aggregator into storage, in one process.

The path measured is the service's own (AggregateService.add_spans, rows_of, encode, write):
apm.spans message values -> columnar Avro decode -> series ids (route templating, cap) ->
windows and sketches -> closed windows -> apm.latency Avro records and SQLite rows (WAL,
synchronous=FULL), with the Kafka client left out. Beside it, from the same run: the same
decoding done per message with fastavro (the baseline the columnar reader replaces), and
the stages on their own.

Input: a busy cluster's mix for 4 workloads: half HTTP spans over 8 routes with ids in the
paths (most paths distinct) and 3 status classes, half function spans over 12 functions
(144 series), lognormal durations, 25,000 spans per second of event time in 10 s windows.
Messages are encoded once with fastavro (the real codec) before the clock starts.

    .venv/bin/python benchmarks/aggregate_throughput.py [--spans 1000000] [--fetch 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from typing import Any

import numpy as np
import uvloop
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ebpf_apm.consumers.aggregate_service import (
    DECODE_CHUNK,
    SHARED,
    AggregateConfig,
    AggregateService,
)
from ebpf_apm.consumers.latency_store import open_store
from ebpf_apm.consumers.route_template import SeriesRegistry
from ebpf_apm.consumers.series_resolver import SeriesResolver
from ebpf_apm.consumers.span_columns import decode_spans
from ebpf_apm.kafka import topics
from ebpf_apm.kafka.admin import ensure_topics
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.embedded_broker import EmbeddedBroker
from ebpf_apm.schemas.avro_codec import codec

ROUTES = [
    ("GET", "/api/user/{}"),
    ("GET", "/api/user/{}/orders"),
    ("POST", "/api/order"),
    ("GET", "/api/order/{}"),
    ("DELETE", "/api/cart/{}/item/{}"),
    ("GET", "/health"),
    ("GET", "/static/app.js"),
    ("PUT", "/api/user/{}/avatar"),
]
FUNCS = [
    f"main.(*service{i % 3}).handle{name}"
    for i, name in enumerate(
        [
            "GetUser",
            "ListOrders",
            "CreateOrder",
            "GetOrder",
            "DeleteItem",
            "Health",
            "Static",
            "Avatar",
            "Auth",
            "Session",
            "Cache",
            "Query",
        ]
    )
]
WORKLOADS = [("shop", "api"), ("shop", "cart"), (None, None), ("billing", "invoices")]
T0 = 1_750_000_000_000_000_000
SPANS_PER_SECOND = 25_000
WINDOW_NS = 10_000_000_000


def make_messages(n: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    durations = np.round(nrng.lognormal(np.log(3e6), 1.2, n)).astype(np.int64) + 1
    span_codec = codec("span.avsc")
    out = []
    for i in range(n):
        namespace, workload = WORKLOADS[i % len(WORKLOADS)]
        http = rng.random() < 0.5
        method, template = ROUTES[rng.randrange(len(ROUTES))]
        end = T0 + i * (1_000_000_000 // SPANS_PER_SECOND)
        duration = int(durations[i])
        path = template.format(*(rng.randrange(1, 10**7) for _ in range(template.count("{}"))))
        out.append(
            span_codec.encode(
                {
                    "span_id": f"{rng.getrandbits(128):032x}",
                    "node": f"node-{i % 7}",
                    "pid": 1000 + i % 13,
                    "exe": f"/srv/bin/app{i % 4}",
                    "tid": 2000 + i % 50,
                    "goid": rng.randrange(1, 10**6),
                    "func": "net/http.serverHandler.ServeHTTP"
                    if http
                    else FUNCS[rng.randrange(len(FUNCS))],
                    "start_ns": end - duration,
                    "end_ns": end,
                    "duration_ns": duration,
                    "http_method": method if http else None,
                    "http_path": path if http else None,
                    "http_status": rng.choice((200, 200, 200, 201, 404, 500)) if http else None,
                    "k8s_namespace": namespace,
                    "k8s_pod": f"{workload}-7d9f-x2" if workload else None,
                    "k8s_container": workload,
                    "k8s_workload": workload,
                    "bytes_sent": rng.randrange(10**5),
                    "bytes_received": rng.randrange(10**4),
                    "net_sends": rng.randrange(5),
                    "net_recvs": rng.randrange(5),
                }
            )
        )
    return out


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:>12,.0f} spans/s"


async def full_path(messages: list[bytes], fetch: int, db: str) -> tuple[float, int, int]:
    """Decode -> aggregate -> store, fetch by fetch as the service does; (s, rows, writes)."""
    config = AggregateConfig(
        connection=KafkaConnection("unused:9092"),
        storage=f"sqlite:///{db}",
        window_ns=WINDOW_NS,
        lateness_ns=WINDOW_NS // 2,
        idle_timeout_ns=1_000_000_000,
    )
    store = await open_store(config.storage)
    service = await AggregateService.resume(config, store)
    aggregator = await service.load(SHARED)
    partitions = np.zeros(fetch, dtype=np.int64)
    shards = np.full(fetch, SHARED, dtype=np.int64)
    rows = writes = 0
    start = time.perf_counter()
    for first in range(0, len(messages), fetch):
        values = messages[first : first + fetch]
        offsets = np.arange(first, first + len(values), dtype=np.int64)
        n = len(values)
        service.add_spans(values, shards[:n], partitions[:n], offsets, now_ns=time.time_ns())
        closed = aggregator.close_ready()
        if closed:
            out = service.rows_of(closed)
            for row in out:
                service.encode(row)  # the apm.latency message (not sent: no Kafka here)
            await service.write(out, SHARED, aggregator)
            rows, writes = rows + len(out), writes + 1
    aggregator.advance_idle(time.time_ns() + 3_600_000_000_000)  # input ends: close all
    closed = aggregator.close_ready()
    out = service.rows_of(closed)
    await service.write(out, SHARED, aggregator)
    elapsed = time.perf_counter() - start
    await store.close()
    stats = service.stats
    assert stats.spans == len(messages), stats  # none late, none from the future
    return elapsed, rows + len(out), writes + 1


async def consume_only(bootstrap: str, topic: str, count: int) -> float:
    """Seconds for a bare aiokafka consumer to receive `count` records (no processing)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        start, received = time.perf_counter(), 0
        while received < count:
            batches = await consumer.getmany(timeout_ms=200)
            received += sum(len(records) for records in batches.values())
        return time.perf_counter() - start
    finally:
        await consumer.stop()


async def through_kafka(messages: list[bytes], db: str) -> tuple[float, float, int]:
    """The whole service on an embedded broker: (seconds for a bare consumer to read the
    spans, seconds from the service's first fetch until every span is aggregated and every
    window stored, rows)."""
    with EmbeddedBroker() as broker:
        topic = topics.SPANS  # the service's default input topic
        await ensure_topics(KafkaConnection(broker.bootstrap_servers), {topic: 6})
        producer = AIOKafkaProducer(
            bootstrap_servers=broker.bootstrap_servers,
            linger_ms=20,
            max_batch_size=1 << 20,
            enable_idempotence=False,
        )
        await producer.start()
        futures = [
            await producer.send(topic, m, key=f"node-{i % 7}/{i % 13}".encode())
            for i, m in enumerate(messages)
        ]
        await asyncio.gather(*futures)
        await producer.stop()
        bare = await consume_only(broker.bootstrap_servers, topic, len(messages))
        config = AggregateConfig(
            connection=KafkaConnection(broker.bootstrap_servers),
            storage=f"sqlite:///{db}",
            window_ns=WINDOW_NS,
            lateness_ns=WINDOW_NS // 2,
            idle_timeout_ns=10**12,
            spans_topic=topic,
        )
        store = await open_store(config.storage)
        service = await AggregateService.resume(config, store)
        await service.start()
        stop = asyncio.Event()
        started: list[float] = []
        real_ingest = service.ingest

        async def ingest(batches: Any, now_ns: int) -> None:
            if not started:
                started.append(time.perf_counter())
            await real_ingest(batches, now_ns)

        service.ingest = ingest  # type: ignore[method-assign]
        task = asyncio.create_task(service.loop(stop))
        while service.stats.spans < len(messages):
            await asyncio.sleep(0.001)
        # The input ends: instead of waiting for the idle timeout, end the windows now (the
        # service's loop publishes, stores and commits them).
        service.advance_idle(time.time_ns() + 3_600_000_000_000)
        while service.open_windows or not service.writes:
            await asyncio.sleep(0.001)
        elapsed = time.perf_counter() - started[0]
        stop.set()
        await task
        rows = len(await store.rows(0, 2**62))
        await service.close()
        await store.close()
        return bare, elapsed, rows


def best_of(runs: int, fn: object) -> float:
    assert callable(fn)
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=1_000_000)
    parser.add_argument("--fetch", type=int, default=20_000, help="spans per Kafka fetch")
    parser.add_argument("--runs", type=int, default=3, help="best of N for the full path")
    parser.add_argument(
        "--kafka",
        type=int,
        default=200_000,
        metavar="N",
        help="also run the service through an embedded broker on N spans (0: skip)",
    )
    args = parser.parse_args()

    prep = time.perf_counter()
    messages = make_messages(args.spans)
    size = sum(map(len, messages)) / len(messages)
    print(
        f"input: {args.spans:,} apm.spans messages ({size:.0f} bytes on average), encoded "
        f"with fastavro in {time.perf_counter() - prep:.1f} s; {os.cpu_count()} CPUs"
    )

    sample = messages[:20_000]
    span_codec = codec("span.avsc")
    fastavro_s = best_of(2, lambda: [span_codec.decode(m) for m in sample])
    columnar_s = best_of(
        3,
        lambda: [
            decode_spans(sample[i : i + DECODE_CHUNK]) for i in range(0, len(sample), DECODE_CHUNK)
        ],
    )
    resolver = SeriesResolver(SeriesRegistry(500))

    def decode_and_resolve() -> None:
        for i in range(0, len(sample), DECODE_CHUNK):
            columns = decode_spans(sample[i : i + DECODE_CHUNK])
            resolver.resolve(columns, np.flatnonzero(~columns.bad))

    resolve_s = best_of(3, decode_and_resolve)
    print("stages, on 20,000 messages (best of 3):")
    print(f"  baseline: fastavro per message           {rate(len(sample), fastavro_s)}")
    print(f"  columnar decode                          {rate(len(sample), columnar_s)}")
    print(f"  columnar decode + series ids             {rate(len(sample), resolve_s)}")

    best = float("inf")
    with tempfile.TemporaryDirectory(prefix="apm-bench-") as tmp:
        for run in range(args.runs):
            seconds, rows, writes = asyncio.run(
                full_path(messages, args.fetch, os.path.join(tmp, f"run{run}.sqlite"))
            )
            best = min(best, seconds)
    print(
        f"full path: decode -> aggregate -> apm.latency records + SQLite rows, "
        f"{args.fetch:,} spans per fetch, best of {args.runs}:"
    )
    print(
        f"  {args.spans:,} spans -> {rows:,} rows in {writes} writes: {best:.2f} s "
        f"= {rate(args.spans, best)}"
    )
    if args.kafka:
        kafka_input = messages[: args.kafka]
        with tempfile.TemporaryDirectory(prefix="apm-bench-") as tmp:
            bare, seconds, krows = uvloop.run(
                through_kafka(kafka_input, os.path.join(tmp, "k.sqlite"))
            )
        print(
            f"baseline: a bare aiokafka consumer reading them (no processing): "
            f"{rate(len(kafka_input), bare)}"
        )
        print(
            f"through Kafka: embedded Tansu broker, the service's consumer (aiokafka) in this "
            f"process, {len(kafka_input):,} spans -> {krows} rows: {seconds:.2f} s = "
            f"{rate(len(kafka_input), seconds)}"
        )
    print(
        f"aggregator throughput: {args.spans / best:,.0f} spans/s per process "
        f"(target 500,000; fastavro decoding alone: {len(sample) / fastavro_s:,.0f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
