"""The Kafka edge against a real broker (Tansu): publisher, ensure_topics, `tail`, `broker`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from aiokafka.structs import ConsumerRecord
from kafka_fixtures import read_topic, span_batch, unique_topic

from ebpf_apm import cli
from ebpf_apm.consumers import tail_command as topic_tail
from ebpf_apm.kafka.admin import ensure_topics
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.embedded_broker import BrokerError, EmbeddedBroker, free_port
from ebpf_apm.kafka.errors import KafkaConfigError, KafkaUnavailableError
from ebpf_apm.producer import kafka_publisher
from ebpf_apm.producer.kafka_publisher import (
    KafkaPublisher,
    PublisherConfig,
    PublisherConfigError,
    PublisherError,
    PublisherStats,
)
from ebpf_apm.schemas.event_batch import (
    SpanBatch,
    decode_span_batch,
    encode_span_batch,
    iter_events,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
Records = list[ConsumerRecord[bytes, bytes]]
Stats = PublisherStats
UPROBE_TOPIC = "apm.uprobe.events"
LOGGER = "ebpf_apm.producer.kafka_publisher"


def key_of(batch: SpanBatch) -> bytes:
    return f"{batch.node}/{batch.pid}".encode()


def numbered_batch(i: int) -> SpanBatch:
    """Batch i: 1-4 spans, known functions and durations, every third with HTTP fields."""
    spans = [(f"main.f{j}", 1_000_000 * i + j, 1_000 * (i + 1) + j) for j in range(i % 4 + 1)]
    http = {0: ("GET", f"/item/{i}", 200 + i)} if i % 3 == 0 else None
    return span_batch(f"node-{i % 2}", 4000 + i % 5, spans, http=http)


def batch_events(batch: SpanBatch) -> list[dict[str, object]]:
    return list(iter_events(batch))


def records_events(records: list[ConsumerRecord[bytes, bytes]]) -> list[dict[str, object]]:
    return [e for r in records for e in iter_events(decode_span_batch(r.value or b""))]


# -- publisher --------------------------------------------------------------------------


def test_publish_batches_and_read_them_back(kafka_broker: EmbeddedBroker) -> None:
    bootstrap, topic = kafka_broker.bootstrap_servers, unique_topic("publish")
    batches = [numbered_batch(i) for i in range(23)]

    async def scenario() -> tuple[dict[str, int], Stats, Records]:
        counts = await ensure_topics(KafkaConnection(bootstrap), {topic: 3})
        publisher = KafkaPublisher(PublisherConfig(KafkaConnection(bootstrap), topic, linger_ms=5))
        await publisher.start()
        for batch in batches:
            assert await publisher.publish(key_of(batch), encode_span_batch(batch), len(batch))
        assert await publisher.flush(15)
        stats = publisher.stats
        await publisher.close()
        return counts, stats, await read_topic(bootstrap, topic, len(batches))

    counts, stats, records = asyncio.run(scenario())
    assert counts == {topic: 3}
    events = sum(len(b) for b in batches)
    assert stats == PublisherStats(
        accepted_messages=23,
        accepted_events=events,
        acked_messages=23,
        acked_events=events,
        dropped_messages=0,
        dropped_events=0,
        failed_messages=0,
        failed_events=0,
        buffered_bytes=0,
        connected=True,
    )
    assert len(records) == 23
    # Keys arrive as given, each process (key) on one partition, in publish order there.
    by_key: dict[bytes, list[ConsumerRecord[bytes, bytes]]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        assert record.key is not None
        by_key[record.key].append(record)
    expected_by_key: dict[bytes, list[SpanBatch]] = defaultdict(list)
    for batch in batches:
        expected_by_key[key_of(batch)].append(batch)
    assert set(by_key) == set(expected_by_key)
    assert len(by_key) == 10
    for key, key_records in by_key.items():
        assert len({r.partition for r in key_records}) == 1, key
        got = [batch_events(decode_span_batch(r.value or b"")) for r in key_records]
        assert got == [batch_events(b) for b in expected_by_key[key]], key
    assert len({r.partition for r in records}) > 1  # the keys did spread over partitions


def test_ensure_topics_keeps_existing_and_tolerates_races(kafka_broker: EmbeddedBroker) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    first, second = unique_topic("ensure"), unique_topic("ensure")

    async def scenario() -> list[dict[str, int]]:
        created = await ensure_topics(KafkaConnection(bootstrap), {first: 2})
        # Existing topic with another count is left alone; two creators race on `second`.
        return [
            created,
            *await asyncio.gather(
                ensure_topics(KafkaConnection(bootstrap), {first: 5, second: 3}),
                ensure_topics(KafkaConnection(bootstrap), {second: 3}),
            ),
        ]

    assert asyncio.run(scenario()) == [{first: 2}, {first: 2, second: 3}, {second: 3}]


def test_publisher_buffers_until_the_broker_starts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    port = free_port()
    bootstrap, topic = f"127.0.0.1:{port}", unique_topic("late")
    batches = [numbered_batch(i) for i in range(12)]
    config = PublisherConfig(
        KafkaConnection(bootstrap), topic, retry_backoff_s=0.1, retry_backoff_max_s=0.4
    )

    async def scenario() -> tuple[Stats, Stats, Records]:
        publisher = KafkaPublisher(config)
        await publisher.start()
        for batch in batches[:6]:
            assert await publisher.publish(key_of(batch), encode_span_batch(batch), len(batch))
        await asyncio.sleep(0.5)  # a few reconnect attempts: still one warning
        for batch in batches[6:]:
            assert await publisher.publish(key_of(batch), encode_span_batch(batch), len(batch))
        down = publisher.stats
        with EmbeddedBroker(port=port) as broker:
            assert broker.bootstrap_servers == bootstrap
            await ensure_topics(
                KafkaConnection(bootstrap), {topic: 2}
            )  # may race the publisher's auto-create
            assert await publisher.flush(15)
            up = publisher.stats
            await publisher.close()
            return down, up, await read_topic(bootstrap, topic, len(batches))

    down, up, records = asyncio.run(scenario())
    events = sum(len(b) for b in batches)
    size = sum(len(key_of(b)) + len(encode_span_batch(b)) for b in batches)
    assert (down.accepted_messages, down.acked_messages, down.connected) == (12, 0, False)
    assert down.buffered_bytes == size
    assert (up.acked_messages, up.acked_events, up.buffered_bytes, up.connected) == (
        12,
        events,
        0,
        True,
    )
    assert up.dropped_messages == up.failed_messages == 0
    assert sorted(records_events(records), key=repr) == sorted(
        (e for b in batches for e in batch_events(b)), key=repr
    )
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= 30]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"broker {bootstrap} unreachable (")
    assert "buffering up to 64 MiB of events and retrying" in warnings[0]
    assert "check --bootstrap-servers / KAFKA_BOOTSTRAP_SERVERS" in warnings[0]
    infos = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == 20]
    assert sum("connected to Kafka" in m for m in infos) == 1, infos


def test_publisher_retries_through_a_stalled_broker(caplog: pytest.LogCaptureFixture) -> None:
    """A broker that stops answering (SIGSTOP): sends time out, go back to the buffer, and
    are delivered once it answers again; nothing accepted is lost."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    topic = unique_topic("stall")

    async def scenario(broker: EmbeddedBroker) -> tuple[Stats, Stats, list[bytes]]:
        bootstrap = broker.bootstrap_servers
        await ensure_topics(KafkaConnection(bootstrap), {topic: 2})
        publisher = KafkaPublisher(
            PublisherConfig(
                KafkaConnection(bootstrap),
                topic,
                send_timeout_s=1.0,
                retry_backoff_s=0.1,
                retry_backoff_max_s=0.5,
            )
        )
        await publisher.start()
        for i in range(3):
            assert await publisher.publish(b"node/%d" % i, b"before-%d" % i, 1)
        assert await publisher.flush(10)
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            for i in range(5):
                assert await publisher.publish(b"node/%d" % i, b"during-%d" % i, 2)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while publisher.stats.connected and loop.time() < deadline:
                await asyncio.sleep(0.05)
            stalled = publisher.stats
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        assert await publisher.flush(30)
        await publisher.close()
        records = await read_topic(bootstrap, topic, 8)
        return stalled, publisher.stats, [r.value or b"" for r in records]

    with EmbeddedBroker() as broker:
        stalled, done, values = asyncio.run(scenario(broker))
    assert (stalled.connected, stalled.acked_messages, stalled.accepted_messages) == (False, 3, 8)
    assert (done.acked_messages, done.acked_events, done.failed_messages, done.buffered_bytes) == (
        8,
        13,
        0,
        0,
    )
    # At least once: a request that timed out may still have been written by the broker.
    expected = {b"before-%d" % i for i in range(3)} | {b"during-%d" % i for i in range(5)}
    assert set(values) == expected
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]
    warnings = [m for level, m in messages if level >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"broker {broker.bootstrap_servers} unreachable (")
    assert sum("accepts messages again" in m for _, m in messages) == 1, messages


