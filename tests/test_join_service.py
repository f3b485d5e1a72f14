"""The join service: offset bookkeeping (pure), then against a real broker (Tansu): an outside
subscriber's view of apm.spans, dead letters, commits, `tail`, co-partitioning, and two
instances of which one is killed with SIGKILL."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from join_data import Net, Span, Totals, brute_force, http_traffic, net_batch, span_batch
from join_harness import (
    acknowledged,
    assigned,
    outside_decoder,
    start_join,
    wait_for,
)
from kafka_fixtures import read_topic

from ebpf_apm import cli
from ebpf_apm.consumers import join_command, join_service
from ebpf_apm.consumers import tail_command as topic_tail
from ebpf_apm.consumers.offset_ledger import EmitSteps, TopicPartitionLedger
from ebpf_apm.kafka.admin import ensure_topics
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.embedded_broker import EmbeddedBroker, free_port
from ebpf_apm.schemas.event_batch import encode_net_batch, encode_span_batch

SPAN_TOPIC, NET_TOPIC = "apm.uprobe.events", "apm.kprobe.events"
OUT_TOPIC, DEAD_TOPIC = "apm.spans", "apm.deadletter"
MS = 1_000_000
S = 1000 * MS
FAST = ["--allowed-lateness-ms", "300", "--idle-advance-ms", "300", "--stats-interval-s", "1"]


# -- offset ledger (pure) ---------------------------------------------------------------


def test_a_span_batch_is_committable_only_when_all_its_spans_are_acknowledged() -> None:
    ledger = TopicPartitionLedger()
    assert ledger.committable(None) is None  # nothing consumed: nothing to commit
    first = ledger.track(10, outstanding=3)
    ledger.track(11, outstanding=0)  # an empty batch
    third = ledger.track(12, outstanding=1)
    assert ledger.committable(None) == 10
    first.outstanding -= 2
    assert ledger.committable(None) == 10
    third.outstanding -= 1  # a later message done first does not move the offset
    assert ledger.committable(None) == 10
    first.outstanding -= 1
    assert ledger.committable(None) == 13
    assert len(ledger) == 0


def test_a_net_batch_is_committable_once_its_events_are_dropped_and_every_span_before_is_acked():
    ledger, steps = TopicPartitionLedger(), EmitSteps()
    ledger.track(0, newest_kept_ns=None)  # every event late: nothing kept
    ledger.track(1, newest_kept_ns=500)
    ledger.track(2, newest_kept_ns=900)
    assert ledger.committable(steps.safe_kept_from_ns) == 1
    # A step emitted spans (one batch in flight), then the store dropped events before 600.
    step = steps.open(kept_from_ns=600)
    step.outstanding += 1
    steps.close(step)
    assert ledger.committable(steps.safe_kept_from_ns) == 1  # a span may still need them
    later = steps.open(kept_from_ns=1000)
    steps.close(later)  # nothing in flight, but it follows the unacknowledged step
    assert ledger.committable(steps.safe_kept_from_ns) == 1
    steps.acked(step)
    assert steps.safe_kept_from_ns == 1000
    assert ledger.committable(steps.safe_kept_from_ns) == 3


# -- configuration ----------------------------------------------------------------------


def join_args(*args: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    join_command.add_arguments(parser)
    return parser.parse_args(list(args))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--idle-advance-ms", "0"], "--idle-advance-ms 0: must be at least 1"),
        (["--allowed-lateness-ms", "-1"], "--allowed-lateness-ms -1"),
        (["--bootstrap-servers", "host:notaport"], "bad Kafka address"),
        (["--group", ""], "--group must not be empty"),
    ],
)
def test_bad_flags_exit_2_and_name_the_value(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["join", *flags]) == 2
    assert message in capsys.readouterr().err


def test_no_broker_exits_1_and_says_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["join", "--bootstrap-servers", f"127.0.0.1:{free_port()}"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach Kafka at 127.0.0.1:" in err and "ebpf-apm broker" in err


def test_bootstrap_servers_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka-0:9093")
    assert join_command.config_from_args(join_args()).connection.bootstrap_servers == "kafka-0:9093"
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS")
    config = join_command.config_from_args(join_args())
    assert config.connection.bootstrap_servers == "127.0.0.1:9092"


# -- against a broker -------------------------------------------------------------------

Proc = tuple[str, int]


@dataclass
class Traffic:
    """What the test published: the ground truth of the join."""

    spans: dict[Proc, list[Span]]
    events: dict[Proc, list[Net]]

    def expected(self) -> dict[tuple[str, int, str, int, int], Totals]:
        """(node, pid, func, start_ns, goid or -tid) -> I/O, from the brute-force join."""
        truth = brute_force(self.spans, self.events)
        out = {}
        for (node, pid, i), totals in truth.items():
            s = self.spans[(node, pid)][i]
            out[(node, pid, s.func, s.start_ns, s.goid if s.goid >= 0 else -s.tid)] = totals
        return out


def key(proc: Proc) -> bytes:
    return f"{proc[0]}/{proc[1]}".encode()


async def publish(bootstrap: str, messages: list[tuple[str, bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        for topic, k, value in messages:
            await producer.send(topic, value, key=k)
        await producer.flush()
    finally:
        await producer.stop()


def traffic_messages(traffic: Traffic, chunk: int) -> list[tuple[str, bytes, bytes]]:
    """The traffic as agent-like batches: per process, `chunk` rows per message."""
    messages = []
    for proc, spans in traffic.spans.items():
        events = traffic.events[proc]
        for i in range(0, max(len(spans), len(events)), chunk):
            if events[i : i + chunk]:
                net = encode_net_batch(net_batch(*proc, events[i : i + chunk]))
                messages.append((NET_TOPIC, key(proc), net))
            if spans[i : i + chunk]:
                span = encode_span_batch(span_batch(*proc, spans[i : i + chunk]))
                messages.append((SPAN_TOPIC, key(proc), span))
    return messages


async def committed(bootstrap: str, group: str, partitions: list[TopicPartition]) -> dict:
    """The group's committed offsets (0 where it never committed: nothing to read there)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        return {tp: await consumer.committed(tp) or 0 for tp in partitions}
    finally:
        await consumer.stop()


