"""Kafka test helpers: a real (Tansu) broker per session, and read-back helpers.

Import the fixtures where they are needed (`from kafka_fixtures import kafka_broker`), or
from tests/conftest.py to share them with every module.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from ebpf_apm.kafka.embedded_broker import EmbeddedBroker
from ebpf_apm.schemas.event_batch import HttpColumns, SpanBatch


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[EmbeddedBroker]:
    """One broker for the session; give each test its own topic (see `unique_topic`)."""
    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture
def fresh_kafka_broker() -> Iterator[EmbeddedBroker]:
    """An empty broker for one test (it starts in milliseconds), for fixed topic names."""
    with EmbeddedBroker() as broker:
        yield broker


def unique_topic(prefix: str = "test") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:10]}"


def span_batch(
    node: str,
    pid: int,
    spans: list[tuple[str, int, int]],
    http: dict[int, tuple[str, str, int]] | None = None,
    k8s: dict[str, str | None] | None = None,
) -> SpanBatch:
    """A batch from (func, start_ns, duration_ns) triples; `http` maps span index -> request."""
    funcs = sorted({func for func, _, _ in spans})
    n = len(spans)
    columns: dict[str, np.ndarray] = {
        "tid": np.arange(pid, pid + n, dtype=np.uint32),
        "end_tid": np.arange(pid, pid + n, dtype=np.uint32),
        "goid": np.array([i + 1 if i % 2 else -1 for i in range(n)], dtype=np.int64),
        "func": np.array([funcs.index(func) for func, _, _ in spans], dtype=np.uint32),
        "start_ns": np.array([start for _, start, _ in spans], dtype=np.int64),
        "end_ns": np.array([start + dur for _, start, dur in spans], dtype=np.int64),
    }
    http_columns = None
    if http:
        rows = sorted(http)
        http_columns = HttpColumns(
            rows=np.array(rows, dtype=np.uint32),
            method=[http[r][0] for r in rows],
            path=[http[r][1] for r in rows],
            status=np.array([http[r][2] for r in rows], dtype=np.uint16),
        )
    return SpanBatch(
        node=node,
        pid=pid,
        exe=f"/srv/app-{pid}",
        funcs=funcs,
        columns=columns,
        http=http_columns,
        k8s=k8s,
    )


async def topic_partitions(
    consumer: AIOKafkaConsumer, topic: str, timeout_s: float = 10.0
) -> list[TopicPartition]:
    """The topic's partitions, without naming it in a metadata request (Tansu would create it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        if topic in await consumer.topics():
            partitions = consumer.partitions_for_topic(topic)
            if partitions:
                return [TopicPartition(topic, p) for p in sorted(partitions)]
        if loop.time() > deadline:
            raise AssertionError(f"topic {topic!r} did not appear within {timeout_s} s")
        await asyncio.sleep(0.05)


async def read_topic(
    bootstrap_servers: str, topic: str, expected: int, timeout_s: float = 15.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of the topic from the beginning: waits for `expected`, then a little more
    so that duplicates or surplus messages show up in the count."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers, enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    try:
        partitions = await topic_partitions(consumer, topic)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[ConsumerRecord[bytes, bytes]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(records) < expected and loop.time() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
        for batch in (await consumer.getmany(timeout_ms=300)).values():
            records.extend(batch)
        return records
    finally:
        await consumer.stop()
