"""Agent throughput: span records from the kernel to acknowledged Kafka messages.

Load: benchmarks/getppid_load.py calls getppid() at a fixed rate on its own core; the span
program built with SYNTHETIC_SOURCE writes --burst ordinary span records per call, through
the same emit path as real probes. Agent: this process, pinned to one core, runs the
agent's stages on one thread as AgentPipeline.run wires them: AgentProbes' ring buffer ->
numpy drain on forced wakeups (loop.add_reader on wakeup_fds) and a 50 ms timer ->
SpanBatcher -> KafkaPublisher (lz4, acks=all), against an embedded Tansu broker that may
use both cores.

Baseline, same run, same generator and broker: the original design. The program is built
with USE_PERF_BUFFER, BCC's perf buffer calls one Python callback per record that decodes it
with struct into a dict, and msgpack messages of those dicts go through the same
KafkaPublisher.

Figures are printed beside the baseline's, as ratios. Exit status 1 only on a failure (a
stage crashed, or events are unaccounted for); a missed target is a printed line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import resource
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import uvloop

from ebpf_apm.kafka.admin import ensure_topics
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.embedded_broker import EmbeddedBroker
from ebpf_apm.producer.bpf_loader import AgentProbes, ProbeOptions
from ebpf_apm.producer.event_layout import SPAN_EVENT
from ebpf_apm.producer.kafka_publisher import KafkaPublisher, PublisherConfig
from ebpf_apm.producer.pipeline import PipelineSettings, boot_to_epoch_offset_ns
from ebpf_apm.producer.span_batcher import OutgoingBatch, SpanBatcher

GENERATOR = Path(__file__).resolve().parent / "getppid_load.py"
NODE = "bench-node"
# The synthetic source tags record i of a burst with func_id i & 7.
FUNCTION_NAMES = [f"main.synthetic{i}" for i in range(8)]
PARTITIONS = 6
TARGET_EVENTS_PER_S = 1_000_000
CONNECT_TIMEOUT_S = 15.0
FLUSH_TIMEOUT_S = 30.0
# The agent's defaults (producer/pipeline.py, producer/agent_command.py), for the baseline.
DRAIN_INTERVAL_S = PipelineSettings().drain_interval_s
MAX_BATCH_DELAY_NS = 200_000_000
# Baseline messages: a packed per-event dict is ~100 bytes, so this keeps a message under
# aiokafka's 1 MiB batch, as the project's 16384-span columnar batches are.
BASELINE_EVENTS_PER_MESSAGE = 8192
# struct span_event of bpf/events.h, as the original design decoded it.
SPAN_RECORD = struct.Struct("<HHIQQqIIII16sQQ")  # + trace_id, span_id, parent_span_id


class BenchmarkError(RuntimeError):
    """A stage failed: the figures would mean nothing."""


@dataclass
class PathResult:
    name: str
    generator_calls: int
    generator_s: float
    emitted: int  # records the kernel wrote
    ring_full: int  # records the kernel could not write
    read: int  # records the agent read
    acked: int
    publisher_dropped: int
    publisher_failed: int
    wall_s: float
    cpu_s: float
    note: str = ""

    @property
    def drops(self) -> int:
        return self.ring_full + self.publisher_dropped + self.publisher_failed

    @property
    def per_wall_s(self) -> float:
        return self.acked / self.wall_s

    @property
    def per_cpu_s(self) -> float:
        return self.acked / self.cpu_s if self.cpu_s > 0 else float("inf")

    def accounting_errors(self) -> list[str]:
        """Every record the kernel wrote must be read, then acked or counted as dropped."""
        errors = []
        if self.read != self.emitted:
            errors.append(f"kernel emitted {self.emitted:,} records, the agent read {self.read:,}")
        settled = self.acked + self.publisher_dropped + self.publisher_failed
        if settled != self.read:
            errors.append(f"read {self.read:,} records, acked or dropped {settled:,}")
        return errors


# -- measuring --------------------------------------------------------------------------


def cpu_seconds() -> float:
    """User + system time of this process, every thread (aiokafka, BCC, numpy included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """Wall and CPU time of this process since `start()`."""

    def __init__(self) -> None:
        self._wall0 = time.perf_counter()
        self._cpu0 = cpu_seconds()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self._wall0, cpu_seconds() - self._cpu0


def pin_process(cpu: int) -> None:
    """Pin every thread of this process (not just the caller) to one core."""
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), {cpu})


