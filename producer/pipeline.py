"""The node agent's drain loop: ring buffers -> batchers -> publishers, for every stream.

    kernel probes -> ring buffers -> drain (numpy) -> per-process batchers -> Kafka publishers
      spans + HTTP spans ---------------------------> SpanBatcher -> apm.uprobe.events
      socket sends/receives ------------------------> NetBatcher  -> apm.kprobe.events

Each line is a `RecordStream`: the rings it drains, its batcher, its publisher. The loop
treats them alike. The agent is assembled in ebpf_apm.producer.agent.

Processes are attached and detached in one worker thread ("probe-attach"), in the order
asked: perf_event_open of a uprobe can wait on the kernel's perf event mutex (held by the
detaches of exited processes, a grace period each), and the drain loop must not wait with
it. Because the order is kept, the exit of a process whose probes are still being attached
removes them after the attach, never before or halfway (`attach_running`, `detach`).

The reader drains when the kernel forces a wakeup (enough records wait on a CPU) and on a
short timer, so a quiet process's records still leave within the batch delay. Every loss is
counted where it happens: in the kernel (ring full, in-flight table full), in a publisher
(buffer full while the broker is away). A stats line reports them, and what the probes cost
each traced process (hits per second and CPU share, from the ProbeCostMeter).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ebpf_apm.kafka.admin import ensure_topics
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.producer.bpf_loader import AgentProbes, Reader
from ebpf_apm.producer.kafka_publisher import KafkaPublisher, PublisherStats
from ebpf_apm.producer.probe_cost import (
    ProbeCostMeter,
    ProcessCost,
    cost_rates,
    format_rates,
    format_totals,
)
from ebpf_apm.producer.span_batcher import OutgoingBatch, ProcessBatcher, ProcessInfo
from ebpf_apm.producer.targets import TargetProcess, attach_target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineSettings:
    partitions: int = 6  # both topics alike: consumers join them partition by partition
    drain_interval_s: float = 0.05
    stats_interval_s: float = 10.0
    exit_when_targets_gone: bool = True
    close_timeout_s: float = 10.0
    max_call_s: float = 3600.0  # a call in flight longer than this is taken as abandoned
    health_file: str | None = None  # touched every second while the drain loop runs


def boot_to_epoch_offset_ns() -> int:
    """Unix epoch minus CLOCK_BOOTTIME (the BPF clock), from the tightest of a few samples."""
    best: tuple[int, int] | None = None
    for _ in range(5):
        before = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        wall = time.time_ns()
        after = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        if best is None or after - before < best[0]:
            best = (after - before, wall - (before + after) // 2)
    assert best is not None
    return best[1]


@dataclass
class RecordStream:
    """One kind of record on its way from its rings to its topic."""

    name: str  # "spans" | "net": how the stats line and metrics name it
    readers: tuple[Reader, ...]  # drained in this order; the batcher's RINGS
    batcher: ProcessBatcher
    publisher: KafkaPublisher
    records_read: int = 0

    @property
    def topic(self) -> str:
        return self.publisher.config.topic


class AgentPipeline:
    def __init__(
        self,
        probes: AgentProbes,
        streams: list[RecordStream],
        process_info: dict[int, ProcessInfo],
        connection: KafkaConnection,
        settings: PipelineSettings,
        cost_meter: ProbeCostMeter | None = None,
        on_turn: Callable[[], None] = lambda: None,
    ) -> None:
        """`process_info` is the table the batchers name processes from: the pipeline keeps
        it as processes are attached and detached. `cost_meter` puts the probes' cost per
        process in the stats line. `on_turn` is called each time the drain loop goes round
        (liveness)."""
        self.probes = probes
        self.streams = streams
        self.targets: dict[int, TargetProcess] = {}
        self.process_info = process_info
        self.connection = connection
        self.settings = settings
        self._stop = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._pidfds: dict[int, int] = {}
        self._running = False
        self._retired: set[int] = set()  # detached; names kept until their last batch is cut
        self._health_at = 0.0
        self.cost_meter = cost_meter
        self._costs: dict[int, ProcessCost] = {}  # at the previous stats line
        self._costs_at = time.monotonic()
        # Processes detached before the end (exited): their costs summed, for the totals line.
        # Written by the probe worker only.
        self._detached_hits, self._detached_cpu_ns = 0, 0.0
        self._on_turn = on_turn
        # Every attach and detach of the probes, in the order asked (see the module doc).
        self._probe_worker = ThreadPoolExecutor(1, thread_name_prefix="probe-attach")
        self._attaching: dict[int, object] = {}  # pid -> the attach under way for it

    def attach(self, target: TargetProcess, k8s: dict[str, str | None] | None = None) -> None:
        """Attach one resolved target now (before `run`: the static targets)."""
        self._retired.discard(target.pid)
        self._probe_worker.submit(attach_target, self.probes, target).result()
        self._attached(target, k8s)

    async def attach_running(
        self, target: TargetProcess, k8s: dict[str, str | None] | None = None
    ) -> bool:
        """Attach a process that appeared while the drain loop runs, in the probe worker.

        Raises what `attach_target` raises (nothing of the process is left then). Returns
        False if the process was detached meanwhile (it exited): the detach, queued behind
        the attach, removes its probes. A caller cancelled meanwhile undoes the attach."""
        pid = target.pid
        self._retired.discard(pid)
        attach = object()
        self._attaching[pid] = attach
        job = asyncio.wrap_future(self._probe_worker.submit(attach_target, self.probes, target))
        job.add_done_callback(_consume_error)  # read here, or by no one if cancelled
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            if self._attaching.get(pid) is attach:
                self.detach(pid)
            raise
        except BaseException:
            if self._attaching.get(pid) is attach:
                del self._attaching[pid]
            raise
        if self._attaching.get(pid) is not attach:
            return False
        del self._attaching[pid]
        self._attached(target, k8s)
        return True

    def _attached(self, target: TargetProcess, k8s: dict[str, str | None] | None) -> None:
        self.targets[target.pid] = target
        self.process_info[target.pid] = ProcessInfo(exe=target.exe, k8s=k8s)
        if self._running:
            self._watch_exit(target.pid)

    def detach(self, pid: int) -> Future[None] | None:
        """Remove a process's probes (in the probe worker, after an attach of it still under
        way); its records already read still leave with its name. None if it was not
        attached, else the removal's future."""
        self._unwatch(pid)
        attached = self.targets.pop(pid, None) is not None
        attaching = self._attaching.pop(pid, None) is not None
        if not (attached or attaching):
            return None  # detached already (its pidfd and the exit event both report it)
        self._retired.add(pid)
        return self._probe_worker.submit(self._remove_probes, pid)

    def _remove_probes(self, pid: int) -> None:
        """In the probe worker: the process's last cost figures, then its probes and map
        entries."""
        try:
            if self.cost_meter is not None:  # before detaching clears its counters
                cost = self.cost_meter.final(pid)
                if cost is not None:
                    self._detached_hits += cost.hits
                    self._detached_cpu_ns += cost.cpu_ns
            self.probes.detach_process(pid)
        except Exception:  # a bug: say so (no one reads the future), and go on
            log.exception("detaching pid %d failed", pid)

    async def probe_jobs_done(self) -> None:
        """Until every attach and detach asked for so far has run."""
        await asyncio.wrap_future(self._probe_worker.submit(lambda: None))

    def close(self) -> None:
        """After `run`: wait for the probe worker's last jobs and end it."""
        self._probe_worker.shutdown(wait=True)

    def update_process(self, pid: int, k8s: dict[str, str | None] | None) -> None:
        """New Kubernetes names for a traced process (the kubelet reported its container)."""
        info = self.process_info.get(pid)
        if info is not None:
            self.process_info[pid] = ProcessInfo(exe=info.exe, k8s=k8s)

    async def run(self, stop: asyncio.Event) -> int:
        """Drain until `stop` is set (or every target exited); then detach, drain, flush."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.create_task(stop.wait())

        def on_stop_request(waited: asyncio.Task[bool]) -> None:
            if not waited.cancelled():
                self.stop("SIGTERM or SIGINT")

        stopping.add_done_callback(on_stop_request)
        for fd in self.probes.wakeup_fds:
            loop.add_reader(fd, self._wakeup.set)
        self._running = True
        for pid in list(self.targets):
            self._watch_exit(pid)
        kafka = asyncio.create_task(self._start_kafka())
        stats = asyncio.create_task(self._report_periodically())
        try:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self.settings.drain_interval_s)
                self._wakeup.clear()
                await self._drain_once()
                self._touch_health()
                self._on_turn()
            await self.probe_jobs_done()  # exits seen so far are accounted for
            if self.cost_meter is not None:  # the last figures, before detaching clears them
                self._costs = self.cost_meter.sample()
            # Detach first, so the last drain sees every record the probes will ever write;
            # attaches still under way too (queued after them).
            for pid in [*self.targets, *self._attaching]:
                self._probe_worker.submit(self.probes.detach_process, pid)
            self._attaching.clear()
            await self.probe_jobs_done()
            await self._drain_once()
            flushed = True
            for stream in self.streams:
                await self._publish(stream, stream.batcher.flush_all())
            if not kafka.done():  # never reached the broker: start so the flush can try
                kafka.cancel()
                for stream in self.streams:
                    if not stream.publisher.started:
                        await stream.publisher.start()
            for stream in self.streams:
                flushed &= await stream.publisher.flush(self.settings.close_timeout_s)
                await stream.publisher.close(1.0)
        finally:
            stopping.cancel()
            kafka.cancel()
            stats.cancel()
            for fd in self.probes.wakeup_fds:
                loop.remove_reader(fd)
            for pid in list(self._pidfds):
                self._unwatch(pid)
        self._report(final=True)
        if not flushed:
            log.error(
                "events still unacknowledged after %.0f s; they are lost",
                self.settings.close_timeout_s,
            )
            return 1
        return 0

    @property
    def running(self) -> bool:
        """Between the start of `run` and its end: probes loaded, the drain loop turning."""
        return self._running and not self._stop.is_set()

    def stop(self, reason: str) -> None:
        if not self._stop.is_set():
            log.info("stopping (%s): draining and flushing", reason)
            self._stop.set()

    async def _drain_once(self) -> None:
        now = time.monotonic_ns()
        for stream in self.streams:
            drained = [reader.drain() for reader in stream.readers]
            stream.records_read += sum(len(records) for records in drained)
            batches = stream.batcher.add(drained, now)
            await self._publish(stream, batches + stream.batcher.due(now))
        done = [p for p in self._retired if not any(s.batcher.has_pending(p) for s in self.streams)]
        for pid in done:  # without this, thousands of short-lived processes would pile up
            self._retired.discard(pid)
            self.process_info.pop(pid, None)

    def _touch_health(self) -> None:
        now = time.monotonic()
        if self.settings.health_file and now - self._health_at >= 1.0:
            self._health_at = now
            with contextlib.suppress(OSError):
                Path(self.settings.health_file).touch()

    async def _publish(self, stream: RecordStream, batches: list[OutgoingBatch]) -> None:
        for batch in batches:
            await stream.publisher.publish(batch.key, batch.value, batch.events)

    def _watch_exit(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._on_exit(pid)
            return
        self._pidfds[pid] = fd
        asyncio.get_running_loop().add_reader(fd, self._on_exit, pid)

    def _unwatch(self, pid: int) -> None:
        fd = self._pidfds.pop(pid, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def _on_exit(self, pid: int) -> None:
        target = self.targets.get(pid)
        # The process is gone, so its probes are too; its last records are still in the ring
        # and leave with the next drain. Remove its map entries so nothing leaks.
        self.detach(pid)
        log.warning(
            "process %d (%s) exited; its probes were removed", pid, target.exe if target else "?"
        )
        if not self.targets and self.settings.exit_when_targets_gone:
            self.stop("every traced process has exited")

    async def _start_kafka(self) -> None:
        """Create both topics with one partition count before anything is published: a
        broker that auto-creates topics on first use would give them its default count, and
        consumers join the topics partition by partition."""
        wanted = {stream.topic: self.settings.partitions for stream in self.streams}
        delay, warned = 0.5, False
        while True:
            try:
                counts = await ensure_topics(self.connection, wanted)
                break
            except Exception as exc:  # retried; events wait in the publishers' buffers
                if not warned:
                    log.warning("Kafka unreachable: %s; retrying, events are buffered", exc)
                    warned = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        if len({counts.get(topic) for topic in wanted}) > 1:
            log.error(
                "topics %s have different partition counts (%s): consumers cannot join them; "
                "recreate them with equal counts",
                ", ".join(wanted),
                counts,
            )
        for stream in self.streams:
            if not stream.publisher.started:
                await stream.publisher.start()

    async def _report_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.stats_interval_s)
            abandoned = self.probes.sweep_abandoned_calls(int(self.settings.max_call_s * 1e9))
            if abandoned:
                log.info(
                    "forgot %d call(s) in flight for over %.0f s (a panic or Goexit skipped "
                    "their return)",
                    abandoned,
                    self.settings.max_call_s,
                )
            self._report(final=False)

    def _report(self, final: bool) -> None:
        kernel = self.probes.counters()
        streams = {stream.name: stream for stream in self.streams}
        spans = streams["spans"]
        span_pub = spans.publisher.stats
        lost = kernel["ring_full"] + kernel["table_full"] + kernel["net_ring_full"]
        lost += sum(_dropped(s.publisher.stats) for s in self.streams)
        line = (
            f"spans read {spans.records_read}, kernel emitted {kernel['emitted']}, "
            f"lost in kernel (ring full) {kernel['ring_full']}, "
            f"untimed (table full) {kernel['table_full']}, "
            f"returns without entry {kernel['return_without_entry']}, "
            f"read failures {kernel['read_failed']}; span events acked {span_pub.acked_events}, "
            f"dropped by publisher {_drops(span_pub)}, failed {span_pub.failed_events}"
        )
        net = streams.get("net")
        if net is not None:
            net_pub = net.publisher.stats
            line += (
                f"; network events read {net.records_read}, kernel emitted "
                f"{kernel['net_emitted']}, lost in kernel {kernel['net_ring_full']}, acked "
                f"{net_pub.acked_events}, dropped {_drops(net_pub)}, "
                f"failed {net_pub.failed_events}"
            )
        if not final and not all(s.publisher.stats.connected for s in self.streams):
            buffered = sum(s.publisher.stats.buffered_bytes for s in self.streams)
            line += f"; Kafka unreachable, {buffered} bytes buffered"
        if self.cost_meter is not None:
            line += "; probe cost: " + (self._cost_summary(final) or "no traced process")
        level = logging.WARNING if final and lost else logging.INFO
        log.log(level, "%s: %s", "totals" if final else "stats", line)

    def _cost_summary(self, final: bool) -> str:
        assert self.cost_meter is not None
        if final:
            summary = format_totals(self._costs)
            if self._detached_hits:
                summary += (", " if summary else "") + (
                    f"processes gone before the end: hits {self._detached_hits} "
                    f"cpu {self._detached_cpu_ns / 1e9:.3f} s"
                )
            return summary
        now, costs = time.monotonic(), self.cost_meter.sample()
        rates = cost_rates(self._costs, costs, now - self._costs_at)
        self._costs, self._costs_at = costs, now
        return format_rates(rates)


def _consume_error(job: asyncio.Future[None]) -> None:
    """Mark a finished attach's exception as read: asyncio would log it as lost when its
    awaiting caller was cancelled (the detach that cancelled it cleans up)."""
    if not job.cancelled():
        job.exception()


def _drops(stats: PublisherStats) -> str:
    """ "N events (M messages, buffer full)": what the publisher dropped, exactly."""
    if not stats.dropped_messages:
        return "0"
    return f"{stats.dropped_events} ({stats.dropped_messages} messages, buffer full)"


def _dropped(stats: PublisherStats) -> int:
    return stats.dropped_events + stats.failed_events