@dataclass
class JoinRun:
    bootstrap: str
    traffic: Traffic
    garbage: list[tuple[str, bytes, bytes]]
    exit_code: int
    spans: list[Any]
    dead: list[Any]
    committed: dict[TopicPartition, int]
    ends: dict[TopicPartition, int]


@pytest.fixture(scope="module")
def join_run() -> Iterator[JoinRun]:
    """Known traffic of five processes on three partitions plus three unreadable messages,
    joined by an in-process service that stops once every span is out."""
    rng = np.random.default_rng(17)
    t0 = time.time_ns() - 60 * S
    procs = [("node-a", 100), ("node-a", 101), ("node-b", 100), ("node-b", 7), ("node-c", 3)]
    traffic = Traffic({}, {})
    for proc in procs:
        spans, events = http_traffic(rng, t0, requests=60, goroutines=5, gap_ns=20 * MS)
        traffic.spans[proc], traffic.events[proc] = spans, events
    bad_kind = encode_net_batch(net_batch("node-a", 100, [Net(t0, 1, True, 1)]))
    garbage = [
        (SPAN_TOPIC, b"node-a/100", b"\x93not a batch"),
        (NET_TOPIC, b"node-b/7", b"\xffgarbage"),
        (SPAN_TOPIC, b"node-c/3", bad_kind),  # a net batch on the span topic
    ]
    expected = sum(len(s) for s in traffic.spans.values())
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers

        async def scenario() -> JoinRun:
            await ensure_topics(KafkaConnection(bootstrap), {SPAN_TOPIC: 3, NET_TOPIC: 3})
            messages = traffic_messages(traffic, chunk=25)
            await publish(bootstrap, messages[:5] + garbage + messages[5:])
            # Network events are kept max_span_ms behind the watermark (and their offsets
            # with them): 1 s lets the whole input be committed within the test.
            flags = ("--bootstrap-servers", bootstrap, "--max-span-ms", "1000", *FAST)
            service = join_service.JoinService(join_command.config_from_args(join_args(*flags)))
            stop = asyncio.Event()
            task = asyncio.create_task(service.run(stop))
            inputs = [TopicPartition(t, p) for t in (SPAN_TOPIC, NET_TOPIC) for p in range(3)]
            ends = await _end_offsets(bootstrap, inputs)
            deadline = time.monotonic() + 60
            while service.totals.spans_acked < expected and not task.done():
                assert time.monotonic() < deadline, "the join did not emit every span in 60 s"
                await asyncio.sleep(0.1)
            commits: dict[TopicPartition, int] = {}
            while commits != ends and not task.done() and time.monotonic() < deadline:
                await asyncio.sleep(0.5)  # committed while running, not only at exit
                commits = await committed(bootstrap, "ebpf-apm-join", inputs)
            stop.set()
            exit_code = await task
            spans = await read_topic(bootstrap, OUT_TOPIC, expected, 20)
            dead = await read_topic(bootstrap, DEAD_TOPIC, len(garbage), 10)
            return JoinRun(bootstrap, traffic, garbage, exit_code, spans, dead, commits, ends)

        yield asyncio.run(scenario())


