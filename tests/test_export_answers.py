"""What `ebpf-apm export` does with each kind of collector answer, against a real broker and
a real OTLP/HTTP endpoint whose answers the test scripts (tests/otlp_collector.TraceSink):

- 503 (Retry-After), 429, 502: the batch is sent again, Retry-After is waited, every span
  arrives once, and the offsets are committed only then;
- 400: the batch's messages go to apm.deadletter unchanged with the collector's answer as
  the reason, and are committed;
- 401: the service stops with an error and commits nothing;
- partial success: counted; headers and gzip as OTEL_EXPORTER_OTLP_* ask;
- undecodable messages: dead-lettered beside the exported spans;
- grpc to a collector that is not there yet (UNAVAILABLE): retried until it starts (rotel).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from kafka_fixtures import read_topic, topic_partitions, unique_topic
from otlp_collector import Answer, Rotel, TraceSink

from ebpf_apm.consumers.export_service import ExportConfig, ExportRefusedError, ExportService
from ebpf_apm.consumers.otlp_client import new_client
from ebpf_apm.consumers.otlp_settings import resolve
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.embedded_broker import EmbeddedBroker
from ebpf_apm.schemas.avro_codec import codec

pytestmark = pytest.mark.integration

SPANS = 23


def span_record(i: int) -> dict[str, Any]:
    start = 1_700_000_000_000_000_000 + i * 1_000_000
    return {
        "span_id": f"{i + 1:016x}" * 2, "node": "node-a", "pid": 4000 + i % 2, "exe": "/srv/shop",
        "tid": 7, "goid": i, "func": "net/http.serverHandler.ServeHTTP", "start_ns": start,
        "end_ns": start + 5_000, "duration_ns": 5_000, "http_method": "GET",
        "http_path": f"/item/{i}", "http_status": 200, "k8s_namespace": None, "k8s_pod": None,
        "k8s_container": None, "k8s_workload": None, "bytes_sent": 10, "bytes_received": 20,
        "net_sends": 1, "net_recvs": 1,
    }  # fmt: skip


async def publish(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i, value in enumerate(values):
            await producer.send_and_wait(topic, value, key=f"node-a/{4000 + i % 2}".encode())
    finally:
        await producer.stop()


def config(bootstrap: str, topic: str, sink: TraceSink, group: str, **extra: Any) -> ExportConfig:
    return ExportConfig(
        connection=KafkaConnection(bootstrap),
        otlp=resolve(endpoint=sink.url, environ={}),
        group=group,
        spans_topic=topic,
        deadletter_topic=f"{topic}.dead",
        max_batch_spans=100,
        max_batch_delay_s=0.2,
        retry_initial_s=0.05,
        retry_max_s=0.2,
        session_timeout_ms=6000,
        **extra,
    )


async def run_until(service: ExportService, done: Any, timeout_s: float = 30) -> None:
    """Run the service until done() is true (then stop it), or fail after timeout_s."""
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    deadline = time.monotonic() + timeout_s
    try:
        while not done():
            if task.done():
                await task  # raises what the service raised
                raise AssertionError("the service stopped by itself")
            assert time.monotonic() < deadline, f"timed out; counts {service.counts}"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task


async def committed(bootstrap: str, group: str, topic: str) -> int:
    """The group's committed offsets on the topic, summed: how many messages it is past."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        partitions = await topic_partitions(consumer, topic)
        return sum([await consumer.committed(tp) or 0 for tp in partitions])
    finally:
        await consumer.stop()


@pytest.fixture
def spans_topic(kafka_broker: EmbeddedBroker) -> str:
    topic = unique_topic("spans")
    values = [codec("span.avsc").encode(span_record(i)) for i in range(SPANS)]
    asyncio.run(publish(kafka_broker.bootstrap_servers, topic, values))
    return topic


def test_retryable_answers_are_retried_with_retry_after_and_committed_after(
    kafka_broker: EmbeddedBroker, spans_topic: str
) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    with TraceSink() as sink:
        sink.script = [
            Answer(503, {"Retry-After": "1"}, b"busy"),
            Answer(429, {}, b"slow down"),
            Answer(502, {}, b"bad gateway"),
        ]
        service = ExportService(
            config(bootstrap, spans_topic, sink, "g-retry"), new_client(resolve(endpoint=sink.url))
        )
        started = time.monotonic()
        asyncio.run(run_until(service, lambda: sink.count() >= SPANS))
        elapsed = time.monotonic() - started
        assert sink.count() == SPANS
        assert sorted(r.span.span_id.hex() for r in sink.spans) == sorted(
            f"{i + 1:016x}" for i in range(SPANS)
        )
        assert service.counts.retries == 3
        assert service.counts.exported == SPANS
        assert sink.requests == 4
        # The same counts as the metrics endpoint exposes them.
        metrics = service.telemetry.server.registry
        assert metrics.get_sample_value(
            "ebpf_apm_export_spans_total", {"outcome": "exported"}
        ) == SPANS
        assert metrics.get_sample_value("ebpf_apm_export_requests_total") == 4
        assert metrics.get_sample_value(
            "ebpf_apm_consumer_records_total",
            {"service": "export", "topic": spans_topic, "outcome": "read"},
        ) == SPANS
        assert elapsed >= 1.0, "Retry-After: 1 was not waited"

        assert asyncio.run(committed(bootstrap, "g-retry", spans_topic)) == SPANS