def test_publisher_survives_a_broker_restart(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr(kafka_publisher, "_STALL_S", 0.5)  # the watchdog's patience
    monkeypatch.setattr(kafka_publisher, "_WATCH_INTERVAL_S", 0.1)
    port = free_port()
    bootstrap, topic = f"127.0.0.1:{port}", unique_topic("restart")
    config = PublisherConfig(
        KafkaConnection(bootstrap), topic, retry_backoff_s=0.1, retry_backoff_max_s=0.5
    )

    async def scenario() -> tuple[PublisherStats, PublisherStats]:
        publisher = KafkaPublisher(config)
        with EmbeddedBroker(port=port, stop_grace_s=0.2):
            await ensure_topics(KafkaConnection(bootstrap), {topic: 2})
            await publisher.start()
            for i in range(5):
                assert await publisher.publish(b"node/%d" % i, b"before-%d" % i, 1)
            assert await publisher.flush(10)
        for i in range(5):  # the broker is gone: these wait for the next one
            assert await publisher.publish(b"node/%d" % i, b"after-%d" % i, 2)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while publisher.stats.connected and loop.time() < deadline:
            await asyncio.sleep(0.05)
        down = publisher.stats
        with EmbeddedBroker(port=port):
            assert await publisher.flush(30)
            await publisher.close()
        return down, publisher.stats

    down, up = asyncio.run(scenario())
    assert (down.connected, down.acked_messages, down.accepted_messages) == (False, 5, 10)
    # Acknowledged by the new broker. Not read back: a Tansu that restarted (memory storage)
    # acknowledges produce requests for topics it no longer has, and the data is not kept.
    assert (up.acked_messages, up.acked_events, up.failed_messages, up.buffered_bytes) == (
        10,
        15,
        0,
        0,
    )
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]
    warnings = [m for level, m in messages if level >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"broker {bootstrap} unreachable (ConnectionRefusedError")
    assert sum("accepts messages again" in m for _, m in messages) == 1, messages