async def _end_offsets(bootstrap: str, partitions: list[TopicPartition]) -> dict:
    # The high watermark of a fetch (Tansu's ListOffsets can fall short, see embedded_broker).
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends: dict[TopicPartition, int] = {}
        while len(ends) < len(partitions):
            await consumer.getmany(timeout_ms=200)
            for tp in partitions:
                if consumer.highwater(tp) is not None:
                    ends[tp] = consumer.highwater(tp)
        return ends
    finally:
        await consumer.stop()


@pytest.mark.integration
def test_every_span_arrives_once_with_the_exact_bytes_for_an_outside_subscriber(
    join_run: JoinRun,
) -> None:
    decode = outside_decoder()
    expected = join_run.traffic.expected()
    seen: dict[tuple[str, int, str, int, int], Totals] = {}
    for record in join_run.spans:
        span = decode(record.value)
        assert record.key == f"{span['node']}/{span['pid']}".encode()
        goid = span["goid"] if span["goid"] is not None else -span["tid"]
        ident = (span["node"], span["pid"], span["func"], span["start_ns"], goid)
        assert ident not in seen, f"span {ident} emitted twice"
        seen[ident] = (
            span["bytes_sent"],
            span["bytes_received"],
            span["net_sends"],
            span["net_recvs"],
        )
        assert span["duration_ns"] == span["end_ns"] - span["start_ns"]
        if span["func"] == "net/http.serverHandler.ServeHTTP":
            assert (span["http_method"], span["http_status"]) == ("GET", 200)
            assert span["http_path"].startswith("/item/")
    assert seen == expected
    assert join_run.exit_code == 0


@pytest.mark.integration
def test_unreadable_messages_go_to_the_deadletter_topic_with_their_key_bytes_and_reason(
    join_run: JoinRun,
) -> None:
    letters = {(r.key, r.value): dict(r.headers) for r in join_run.dead}
    assert set(letters) == {(k, v) for _, k, v in join_run.garbage}
    reasons = {k: h["reason"].decode() for (k, _), h in letters.items()}
    assert "not msgpack" in reasons[b"node-b/7"]
    assert "unsupported batch" in reasons[b"node-c/3"] and "kind='net'" in reasons[b"node-c/3"]
    assert all(h["source"].decode().startswith("apm.") for h in letters.values())


@pytest.mark.integration
def test_offsets_are_committed_up_to_the_end_once_everything_is_acknowledged(
    join_run: JoinRun,
) -> None:
    assert join_run.committed == join_run.ends


@pytest.mark.integration
def test_tail_decodes_joined_spans_and_network_events(
    join_run: JoinRun, capsys: pytest.CaptureFixture[str]
) -> None:
    bootstrap = ["--bootstrap-servers", join_run.bootstrap, "--from-beginning", "--json"]
    parser = argparse.ArgumentParser()
    topic_tail.add_arguments(parser)
    assert topic_tail.run(parser.parse_args([OUT_TOPIC, *bootstrap, "--max", "5"])) == 0
    spans = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(spans) == 5
    assert {"span_id", "bytes_sent", "bytes_received", "net_sends", "net_recvs"} <= set(spans[0])
    assert topic_tail.run(parser.parse_args([NET_TOPIC, *bootstrap, "--max", "3"])) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(events) == 3
    assert {e["direction"] for e in events} <= {"send", "recv"}
    assert all(e["saddr"] == "127.0.0.1" and e["sport"] == 8080 for e in events)