def test_a_rejected_batch_is_dead_lettered_and_committed(
    kafka_broker: EmbeddedBroker, spans_topic: str
) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    garbage = b"\xc3\x01not a span"
    asyncio.run(publish(bootstrap, spans_topic, [garbage]))
    with TraceSink() as sink:
        sink.script = [Answer(400, {}, b"span.name missing")]
        service = ExportService(
            config(bootstrap, spans_topic, sink, "g-400"), new_client(resolve(endpoint=sink.url))
        )
        asyncio.run(
            run_until(
                service,
                lambda: (
                    service.counts.rejected + service.counts.exported >= SPANS
                    and service.counts.undecodable == 1
                ),
            )
        )  # noqa: E501
    assert asyncio.run(committed(bootstrap, "g-400", spans_topic)) == SPANS + 1
    letters = asyncio.run(read_topic(bootstrap, f"{spans_topic}.dead", SPANS + 1))
    reasons = [dict(r.headers)["reason"].decode() for r in letters]
    rejected = [r for r in reasons if "rejected the batch: HTTP 400: span.name missing" in r]
    # The batch that met the 400 is dead-lettered whole; later batches (none here: one batch
    # of 23) would be exported.
    assert len(rejected) == service.counts.rejected
    assert service.counts.rejected + service.counts.exported == SPANS
    assert sum(r.startswith("span: ") for r in reasons) == 1
    assert garbage in {r.value for r in letters}
    assert {r.value for r in letters} - {garbage} <= {
        codec("span.avsc").encode(span_record(i)) for i in range(SPANS)
    }


def test_a_refusing_collector_stops_the_service_and_nothing_is_committed(
    kafka_broker: EmbeddedBroker, spans_topic: str
) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    with TraceSink() as sink:
        sink.script = [Answer(401, {}, b"no token")]
        service = ExportService(
            config(bootstrap, spans_topic, sink, "g-401"), new_client(resolve(endpoint=sink.url))
        )
        with pytest.raises(ExportRefusedError, match=r"HTTP 401: no token.*HEADERS"):
            asyncio.run(run_until(service, lambda: False))
        assert sink.count() == 0
        assert asyncio.run(committed(bootstrap, "g-401", spans_topic)) == 0
        sink.partial_rejected = 2
        # (Another group: a member of the first one would wait for the group to settle.)
        # Headers and gzip from the standard environment this time.
        settings = resolve(
            endpoint=sink.url,
            environ={
                "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20t0ken",
                "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip",
            },
        )
        again = ExportService(
            replace(config(bootstrap, spans_topic, sink, "g-partial"), otlp=settings),
            new_client(settings),
        )
        asyncio.run(run_until(again, lambda: sink.count() >= SPANS))
        assert sink.count() == SPANS
        assert again.counts.partial_rejected >= 2
        last = sink.headers[-1]
        assert last["Authorization"] == "Bearer t0ken" and last["Content-Encoding"] == "gzip"
    assert asyncio.run(committed(bootstrap, "g-partial", spans_topic)) == SPANS


def test_grpc_waits_for_a_collector_that_is_not_there_yet(
    kafka_broker: EmbeddedBroker, spans_topic: str, tmp_path: Path
) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    with TraceSink() as sink:
        rotel = Rotel(sink.url, tmp_path)
        settings = resolve(endpoint=rotel.grpc_endpoint, protocol="grpc", environ={})
        service = ExportService(
            replace(config(bootstrap, spans_topic, sink, "g-grpc"), otlp=settings),
            new_client(settings),
        )

        async def scenario() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(service.run(stop))
            try:
                while service.counts.retries < 2:
                    assert not task.done() and service.counts.exported == 0
                    await asyncio.sleep(0.05)
                assert sink.count() == 0
                await asyncio.to_thread(rotel.start)
                deadline = time.monotonic() + 30
                while sink.count() < SPANS:
                    assert not task.done() and time.monotonic() < deadline, service.counts
                    await asyncio.sleep(0.05)
            finally:
                stop.set()
                await task
                rotel.stop()

        asyncio.run(scenario())
    assert sorted(r.span.span_id.hex() for r in sink.spans) == sorted(
        f"{i + 1:016x}" for i in range(SPANS)
    )