# -- load generator ---------------------------------------------------------------------


class LoadGenerator:
    """benchmarks/getppid_load.py as a child process, started and stopped by pid."""

    def __init__(self, cpu: int, calls_per_s: float, seconds: float) -> None:
        self.seconds = seconds
        self._proc = subprocess.Popen(
            [sys.executable, str(GENERATOR), str(cpu), str(calls_per_s), str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().split()
        if line[:1] != ["READY"]:
            self.close()
            raise BenchmarkError(f"load generator printed {line!r} instead of READY <pid>")
        self.pid = int(line[1])

    def go(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write("go\n")
        self._proc.stdin.flush()

    async def finished(self) -> tuple[int, float]:
        """Wait for its end without blocking the event loop; (calls made, seconds)."""
        await asyncio.sleep(self.seconds)
        while self._proc.poll() is None:
            await asyncio.sleep(0.01)
        assert self._proc.stdout is not None
        words = self._proc.stdout.read().split()
        if self._proc.returncode != 0 or words[:1] != ["DONE"]:
            raise BenchmarkError(
                f"load generator exited with {self._proc.returncode}, printed {words!r}"
            )
        return int(words[1]), float(words[2])

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- shared Kafka plumbing --------------------------------------------------------------


def publisher_config(bootstrap: str, topic: str) -> PublisherConfig:
    # Exactly the agent's settings (acks=all, lz4, 64 MiB buffer) except the client id.
    return PublisherConfig(
        connection=KafkaConnection(bootstrap),
        topic=topic,
        acks="all",
        compression="lz4",
        client_id="ebpf-apm-bench",
    )


async def fresh_topic(bootstrap: str) -> str:
    topic = f"bench.throughput.{uuid.uuid4().hex[:8]}"
    await ensure_topics(KafkaConnection(bootstrap), {topic: PARTITIONS})
    return topic


async def wait_connected(publisher: KafkaPublisher) -> None:
    """Start the clock only once the publisher is connected: connecting is not throughput."""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while not publisher.stats.connected:
        if time.monotonic() > deadline:
            raise BenchmarkError("the Kafka publisher did not connect to the embedded broker")
        await asyncio.sleep(0.01)


# -- one measured run -------------------------------------------------------------------

DrainLoop = Callable[[KafkaPublisher, asyncio.Event], Coroutine[Any, Any, int]]


async def measure_path(
    name: str, args: argparse.Namespace, bootstrap: str, probes: AgentProbes, loop: DrainLoop
) -> PathResult:
    """Load `probes` with the generator while `loop` drains and publishes; stop, flush, count.

    The clock runs from the generator's start until every accepted message is acknowledged.
    """
    publisher = KafkaPublisher(publisher_config(bootstrap, await fresh_topic(bootstrap)))
    await publisher.start()
    stop = asyncio.Event()
    with LoadGenerator(args.generator_cpu, args.rate / args.burst, args.seconds) as gen:
        probes.set_synthetic_pid(gen.pid)
        await wait_connected(publisher)
        draining = asyncio.create_task(loop(publisher, stop))
        meter = Meter()
        gen.go()
        calls, gen_s = await gen.finished()
        stop.set()
        read = await draining
        if not await publisher.flush(FLUSH_TIMEOUT_S):
            raise BenchmarkError(f"{name}: events unacknowledged after {FLUSH_TIMEOUT_S:g} s")
        wall, cpu = meter.read()
    await publisher.close(1.0)
    kernel = probes.counters()
    stats = publisher.stats
    return PathResult(
        name,
        calls,
        gen_s,
        kernel["emitted"],
        kernel["ring_full"],
        read,
        stats.acked_events,
        stats.dropped_events,
        stats.failed_events,
        wall,
        cpu,
    )


async def publish(publisher: KafkaPublisher, batches: list[OutgoingBatch]) -> None:
    for batch in batches:
        await publisher.publish(batch.key, batch.value, batch.events)


async def wake_or_timeout(wake: asyncio.Event) -> None:
    """The agent's wait: until a reader wakeup, or DRAIN_INTERVAL_S at the latest."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), DRAIN_INTERVAL_S)
    wake.clear()


@contextlib.contextmanager
def readers(fds: list[int], wake: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    for fd in fds:
        loop.add_reader(fd, wake.set)
    try:
        yield
    finally:
        for fd in fds:
            loop.remove_reader(fd)


# -- the project's path -----------------------------------------------------------------


async def run_project(args: argparse.Namespace, bootstrap: str) -> PathResult:
    options = ProbeOptions(synthetic_burst=args.burst, span_ring_pages=args.ring_pages)
    probes = AgentProbes(options)
    batcher = SpanBatcher(
        node=NODE,
        function_names=FUNCTION_NAMES,
        process_info={},
        boot_to_epoch_ns=boot_to_epoch_offset_ns(),
    )

    async def drain_loop(publisher: KafkaPublisher, stop: asyncio.Event) -> int:
        """AgentPipeline.run's loop for the span stream (producer/pipeline.py): drain on a
        forced wakeup or the timer, batch per process, publish full and due batches."""
        wake = asyncio.Event()
        read = 0
        with readers(probes.wakeup_fds, wake):
            while not stop.is_set():
                await wake_or_timeout(wake)
                read += await drain_once(probes, batcher, publisher)
            read += await drain_once(probes, batcher, publisher)
            await publish(publisher, batcher.flush_all())
        return read

    try:
        name = "project: ringbuf, numpy drain, columnar batches"
        return await measure_path(name, args, bootstrap, probes, drain_loop)
    finally:
        probes.close()


async def drain_once(probes: AgentProbes, batcher: SpanBatcher, publisher: KafkaPublisher) -> int:
    now = time.monotonic_ns()
    spans = probes.span_reader.drain()
    http = probes.http_reader.drain()
    await publish(publisher, batcher.add([spans, http], now) + batcher.due(now))
    return len(spans) + len(http)


# -- the baseline: the original design's path -----------------------------------------


def opened_perf_table(bpf: Any, name: bytes) -> Any:
    """The table object AgentProbes opened its perf readers on.

    BCC caches table objects by the spelling of the key ("x" and b"x" give two objects for
    one map), so look for the one holding readers rather than guess the spelling.
    """
    for table in bpf.tables.values():
        if getattr(table, "_name", None) == name and getattr(table, "_open_key_fds", None):
            return table
    raise BenchmarkError(f"no perf reader open on {name.decode()}: has AgentProbes changed?")


class PerEventCollector:
    """BCC's perf buffer with a Python callback per record, decoding it into a dict."""

    def __init__(self, bpf: Any, pages: int, wakeup_events: int) -> None:
        if SPAN_RECORD.size != SPAN_EVENT.itemsize:
            raise BenchmarkError("SPAN_RECORD no longer matches struct span_event")
        self.pending: dict[int, list[dict[str, Any]]] = {}
        self.first_seen_ns: dict[int, int] = {}
        self.received = 0
        self.lost = 0
        self.boot_to_epoch_ns = boot_to_epoch_offset_ns()
        table = opened_perf_table(bpf, b"span_events")
        # AgentProbes opened its own perf reader on this table (string_at per record, bulk
        # numpy afterwards). The original design decoded in the callback: replace it.
        for cpu in list(table._open_key_fds):
            del table[cpu]
        table.open_perf_buffer(
            self._on_record, page_cnt=pages, lost_cb=self._on_lost, wakeup_events=wakeup_events
        )
        self._bpf = bpf

    def _on_record(self, _cpu: int, data: int, _size: int) -> None:
        _kind, _len, pid, ts, start, goid, tid, end_tid, func_id, _pad, *_ids = SPAN_RECORD.unpack(
            ctypes.string_at(data, SPAN_RECORD.size)
        )
        offset = self.boot_to_epoch_ns
        row = {
            "pid": pid,
            "tid": tid,
            "end_tid": end_tid,
            "goid": goid,
            "func": FUNCTION_NAMES[func_id],
            "start_ns": start + offset,
            "end_ns": ts + offset,
        }
        rows = self.pending.get(pid)
        if rows is None:
            rows = self.pending[pid] = []
            self.first_seen_ns[pid] = time.monotonic_ns()
        rows.append(row)
        self.received += 1

    def _on_lost(self, count: int) -> None:
        self.lost += count

    def fds(self) -> list[int]:
        from bcc.libbcc import lib  # noqa: PLC0415 - only the baseline reaches into BCC

        return [lib.perf_reader_fd(reader) for reader in self._bpf.perf_buffers.values()]

    def poll(self) -> None:
        self._bpf.perf_buffer_consume()

    def batches(self, now_ns: int, everything: bool) -> list[OutgoingBatch]:
        """Messages of up to BASELINE_EVENTS_PER_MESSAGE rows: full ones, or all once due."""
        out: list[OutgoingBatch] = []
        for pid in list(self.pending):
            rows = self.pending[pid]
            due = everything or now_ns - self.first_seen_ns[pid] >= MAX_BATCH_DELAY_NS
            while len(rows) >= BASELINE_EVENTS_PER_MESSAGE or (due and rows):
                chunk = rows[:BASELINE_EVENTS_PER_MESSAGE]
                del rows[:BASELINE_EVENTS_PER_MESSAGE]
                out.append(encode_rows(pid, chunk))
            if not rows:
                del self.pending[pid], self.first_seen_ns[pid]
        return out


def encode_rows(pid: int, rows: list[dict[str, Any]]) -> OutgoingBatch:
    value = msgpack.packb({"node": NODE, "pid": pid, "events": rows}, use_bin_type=True)
    return OutgoingBatch(key=f"{NODE}/{pid}".encode(), value=value, events=len(rows))


def per_cpu_pages(total: int) -> int:
    """The project's ring memory split over the per-CPU perf buffers (a power of two)."""
    share = max(1, total // (os.cpu_count() or 1))
    return 1 << (share.bit_length() - 1)


async def run_baseline(args: argparse.Namespace, bootstrap: str) -> PathResult:
    probes = AgentProbes(ProbeOptions(use_perf_buffer=True, synthetic_burst=args.burst))
    pages = per_cpu_pages(args.ring_pages)
    collector = PerEventCollector(probes._bpf, pages, args.baseline_wakeup_events)

    async def drain_loop(publisher: KafkaPublisher, stop: asyncio.Event) -> int:
        """The agent's wake-up policy, so only the reading and encoding differ."""
        wake = asyncio.Event()
        with readers(collector.fds(), wake):
            while not stop.is_set():
                await wake_or_timeout(wake)
                collector.poll()
                await publish(publisher, collector.batches(time.monotonic_ns(), False))
            collector.poll()
            await publish(publisher, collector.batches(time.monotonic_ns(), True))
        return collector.received

    try:
        name = "baseline: perf buffer, callback + dict per event"
        result = await measure_path(name, args, bootstrap, probes, drain_loop)
    finally:
        probes.close()
    # Cross-check: a failed perf_submit is counted by the program (ring_full), and the
    # kernel reports the same records to the lost callback.
    result.note = (
        f"perf buffers of {pages} pages per CPU, reader woken every "
        f"{args.baseline_wakeup_events} records; BCC's lost callback reported "
        f"{collector.lost:,} records lost"
    )
    return result


# -- report -----------------------------------------------------------------------------


def describe(result: PathResult, burst: int) -> None:
    offered = result.generator_calls * burst
    print(f"\n{result.name}")
    print(
        f"  generator: {result.generator_calls:,} getppid() in {result.generator_s:.2f} s "
        f"= {result.generator_calls / result.generator_s:,.0f} calls/s "
        f"-> {offered / result.generator_s:,.0f} events/s offered"
    )
    print(
        f"  kernel: emitted {result.emitted:,}, lost (ring full) {result.ring_full:,}; "
        f"agent read {result.read:,}"
    )
    print(
        f"  kafka: acked {result.acked:,}, publisher dropped {result.publisher_dropped:,}, "
        f"failed {result.publisher_failed:,}"
    )
    print(
        f"  wall {result.wall_s:.2f} s, agent CPU {result.cpu_s:.2f} s "
        f"({100 * result.cpu_s / result.wall_s:.0f}% of its core)"
    )
    if result.note:
        print(f"  {result.note}")


def offered_text(rate: float) -> str:
    return f"{rate:,.0f} events/s" if rate > 0 else "as many events as the generator can"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b > 0 else "n/a"


def print_table(project: PathResult | None, baseline: PathResult | None) -> None:
    rows = [r for r in (project, baseline) if r is not None]
    name_w = max(len(r.name) for r in rows)
    print(
        f"\n{'path':<{name_w}}  {'events/s (wall)':>15}  {'events/agent-CPU-s':>18}  "
        f"{'drops (kernel + publisher)':>26}"
    )
    for r in rows:
        drops = f"{r.ring_full:,} + {r.publisher_dropped + r.publisher_failed:,}"
        print(f"{r.name:<{name_w}}  {r.per_wall_s:>15,.0f}  {r.per_cpu_s:>18,.0f}  {drops:>26}")
    if project is not None and baseline is not None:
        print(
            f"{'ratio project/baseline':<{name_w}}  "
            f"{ratio(project.per_wall_s, baseline.per_wall_s):>15}  "
            f"{ratio(project.per_cpu_s, baseline.per_cpu_s):>18}"
        )


def print_verdict(project: PathResult, rate: float) -> None:
    met = project.per_wall_s >= TARGET_EVENTS_PER_S and project.drops == 0
    print(
        f"\ntarget >= {TARGET_EVENTS_PER_S:,} events/s to acked Kafka messages on one agent "
        f"core, zero drops: {'target met' if met else 'target NOT met'} "
        f"({project.per_wall_s:,.0f} events/s, {project.drops:,} drops, "
        f"{100 * project.cpu_s / project.wall_s:.0f}% of the core busy)"
    )
    if rate <= 0:
        print(
            "  (saturating load: the kernel drops what the agent cannot take; the figure is "
            "the agent's ceiling)"
        )
    elif rate < TARGET_EVENTS_PER_S:
        print(f"  (offered only {rate:,.0f} events/s: raise --rate to test the target)")


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration per path")
    parser.add_argument(
        "--rate",
        type=float,
        default=1_200_000,
        help="offered events/s (0: as fast as the generator can)",
    )
    parser.add_argument(
        "--burst",
        type=int,
        default=64,
        help="span records the kernel writes per getppid() (SYNTHETIC_BURST)",
    )
    parser.add_argument(
        "--ring-pages",
        type=int,
        default=8192,
        help="pages of the span ring buffer (the baseline's perf buffers "
        "get the same memory in total)",
    )
    parser.add_argument(
        "--baseline-wakeup-events",
        type=int,
        default=ProbeOptions().wakeup_every,
        help="records per reader wakeup of the baseline's perf buffer (default: the agent's "
        "WAKEUP_EVERY). BCC's default, 1, costs the traced thread a self-IPI per record, "
        "~10 us on this VM, and throttles the generator far below the offered rate",
    )
    parser.add_argument("--paths", choices=("both", "project", "baseline"), default="both")
    parser.add_argument("--agent-cpu", type=int, default=0)
    parser.add_argument("--generator-cpu", type=int, default=1)
    return parser.parse_args(argv)


def run_paths(args: argparse.Namespace, bootstrap: str) -> tuple[PathResult | None, ...]:
    # One event loop per path (uvloop, as the agent runs): nothing of one path's loop,
    # signal handlers included, outlives it.
    project = baseline = None
    if args.paths in ("both", "project"):
        project = uvloop.run(run_project(args, bootstrap))
        describe(project, args.burst)
    if args.paths in ("both", "baseline"):
        baseline = uvloop.run(run_baseline(args, bootstrap))
        describe(baseline, args.burst)
    return project, baseline


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(
        f"agent throughput, {time.strftime('%Y-%m-%d %H:%M')}, {os.uname().release}: "
        f"{args.seconds:g} s per path, offered {offered_text(args.rate)} "
        f"({args.burst} records per getppid()), span ring {args.ring_pages} pages, "
        f"agent on cpu {args.agent_cpu}, generator on cpu {args.generator_cpu}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    try:
        with EmbeddedBroker() as broker:
            # After the broker started: it inherits no pinning and floats on both cores.
            pin_process(args.agent_cpu)
            project, baseline = run_paths(args, broker.bootstrap_servers)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_table(project, baseline)
    failed = False
    for result in (r for r in (project, baseline) if r is not None):
        for error in result.accounting_errors():
            print(f"error: {result.name}: {error}", file=sys.stderr)
            failed = True
    if project is not None:
        print_verdict(project, args.rate)
    # Other work on these two cores slows the wall figures; the per-CPU-second ones less so.
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (2 cores)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