@pytest.mark.integration
def test_input_topics_with_different_partition_counts_are_refused_with_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with EmbeddedBroker() as broker:
        asyncio.run(
            ensure_topics(KafkaConnection(broker.bootstrap_servers), {SPAN_TOPIC: 2, NET_TOPIC: 3})
        )
        assert cli.main(["join", "--bootstrap-servers", broker.bootstrap_servers]) == 2
    err = capsys.readouterr().err
    assert "apm.uprobe.events has 2 partitions and apm.kprobe.events has 3" in err
    assert "co-partitioned" in err


@pytest.mark.integration
def test_a_missing_input_topic_is_created_co_partitioned_with_the_other() -> None:
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        asyncio.run(ensure_topics(KafkaConnection(bootstrap), {SPAN_TOPIC: 5}))
        config = join_command.config_from_args(join_args("--bootstrap-servers", bootstrap))
        assert asyncio.run(join_service.prepare_topics(config)) == 5
        counts = asyncio.run(
            ensure_topics(KafkaConnection(bootstrap), {NET_TOPIC: 1, OUT_TOPIC: 1})
        )
        assert counts == {NET_TOPIC: 5, OUT_TOPIC: 5}


# -- two instances, one killed ----------------------------------------------------------


class LiveTraffic:
    """Agent-like traffic of several processes, timestamped with the wall clock."""

    def __init__(self, bootstrap: str, procs: list[Proc]) -> None:
        self.rng = np.random.default_rng(99)
        self.procs = procs
        self.traffic = Traffic({p: [] for p in procs}, {p: [] for p in procs})
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)

    async def rounds(self, count: int) -> None:
        """`count` rounds of 100 ms: each process serves a few requests and publishes them."""
        for _ in range(count):
            now = time.time_ns()
            for proc in self.procs:
                spans, events = http_traffic(self.rng, now - 100 * MS, 4, 2, gap_ns=20 * MS)
                self.traffic.spans[proc] += spans
                self.traffic.events[proc] += events
                net, span = (
                    encode_net_batch(net_batch(*proc, events)),
                    encode_span_batch(span_batch(*proc, spans)),
                )
                await self.producer.send(NET_TOPIC, net, key=key(proc))
                await self.producer.send(SPAN_TOPIC, span, key=key(proc))
            await self.producer.flush()
            await asyncio.sleep(0.1)


@pytest.mark.integration
def test_killing_one_of_two_instances_loses_no_span(tmp_path: Path) -> None:
    procs = [(f"node-{i % 3}", 200 + i) for i in range(8)]
    logs = [tmp_path / "join-a.log", tmp_path / "join-b.log"]
    by_id: dict[str, list[dict[str, Any]]] = {}
    decode = outside_decoder()
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        asyncio.run(ensure_topics(KafkaConnection(bootstrap), {SPAN_TOPIC: 4, NET_TOPIC: 4}))
        joins = [start_join(bootstrap, log) for log in logs]

        def shared() -> bool:
            latest = [assigned(log)[-1] if assigned(log) else [] for log in logs]
            return all(latest) and sorted(latest[0] + latest[1]) == [0, 1, 2, 3]

        async def scenario() -> Traffic:
            live = LiveTraffic(bootstrap, procs)
            await live.producer.start()
            try:
                # Mid-run: the victim has published spans and holds others, waiting.
                for _ in range(100):
                    await live.rounds(2)
                    if acknowledged(logs[0]) > 0:
                        break
                assert acknowledged(logs[0]) > 0, "the first join emitted nothing in 20 s"
                joins[0].send_signal(signal.SIGKILL)
                await live.rounds(15)
            finally:
                await live.producer.stop()
            return live.traffic

        try:
            wait_for(shared, 60, "both join instances to share the four partitions")
            traffic = asyncio.run(scenario())
            assert joins[0].wait(10) == -signal.SIGKILL
            wait_for(lambda: assigned(logs[1])[-1] == [0, 1, 2, 3], 30, "the survivor's takeover")
            expected = traffic.expected()

            def all_out() -> bool:
                records = asyncio.run(read_topic(bootstrap, OUT_TOPIC, len(expected), 2))
                by_id.clear()
                for record in records:
                    span = decode(record.value)
                    by_id.setdefault(span["span_id"], []).append(span)
                return len(by_id) >= len(expected)

            wait_for(all_out, 60, "every span after the takeover")
            joins[1].send_signal(signal.SIGTERM)
            assert joins[1].wait(30) == 0
        finally:
            for join in joins:
                if join.poll() is None:
                    join.kill()
                    join.wait()
    got = {}
    for copies in by_id.values():
        first = copies[0]
        assert all(c == first for c in copies), "a replayed span differs from the original"
        goid = first["goid"] if first["goid"] is not None else -first["tid"]
        ident = (first["node"], first["pid"], first["func"], first["start_ns"], goid)
        got[ident] = (
            first["bytes_sent"],
            first["bytes_received"],
            first["net_sends"],
            first["net_recvs"],
        )
    assert got == expected
    replays = Counter(len(c) for c in by_id.values())
    print(f"{len(expected)} spans; span_ids by number of copies: {dict(replays)}")


