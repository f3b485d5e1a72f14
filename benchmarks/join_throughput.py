"""Join throughput: input events per second per `ebpf-apm join` process.

Load: synthetic HTTP traffic of 8 Go processes, shaped like the agent's output. Each request
is a ServeHTTP span with a handler span inside (2 spans) and 4 network events on the
connection's goroutine: the request read just before ServeHTTP (it matches nothing), two
sends inside the handler, a final send inside ServeHTTP only. So a third of the input
becomes output records. Batches are cut per process every 200 ms of event time, as the agent
does, and published to topics of 4 partitions before the join starts.

Figures, each on the same data:
1. core: decode -> PartitionJoiner -> Avro encoding in this process, no Kafka (CPU time);
2. one join process against an embedded Tansu broker on this machine: from its first input
   record to its last acknowledged output span (wall clock), with its offset commits;
3. two join processes in one group (2 partitions each), same measure: the scaling figure.
The broker, the join processes and this script share the machine's cores: on 2 cores the
Kafka figures include Tansu's own work, and two processes compete with it.

Target: >= 300,000 input events/s per process. Exit status 1 only when a run fails (spans
missing or a worker error); a missed target is a printed line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from ebpf_apm.consumers import join_command, join_service
from ebpf_apm.consumers.join_input import read_net_message, read_span_message
from ebpf_apm.consumers.span_avro import encode_spans
from ebpf_apm.consumers.span_joiner import JoinSettings, PartitionJoiner
from ebpf_apm.kafka import topics
from ebpf_apm.kafka.admin import ensure_topics
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.deadletter import DeadLetter
from ebpf_apm.kafka.embedded_broker import EmbeddedBroker
from ebpf_apm.schemas.event_batch import (
    HttpColumns,
    NetBatch,
    SpanBatch,
    encode_net_batch,
    encode_span_batch,
)
from ebpf_apm.schemas.input_limits import TimeBounds

REPO = Path(__file__).resolve().parent.parent
MS = 1_000_000
S = 1000 * MS
PARTITIONS = 4
PROCESSES = 8
SLICE_NS = 200 * MS
TARGET_PER_PROCESS = 300_000
SPAN_TOPIC, NET_TOPIC = topics.SPAN_EVENTS, topics.NET_EVENTS
FUNCS = ["main.(*api).handleItem", "net/http.serverHandler.ServeHTTP"]


@dataclass(frozen=True)
class Message:
    topic: str
    key: bytes
    value: bytes
    events: int
    published_ns: int  # end of its 200 ms slice: when the agent would send it


def _slices(times: np.ndarray, t0: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(times, kind="stable")
    index = (times[order] - t0) // SLICE_NS
    cuts = np.flatnonzero(np.diff(index)) + 1
    return order, np.split(np.arange(len(order)), cuts)  # type: ignore[return-value]


def process_traffic(
    rng: np.random.Generator, node: str, pid: int, t0: int, duration_ns: int, requests: int
) -> list[Message]:
    """One process's requests over `duration_ns`: 64 keep-alive goroutines, each serving
    its requests one after the other."""
    goroutines = 64
    g = np.arange(requests) % goroutines
    k = np.arange(requests) // goroutines
    period = duration_ns // int(k.max() + 1)
    start = t0 + k * period + rng.integers(0, period // 4, requests) + g
    duration = rng.integers(period // 8, period // 2, requests)
    end = start + duration
    h_start, h_end = start + duration // 10, end - duration // 10
    goid = (1000 + g).astype(np.int64)
    tid = rng.integers(5000, 5016, requests).astype(np.uint32)
    key = f"{node}/{pid}".encode()
    messages: list[Message] = []

    span_start = np.concatenate([h_start, start])
    span_end = np.concatenate([h_end, end])
    span_func = np.repeat(np.array([0, 1], dtype=np.uint32), requests)
    span_goid, span_tid = np.concatenate([goid, goid]), np.concatenate([tid, tid])
    order, slices = _slices(span_end, t0)
    for rows in slices:
        idx = order[rows]
        http_rows = np.flatnonzero(span_func[idx] == 1).astype(np.uint32)
        request = idx[http_rows] - requests
        batch = SpanBatch(
            node, pid, f"/srv/app-{pid}", FUNCS,
            {
                "tid": span_tid[idx], "end_tid": span_tid[idx], "goid": span_goid[idx],
                "func": span_func[idx], "start_ns": span_start[idx], "end_ns": span_end[idx],
            },
            http=HttpColumns(
                http_rows, ["GET"] * len(http_rows),
                [f"/api/item/{r}" for r in request.tolist()],
                np.full(len(http_rows), 200, dtype=np.uint16),
            ),
        )  # fmt: skip
        last = int(span_end[idx].max())
        messages.append(
            Message(SPAN_TOPIC, key, encode_span_batch(batch), len(idx), last - last % SLICE_NS)
        )

    third = (h_end - h_start) // 3
    ts = np.concatenate([start - period // 8, h_start + third, h_start + 2 * third, h_end + 1])
    nbytes = np.concatenate([rng.integers(100, 400, requests), rng.integers(1, 9000, 3 * requests)])
    direction = np.repeat(np.array([1, 0, 0, 0], dtype=np.uint8), requests)
    net_goid, net_tid = np.tile(goid, 4), np.tile(tid, 4)
    order, slices = _slices(ts, t0)
    for rows in slices:
        idx = order[rows]
        n = len(idx)
        batch_columns = {
            "tid": net_tid[idx], "goid": net_goid[idx], "ts_ns": ts[idx], "bytes": nbytes[idx],
            "direction": direction[idx], "family": np.full(n, 2, dtype=np.uint8),
            "sport": np.full(n, 8080, dtype=np.uint16), "dport": np.full(n, 40000, np.uint16),
            "saddr": np.full(n, b"\x0a\x00\x00\x01", dtype="S16"),
            "daddr": np.full(n, b"\x0a\x00\x00\x02", dtype="S16"),
        }  # fmt: skip
        value = encode_net_batch(NetBatch(node, pid, f"/srv/app-{pid}", batch_columns))
        last = int(ts[idx].max())
        messages.append(Message(NET_TOPIC, key, value, n, last - last % SLICE_NS))
    return messages


def synthetic_traffic(events: int, duration_s: float) -> list[Message]:
    rng = np.random.default_rng(2024)
    t0 = (time.time_ns() - 3600 * S) // S * S
    requests = events // 6 // PROCESSES
    messages: list[Message] = []
    for i in range(PROCESSES):
        node, pid = f"node-{i % 3}", 4000 + i
        messages += process_traffic(rng, node, pid, t0, int(duration_s * S), requests)
    messages.sort(key=lambda m: m.published_ns)
    return messages


def partition_of(key: bytes) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % PARTITIONS


# -- 1. the join in this process, no Kafka ------------------------------------------------


BOUNDS = TimeBounds()  # the run's times are the last hour's


def core_throughput(messages: list[Message]) -> tuple[float, int]:
    """Input events per CPU second through decode, join and Avro encoding; spans out."""
    settings = JoinSettings(allowed_lateness_ns=200 * MS, idle_advance_ns=200 * MS)
    joiners = {p: PartitionJoiner(settings, 0) for p in range(PARTITIONS)}
    out = 0
    poll = 32  # messages per poll, then every partition advances
    started = time.process_time()
    for first in range(0, len(messages), poll):
        now = 0
        for i, m in enumerate(messages[first : first + poll], first):
            joiner = joiners[partition_of(m.key)]
            now = m.published_ns
            if m.topic == SPAN_TOPIC:
                spans = read_span_message(m.topic, 0, i, m.key, m.value, now, BOUNDS)
                assert not isinstance(spans, DeadLetter)
                joiner.add_spans(spans, None, now)
            else:
                net = read_net_message(m.topic, 0, i, m.key, m.value, now, BOUNDS)
                assert not isinstance(net, DeadLetter)
                joiner.add_net(net, now)
        for joiner in joiners.values():
            out += len(encode_spans(joiner.advance(now)).values)
    for joiner in joiners.values():
        out += len(encode_spans(joiner.advance(now + 10 * S)).values)
    elapsed = time.process_time() - started
    return sum(m.events for m in messages) / elapsed, out


# -- 2./3. join processes against a broker ------------------------------------------------


async def prefill(bootstrap: str, messages: list[Message]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, compression_type="lz4",
        max_batch_size=1 << 20, max_request_size=8 << 20,
    )  # fmt: skip
    await producer.start()
    try:
        for m in messages:
            await producer.send(m.topic, m.value, key=m.key)
        await producer.flush()
    finally:
        await producer.stop()


class Worker:
    """A join process (this file with --worker) and its latest progress report."""

    def __init__(self, bootstrap: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", "--bootstrap-servers", bootstrap],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.report: dict = {}

    def read(self) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"a join worker exited with {self.process.wait()}")
        self.report = json.loads(line)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        assert self.process.stdout is not None
        self.process.stdout.close()


def kafka_throughput(messages: list[Message], workers: int, spans: int) -> list[dict]:
    """`workers` join processes in one group on a fresh broker, until `spans` are acked.

    The workers join the group on empty topics and are stopped (SIGSTOP) once they share the
    partitions; the input is published, then they resume: the measure starts with a settled
    group and the whole input waiting, and the publisher does not compete for the cores."""
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        asyncio.run(
            ensure_topics(
                KafkaConnection(bootstrap), {SPAN_TOPIC: PARTITIONS, NET_TOPIC: PARTITIONS}
            )
        )
        procs = [Worker(bootstrap) for _ in range(workers)]
        try:
            deadline = time.monotonic() + 120
            while sorted(sum((w.report.get("partitions", []) for w in procs), [])) != list(
                range(PARTITIONS)
            ) or not all(w.report.get("partitions") for w in procs):
                if time.monotonic() > deadline:
                    raise RuntimeError("the join workers did not share the partitions")
                for w in procs:
                    w.read()
            for w in procs:
                w.process.send_signal(signal.SIGSTOP)
            asyncio.run(prefill(bootstrap, messages))
            for w in procs:
                w.process.send_signal(signal.SIGCONT)
            while sum(w.report.get("spans_acked", 0) for w in procs) < spans:
                if time.monotonic() > deadline + 300:
                    raise RuntimeError(f"spans missing: {[w.report for w in procs]}")
                for w in procs:
                    w.read()
            return [w.report for w in procs]
        finally:
            for w in procs:
                w.stop()


def worker(bootstrap: str) -> int:
    """A join process that prints its progress as a JSON line every 0.2 s."""
    args = argparse.ArgumentParser()
    join_command.add_arguments(args)
    config = join_command.config_from_args(
        args.parse_args(
            ["--bootstrap-servers", bootstrap, "--allowed-lateness-ms", "200",
             "--idle-advance-ms", "200", "--stats-interval-s", "3600",
             # Stopped while the input is published: the session must outlast that.
             "--session-timeout-ms", "60000"]
        )
    )  # fmt: skip

    async def serve() -> int:
        service = join_service.JoinService(config)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        task = asyncio.create_task(service.run(stop))
        cpu_at_first_input = None
        while not task.done():
            counters = service.input_counters()
            if cpu_at_first_input is None and service.totals.first_input_at is not None:
                cpu_at_first_input = time.process_time()
            report = {
                "partitions": service.partitions,
                "events_in": counters.spans_in + counters.net_in,
                "spans_acked": service.totals.spans_acked,
                "first_input_at": service.totals.first_input_at,
                "last_acked_at": service.totals.last_acked_at,
                # CPU seconds of this process since its first input (to 50 ms).
                "cpu_s": time.process_time() - (cpu_at_first_input or time.process_time()),
            }
            print(json.dumps(report), flush=True)
            await asyncio.wait({task}, timeout=0.05)
        return await task

    import uvloop

    return uvloop.run(serve())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_500_000, help="input events per run")
    parser.add_argument("--duration-s", type=float, default=20.0, help="event time they span")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap-servers", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.bootstrap_servers)

    messages = synthetic_traffic(args.events, args.duration_s)
    total = sum(m.events for m in messages)
    spans = sum(m.events for m in messages if m.topic == SPAN_TOPIC)
    print(
        f"input: {total:,} events ({spans:,} spans, {total - spans:,} network events) of "
        f"{PROCESSES} processes in {len(messages):,} messages, {PARTITIONS} partitions"
    )
    core, out = core_throughput(messages)
    assert out == spans, f"core: {out} spans out of {spans}"
    print(f"core (decode + join + Avro, one process, CPU time): {core:,.0f} events/s")

    failed = False
    single = 0.0
    for workers in (1, 2):
        try:
            reports = kafka_throughput(messages, workers, spans)
        except RuntimeError as exc:
            print(f"{workers} join process(es): FAILED: {exc}")
            failed = True
            continue
        first = min(r["first_input_at"] for r in reports)
        last = max(r["last_acked_at"] for r in reports)
        events = sum(r["events_in"] for r in reports)
        rate = events / (last - first)
        per = [r["events_in"] / (r["last_acked_at"] - r["first_input_at"]) for r in reports]
        per_cpu = [r["events_in"] / r["cpu_s"] for r in reports]
        print(
            f"{workers} join process(es), Kafka end to end: {rate:,.0f} events/s in all; "
            f"per process: {', '.join(f'{p:,.0f}' for p in per)} "
            f"(per CPU second of the join process: {', '.join(f'{p:,.0f}' for p in per_cpu)})"
        )
        if workers == 1:
            single = rate
        elif single:
            print(f"scaling 1 -> 2 processes: x{rate / single:.2f} (cores: {os.cpu_count()})")
        if min(per) < TARGET_PER_PROCESS:
            print(f"below the target of {TARGET_PER_PROCESS:,} events/s per process")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
