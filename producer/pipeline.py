"""The node agent's stages, wired in one place.

    kernel probes -> ring buffers -> drain (numpy) -> SpanBatcher (per pid) -> KafkaPublisher

The reader drains when the kernel forces a wakeup (enough records wait on a CPU) and on a
short timer, so a quiet process's spans still leave within the batch delay. Every loss is
counted where it happens: in the kernel (ring full, in-flight table full), in the publisher
(buffer full while the broker is away). A stats line reports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field

from producer.bpf_loader import SpanProbes
from producer.kafka_publisher import KafkaPublisher, ensure_topics
from producer.span_batcher import OutgoingBatch, ProcessInfo, SpanBatcher
from producer.targets import TargetProcess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineSettings:
    topic: str = "apm.uprobe.events"
    partitions: int = 6
    drain_interval_s: float = 0.05
    stats_interval_s: float = 10.0
    exit_when_targets_gone: bool = True
    close_timeout_s: float = 10.0


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
class AgentTotals:
    records_read: int = 0
    batches_out: int = 0
    processes_exited: int = 0
    kernel: dict[str, int] = field(default_factory=dict)


class AgentPipeline:
    def __init__(
        self,
        probes: SpanProbes,
        publisher: KafkaPublisher,
        batcher: SpanBatcher,
        targets: list[TargetProcess],
        bootstrap_servers: str,
        settings: PipelineSettings,
    ) -> None:
        self.probes = probes
        self.publisher = publisher
        self.batcher = batcher
        self.targets = {t.pid: t for t in targets}
        self.bootstrap_servers = bootstrap_servers
        self.settings = settings
        self.totals = AgentTotals()
        self._stop = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._pidfds: dict[int, int] = {}
        self.exit_reason = ""

    def attach(self, target: TargetProcess) -> None:
        """Attach one resolved target (called before `run`, or as processes appear)."""
        self.probes.add_process(target.pid, target.layout)
        for fn in target.functions:
            self.probes.attach_function(
                target.pid,
                target.binary,
                target.load_bias,
                fn.plan.symbol.address,
                fn.plan.entry_offset,
                fn.plan.return_offsets,
                fn.func_id,
                fn.http,
                target.layout.is_go,
            )
        self.targets[target.pid] = target
        self.batcher.process_info[target.pid] = ProcessInfo(exe=target.exe)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, f"signal {signal.Signals(sig).name}")
        for fd in self.probes.wakeup_fds:
            loop.add_reader(fd, self._wakeup.set)
        for pid in self.targets:
            self._watch_exit(pid)
        self.batcher.boot_to_epoch_ns = boot_to_epoch_offset_ns()
        await self.publisher.start()
        topics = asyncio.create_task(self._ensure_topic())
        stats = asyncio.create_task(self._report_periodically())
        try:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self.settings.drain_interval_s)
                self._wakeup.clear()
                await self._drain_once()
            # Detach first, so the last drain sees every record the probes will ever write.
            for pid in list(self.targets):
                self.probes.detach_process(pid)
            await self._drain_once()
            await self._publish(self.batcher.flush_all())
            flushed = await self.publisher.flush(self.settings.close_timeout_s)
            await self.publisher.close(1.0)
        finally:
            topics.cancel()
            stats.cancel()
            for fd in self.probes.wakeup_fds:
                loop.remove_reader(fd)
            for pid in list(self._pidfds):
                self._unwatch(pid)
        self._report(final=True)
        if flushed is False:
            log.error(
                "events still unacknowledged after %.0f s; they are lost",
                self.settings.close_timeout_s,
            )
            return 1
        return 0

    def stop(self, reason: str) -> None:
        if not self._stop.is_set():
            log.info("stopping (%s): draining and flushing", reason)
            self.exit_reason = reason
            self._stop.set()

    async def _drain_once(self) -> None:
        now = time.monotonic_ns()
        spans = self.probes.span_reader.drain()
        http = self.probes.http_reader.drain()
        self.totals.records_read += len(spans) + len(http)
        batches = self.batcher.add(spans, http, now)
        batches += self.batcher.due(now)
        await self._publish(batches)

    async def _publish(self, batches: list[OutgoingBatch]) -> None:
        for batch in batches:
            await self.publisher.publish(batch.key, batch.value, batch.events)
            self.totals.batches_out += 1

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
        self._unwatch(pid)
        target = self.targets.pop(pid, None)
        # The process is gone, so its probes are too; its last records are still in the ring
        # and leave with the next drain. Remove its map entries so nothing leaks.
        self.probes.detach_process(pid)
        self.totals.processes_exited += 1
        log.warning(
            "process %d (%s) exited; its probes were removed", pid, target.exe if target else "?"
        )
        if not self.targets and self.settings.exit_when_targets_gone:
            self.stop("every traced process has exited")

    async def _ensure_topic(self) -> None:
        delay = 0.5
        while True:
            try:
                await ensure_topics(
                    self.bootstrap_servers, {self.settings.topic: self.settings.partitions}
                )
                return
            except Exception as exc:  # retried: the publisher reports the broker's state
                log.debug("creating topic %s: %s", self.settings.topic, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _report_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.stats_interval_s)
            self._report(final=False)

    def _report(self, final: bool) -> None:
        kernel = self.probes.counters()
        self.totals.kernel = kernel
        pub = self.publisher.stats
        log.log(
            logging.INFO if not final else logging.WARNING if _lost(kernel, pub) else logging.INFO,
            "%s: records read %d, kernel emitted %d, lost in kernel (ring full) %d, "
            "untimed (table full) %d, returns without entry %d, read failures %d; "
            "events acked %d, dropped by publisher %d, failed %d",
            "totals" if final else "stats",
            self.totals.records_read,
            kernel["emitted"],
            kernel["ring_full"],
            kernel["table_full"],
            kernel["return_without_entry"],
            kernel["read_failed"],
            pub.acked_events,
            pub.dropped_events,
            pub.failed_messages,
        )


def _lost(kernel: dict[str, int], pub: object) -> bool:
    return bool(
        kernel["ring_full"]
        or kernel["table_full"]
        or getattr(pub, "dropped_events", 0)
        or getattr(pub, "failed_messages", 0)
    )