def test_full_buffer_drops_exactly_what_does_not_fit(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    bootstrap = f"127.0.0.1:{free_port()}"  # nobody listens: everything stays buffered
    config = PublisherConfig(
        KafkaConnection(bootstrap),
        "nowhere",
        buffer_max_bytes=1000,
        enqueue_timeout_s=10,  # never waited for: the broker is away
        max_request_size=1500,
        retry_backoff_s=0.1,
    )
    key = b"node/1234"  # 9 bytes: key + value is 300 bytes

    async def scenario() -> tuple[list[bool], float, PublisherStats, PublisherStats]:
        publisher = KafkaPublisher(config)
        await publisher.start()
        started = time.monotonic()
        results = [await publisher.publish(key, bytes(291), 5) for _ in range(7)]
        results.append(await publisher.publish(key, bytes(91), 2))  # exactly fills the buffer
        results.append(await publisher.publish(key, bytes(0), 1))  # 9 bytes: no room
        results.append(await publisher.publish(key, bytes(1200), 7))  # never fits
        no_wait = time.monotonic() - started  # six drops, none waited for room
        results.append(await publisher.publish(key, bytes(1600), 9))  # over max_request_size
        before_close = publisher.stats
        await publisher.close(timeout_s=0.1)
        return results, no_wait, before_close, publisher.stats

    results, no_wait, before, after = asyncio.run(scenario())
    assert results == [True] * 3 + [False] * 4 + [True, False, False, False]
    assert no_wait < 0.05
    assert (before.accepted_messages, before.accepted_events) == (4, 17)
    assert (before.dropped_messages, before.dropped_events) == (6, 4 * 5 + 1 + 7)
    assert (before.failed_messages, before.failed_events) == (1, 9)
    assert before.buffered_bytes == 1000
    assert (before.acked_messages, before.connected) == (0, False)
    # close() accounts for what never got acknowledged, and says so.
    assert (after.failed_messages, after.failed_events, after.buffered_bytes) == (5, 26, 0)
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert sum("unreachable (" in m and "up to 1000 bytes" in m for m in messages) == 1
    assert sum("buffer full" in m for m in messages) == 1
    assert sum("exceeds max_request_size" in m for m in messages) == 1
    assert sum("4 messages (17 events)" in m and "lost" in m for m in messages) == 1


def test_publish_waits_for_room_while_the_broker_acknowledges(
    kafka_broker: EmbeddedBroker,
) -> None:
    bootstrap, topic = kafka_broker.bootstrap_servers, unique_topic("backpressure")
    value = bytes(range(256)) * 8  # ~2 KiB: the buffer holds three messages

    async def scenario() -> tuple[list[bool], PublisherStats]:
        await ensure_topics(KafkaConnection(bootstrap), {topic: 1})
        publisher = KafkaPublisher(
            PublisherConfig(
                KafkaConnection(bootstrap),
                topic,
                buffer_max_bytes=3 * (len(value) + 8),
                enqueue_timeout_s=10,
            )
        )
        await publisher.start()
        while not publisher.stats.connected:  # waiting for room is for a connected broker
            await asyncio.sleep(0.01)
        results = [await publisher.publish(b"node/%03d" % i, value, 1) for i in range(40)]
        await publisher.close()
        return results, publisher.stats

    results, stats = asyncio.run(scenario())
    assert all(results)
    assert (stats.accepted_messages, stats.acked_messages, stats.dropped_messages) == (40, 40, 0)


def test_ensure_topics_without_a_broker_says_what_to_do() -> None:
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(KafkaUnavailableError) as info:
        asyncio.run(ensure_topics(KafkaConnection(address), {"apm.uprobe.events": 3}))
    assert info.value.exit_code == 1
    assert str(info.value).startswith(f"cannot reach Kafka at {address} to create topics ")
    assert "start one with `ebpf-apm broker` or set --bootstrap-servers" in str(info.value)


def test_idempotent_publisher_on_tansu_fails_clearly(kafka_broker: EmbeddedBroker) -> None:
    bootstrap, topic = kafka_broker.bootstrap_servers, unique_topic("idempotent")

    async def scenario() -> tuple[bool, PublisherError, PublisherStats]:
        publisher = KafkaPublisher(
            PublisherConfig(KafkaConnection(bootstrap), topic, idempotent=True)
        )
        await publisher.start()
        assert await publisher.publish(b"node/1", b"value", 1)
        flushed = await publisher.flush(10)  # returns as soon as the publisher gave up
        with pytest.raises(PublisherError) as info:
            await publisher.publish(b"node/1", b"value", 1)
        await publisher.close()
        return flushed, info.value, publisher.stats

    started = time.monotonic()
    flushed, error, stats = asyncio.run(scenario())
    assert not flushed and time.monotonic() - started < 5
    assert error.exit_code == 1
    assert f"Kafka at {bootstrap} refused to start a producer: UnknownError" in str(error)
    assert "turn idempotence off" in str(error)
    assert (stats.accepted_messages, stats.failed_messages, stats.acked_messages) == (1, 1, 0)


def test_publisher_config_rejects_bad_settings() -> None:
    with pytest.raises(PublisherConfigError) as info:
        PublisherConfig(KafkaConnection("127.0.0.1:9092"), "t", acks="2", compression="brotli")
    assert info.value.exit_code == 2
    assert "acks='2'" in str(info.value) and "compression='brotli'" in str(info.value)
    with pytest.raises(KafkaConfigError, match="bad Kafka address 'host:port'") as bad:
        KafkaConnection("host:port")
    assert bad.value.exit_code == 2


# -- tail ---------------------------------------------------------------------------------


def tail_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ebpf_apm", "tail", *args]


def run_tail(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tail_command(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def tail_args(*args: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    topic_tail.add_arguments(parser)
    return parser.parse_args(list(args))


def publish_values(bootstrap: str, values: list[tuple[bytes, bytes]]) -> None:
    """Publish to a one-partition apm.uprobe.events; the lingering producer puts the values
    in one record batch, the case where Tansu's ListOffsets(latest) falls short."""

    async def scenario() -> None:
        await ensure_topics(KafkaConnection(bootstrap), {UPROBE_TOPIC: 1})
        publisher = KafkaPublisher(
            PublisherConfig(KafkaConnection(bootstrap), UPROBE_TOPIC, linger_ms=50)
        )
        await publisher.start()
        for key, value in values:
            assert await publisher.publish(key, value, 1)
        assert await publisher.flush(15)
        await publisher.close()

    asyncio.run(scenario())


TAIL_BATCHES = [
    span_batch(
        "node-a",
        101,
        [("main.handler", 10, 53_200_000), ("main.db", 20, 1_500)],
        http={0: ("GET", "/sleep", 200)},
        k8s={
            "k8s_namespace": "shop",
            "k8s_pod": "web-1",
            "k8s_container": "app",
            "k8s_workload": "web",
        },
    ),
    span_batch("node-b", 202, [("main.work", 30, 2_000_000_000)]),
    span_batch("node-a", 101, [("main.handler", 40, 7_000_000), ("main.db", 50, 900)]),
]
TAIL_EVENTS = [e for b in TAIL_BATCHES for e in batch_events(b)]


@pytest.fixture
def uprobe_topic(fresh_kafka_broker: EmbeddedBroker) -> str:
    """A fresh broker whose apm.uprobe.events holds TAIL_BATCHES; yields its address."""
    publish_values(
        fresh_kafka_broker.bootstrap_servers,
        [(key_of(b), encode_span_batch(b)) for b in TAIL_BATCHES],
    )
    return fresh_kafka_broker.bootstrap_servers


def test_tail_prints_one_json_object_per_event_and_stops_at_max(uprobe_topic: str) -> None:
    result = run_tail(
        UPROBE_TOPIC,
        "--from-beginning",
        "--json",
        "--max",
        "4",
        "--bootstrap-servers",
        uprobe_topic,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [json.loads(line) for line in lines] == TAIL_EVENTS[:4]
    assert result.stderr == (
        f"tailing {UPROBE_TOPIC} on {uprobe_topic} (1 partition, from the beginning); "
        "Ctrl-C to stop\n"
    )
    first = json.loads(lines[0])
    assert first["func"] == "main.handler" and first["duration_ns"] == 53_200_000
    assert (first["http_method"], first["http_path"], first["http_status"]) == (
        "GET",
        "/sleep",
        200,
    )
    assert (first["node"], first["pid"], first["k8s_pod"]) == ("node-a", 101, "web-1")


def test_tail_stops_after_timeout_without_messages(uprobe_topic: str) -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": uprobe_topic}
    started = time.monotonic()
    result = subprocess.run(
        tail_command(UPROBE_TOPIC, "--from-beginning", "--json", "--timeout", "1"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == TAIL_EVENTS
    assert len(result.stderr.splitlines()) == 1, result.stderr  # the banner, nothing else
    assert 1.0 <= elapsed < 10, elapsed


def test_tail_readable_lines(uprobe_topic: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = tail_args(
        UPROBE_TOPIC, "--from-beginning", "--max", "3", "--bootstrap-servers", uprobe_topic
    )
    assert topic_tail.run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    clock = r"\d\d:\d\d:\d\d\.\d{3}"
    assert re.fullmatch(
        clock + r" node-a/101  main\.handler  53\.2 ms  GET /sleep 200  \[shop/web-1\]", lines[0]
    ), lines[0]
    assert re.fullmatch(clock + r" node-a/101  main\.db  1\.5 µs  \[shop/web-1\]", lines[1])
    assert re.fullmatch(clock + r" node-b/202  main\.work  2\.00 s", lines[2]), lines[2]


def test_tail_from_the_end_prints_only_new_events(uprobe_topic: str) -> None:
    process = subprocess.Popen(
        tail_command(UPROBE_TOPIC, "--json", "--max", "2", "--bootstrap-servers", uprobe_topic),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        banner = process.stderr.readline()  # printed once the end offsets are resolved
        assert banner.startswith(
            f"tailing {UPROBE_TOPIC} on {uprobe_topic} (1 partition, from the end)"
        ), banner
        new = span_batch("node-c", 303, [("main.new", 60, 5_000), ("main.new", 70, 6_000)])
        publish_values(uprobe_topic, [(key_of(new), encode_span_batch(new))])
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert [json.loads(line) for line in stdout.splitlines()] == batch_events(new)
    assert stderr == "", stderr


def test_tail_skips_an_undecodable_message(fresh_kafka_broker: EmbeddedBroker) -> None:
    bootstrap = fresh_kafka_broker.bootstrap_servers
    good = TAIL_BATCHES[1:]
    publish_values(
        bootstrap,
        [
            (key_of(good[0]), encode_span_batch(good[0])),
            (b"node-x/1", b"garbage"),
            (key_of(good[1]), encode_span_batch(good[1])),
        ],
    )
    result = run_tail(
        UPROBE_TOPIC,
        "--from-beginning",
        "--json",
        "--timeout",
        "1",
        "--bootstrap-servers",
        bootstrap,
    )
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        e for b in good for e in batch_events(b)
    ]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert f"{UPROBE_TOPIC} partition 0 offset 1" in warnings[0]
    assert "BatchDecodeError" in warnings[0]


def test_tail_quiet_on_broken_pipe(uprobe_topic: str) -> None:
    command = " ".join(
        tail_command(
            UPROBE_TOPIC, "--from-beginning", "--timeout", "1", "--bootstrap-servers", uprobe_topic
        )
    )
    result = subprocess.run(
        f"set -o pipefail; {command} | head -n 1",
        shell=True,
        executable="/bin/bash",
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1
    assert "Error" not in result.stderr and "Exception" not in result.stderr, result.stderr


def test_tail_unknown_topic_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["tail", "apm.nope"]) == 2
    err = capsys.readouterr().err
    assert "no decoder for topic 'apm.nope'" in err and UPROBE_TOPIC in err


def test_tail_stops_quietly_on_ctrl_c(uprobe_topic: str) -> None:
    process = subprocess.Popen(
        tail_command(UPROBE_TOPIC, "--bootstrap-servers", uprobe_topic),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        assert process.stderr.readline().startswith(f"tailing {UPROBE_TOPIC} ")
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert (process.returncode, stdout, stderr) == (0, "", "")


def test_tail_bad_address_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["tail", UPROBE_TOPIC, "--bootstrap-servers", "kafka:port"]) == 2
    assert "bad Kafka address 'kafka:port'" in capsys.readouterr().err


def test_tail_dead_broker_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    assert cli.main(["tail", UPROBE_TOPIC, "--bootstrap-servers", address]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach Kafka at {address}: " in err
    assert "start one with `ebpf-apm broker` or set --bootstrap-servers" in err


def test_tail_missing_topic_exits_1_without_creating_it(
    fresh_kafka_broker: EmbeddedBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    bootstrap = fresh_kafka_broker.bootstrap_servers
    args = ["tail", UPROBE_TOPIC, "--timeout", "1", "--bootstrap-servers", bootstrap]
    assert cli.main(args) == 1
    assert f"topic '{UPROBE_TOPIC}' does not exist on Kafka at {bootstrap}" in (
        capsys.readouterr().err
    )
    # Tansu creates topics named in metadata requests: tail must not have named it.
    assert cli.main(args) == 1


# -- broker command -----------------------------------------------------------------------


def test_embedded_broker_start_failure_shows_its_output(tmp_path: Path) -> None:
    fake = tmp_path / "fake-tansu"
    fake.write_text("#!/bin/sh\necho 'fake broker: cannot open storage' >&2\nexec sleep 60\n")
    fake.chmod(0o755)
    broker = EmbeddedBroker(binary=str(fake), start_timeout_s=0.3, stop_grace_s=1)
    with pytest.raises(BrokerError) as info:
        broker.start()
    message = str(info.value)
    assert "did not accept connections" in message and "within 0.3 s" in message
    assert "fake broker: cannot open storage" in message
    assert broker.poll() is not None  # start() stopped what it started

    crashing = tmp_path / "crashing-tansu"
    crashing.write_text("#!/bin/sh\necho 'bad flag' >&2\nexit 3\n")
    crashing.chmod(0o755)
    with pytest.raises(BrokerError, match=r"exited with status 3(.|\n)*bad flag"):
        EmbeddedBroker(binary=str(crashing)).start()


def test_broker_command_runs_until_sigterm_and_refuses_a_busy_port() -> None:
    port = free_port()
    command = [sys.executable, "-m", "ebpf_apm", "broker", "--port", str(port)]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == (
            f"broker listening on 127.0.0.1:{port} "
            "(Tansu, memory storage: data is lost when it stops)\n"
        )
        busy = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=30)
        assert busy.returncode == 1
        assert f"cannot start the broker on 127.0.0.1:{port}" in busy.stderr
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    # Its Tansu child is gone too: the port is free again.
    with EmbeddedBroker(port=port):
        pass