@pytest.mark.integration
def test_a_rewind_after_lost_output_reads_again_from_the_commit_and_loses_no_span() -> None:
    """When Kafka gives up on output (a broker gone longer than the output timeout), the join
    drops its state and re-reads its input from the last commit instead of exiting. The
    failure is injected (waiting out the real timeout would take minutes); the rewind, the
    re-reading and the re-joining run against the real broker."""
    procs = [(f"node-{i % 2}", 300 + i) for i in range(4)]
    decode = outside_decoder()
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers

        async def scenario() -> tuple[Traffic, list[Any], int, join_service.JoinService]:
            await ensure_topics(KafkaConnection(bootstrap), {SPAN_TOPIC: 3, NET_TOPIC: 3})
            flags = ("--bootstrap-servers", bootstrap, "--max-span-ms", "1000", *FAST)
            service = join_service.JoinService(join_command.config_from_args(join_args(*flags)))
            stop = asyncio.Event()
            task = asyncio.create_task(service.run(stop))
            live = LiveTraffic(bootstrap, procs)
            await live.producer.start()
            try:
                deadline = time.monotonic() + 30
                while service.totals.spans_acked == 0:
                    assert time.monotonic() < deadline and not task.done(), "nothing joined"
                    await live.rounds(2)
                service._output_failed(None, "injected: Kafka gave up on a batch")
                while service.totals.rewinds == 0:
                    assert time.monotonic() < deadline and not task.done(), "no rewind"
                    await asyncio.sleep(0.05)
                await live.rounds(10)
            finally:
                await live.producer.stop()
            expected = sum(len(s) for s in live.traffic.spans.values())
            deadline = time.monotonic() + 30
            while len(await _span_ids(bootstrap, expected)) < expected:
                assert time.monotonic() < deadline and not task.done(), "spans missing"
            stop.set()
            exit_code = await task
            return (
                live.traffic,
                await read_topic(bootstrap, OUT_TOPIC, 10**6, 2),
                exit_code,
                service,
            )

        traffic, records, exit_code, service = asyncio.run(scenario())
    assert exit_code == 0
    assert service.totals.rewinds == 1
    by_id: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        span = decode(record.value)
        by_id.setdefault(span["span_id"], []).append(span)
    got = {}
    for copies in by_id.values():
        first = copies[0]
        assert all(c == first for c in copies), "a replayed span differs from the original"
        goid = first["goid"] if first["goid"] is not None else -first["tid"]
        ident = (first["node"], first["pid"], first["func"], first["start_ns"], goid)
        got[ident] = (
            first["bytes_sent"],
            first["bytes_received"],
            first["net_sends"],
            first["net_recvs"],
        )
    assert got == traffic.expected()


async def _span_ids(bootstrap: str, expected: int) -> set[str]:
    decode = outside_decoder()
    records = await read_topic(bootstrap, OUT_TOPIC, expected, 1)
    return {decode(r.value)["span_id"] for r in records}
