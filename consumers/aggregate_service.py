"""`ebpf-apm aggregate`'s stages, wired in one place (flags: aggregate_command.py).

    apm.spans (GroupInput) -> span_columns: Avro -> numpy columns, whole fetches at once
      -> series_resolver: series id per span (route templating, cap per workload)
      -> window_aggregator: tumbling event-time windows, sketches; closes windows by watermark
      -> closed windows: apm.latency (Avro, acknowledged) -> storage (one transaction: rows
         and watermark) -> commit offsets
    undecodable messages -> apm.deadletter (acknowledged) before their offsets are committed

Crash safety. Offsets are committed only after the windows are durable in storage, and only
up to the oldest span an open window holds, so a restart replays every span of every open
window. Spans of windows that were already written replay too (they sit past the committed
offset); the watermark stored with the rows marks those windows closed, so their spans count
as late and nothing is counted twice. A crash between publishing and storing publishes
those windows again after the restart (same content): apm.latency is at-least-once.

One aggregator per group holds all partitions' windows; a second member of the group would
write partial windows of its own partitions over the first one's.

Outages. Publishing closed windows, storing them and dead-lettering are retried with
backoff and jitter until they succeed (`Outage`: one log line when the wait starts, one when
it ends); meanwhile nothing is committed and no new input is read, so a broker or database
outage of any length costs time, never data. A stop during the wait exits 1 without
committing: the next start replays the same input.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ebpf_apm.consumers.aggregate_metrics import AggregateMetrics, SeriesFigures
from ebpf_apm.consumers.consumer_telemetry import ConsumerTelemetry
from ebpf_apm.consumers.errors import ConsumerConfigError
from ebpf_apm.consumers.kafka_io import AckedOutput, GroupInput, InputRecord, TopicPart
from ebpf_apm.consumers.latency_sketch import DEFAULT_RELATIVE_ACCURACY
from ebpf_apm.consumers.latency_store import LatencyRow, LatencyStore, redact_url
from ebpf_apm.consumers.outage import Outage
from ebpf_apm.consumers.route_template import (
    DEFAULT_MAX_SERIES,
    DEFAULT_MAX_WORKLOADS,
    SeriesRegistry,
)
from ebpf_apm.consumers.series_resolver import SeriesResolver
from ebpf_apm.consumers.span_columns import (
    SpanColumns,
    check_span_values,
    decode_spans,
    explain_bad_span,
)
from ebpf_apm.consumers.time_spec import format_duration_ns
from ebpf_apm.consumers.window_aggregator import ClosedWindow, WindowAggregator
from ebpf_apm.kafka import topics
from ebpf_apm.kafka.admin import ensure_topics
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.deadletter import DeadLetter
from ebpf_apm.schemas.avro_codec import codec
from ebpf_apm.schemas.input_limits import TimeBounds

log = logging.getLogger(__name__)

DECODE_CHUNK = 8192  # messages per columnar decode: numpy temporaries stay in cache
CLIENT_ID = "ebpf-apm-aggregate"


@dataclass(frozen=True)
class AggregateConfig:
    connection: KafkaConnection
    storage: str
    group: str = "ebpf-apm-aggregate"
    spans_topic: str = topics.SPANS
    latency_topic: str = topics.LATENCY
    deadletter_topic: str = topics.DEADLETTER
    window_ns: int = 10_000_000_000
    lateness_ns: int = 5_000_000_000
    idle_timeout_ns: int = 2_000_000_000
    max_series_per_workload: int = 500
    max_workloads: int = DEFAULT_MAX_WORKLOADS
    max_series: int = DEFAULT_MAX_SERIES
    session_timeout_ms: int = 10_000
    crash_after_writes: int = 0  # tests: SIGKILL itself after that many writes, before commit
    time_bounds: TimeBounds = field(default_factory=TimeBounds)


_value = operator.attrgetter("value")
_offset = operator.attrgetter("offset")


class AggregateService:
    """Built by `resume` from what storage holds: the watermark and the known series."""

    def __init__(
        self,
        config: AggregateConfig,
        store: LatencyStore,
        registry: SeriesRegistry,
        aggregator: WindowAggregator,
        telemetry: ConsumerTelemetry | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.registry = registry
        self.resolver = SeriesResolver(registry)
        self.aggregator = aggregator
        self.telemetry = telemetry or ConsumerTelemetry.unserved("aggregate")
        self.metrics = AggregateMetrics(
            self.telemetry.server,
            config.window_ns,
            stats=lambda: self.aggregator.stats,
            series=lambda: SeriesFigures(len(self.registry), sum(self.registry.refused.values())),
        )
        self.telemetry.server.probe("storage", self._storage_unreachable)
        self.input = GroupInput(
            config.connection,
            group=config.group,
            topics=(config.spans_topic,),
            client_id=CLIENT_ID,
            on_revoked=self._on_revoked,
            session_timeout_ms=config.session_timeout_ms,
        )
        self.output = AckedOutput(
            config.connection, client_id=CLIENT_ID, deadletter_topic=config.deadletter_topic
        )
        self.latency_codec = codec("latency.avsc")
        self.next_offsets: dict[int, int] = {}  # partition -> after the last span consumed
        self.committed: dict[int, int] = {}
        self.writes = 0
        self.deadlettered = 0
        self.generation = 0  # counts revocations
        self.storage_outage = Outage(f"storage {store.url}")
        self._stop = asyncio.Event()  # run()'s: retries give up when it is set

    @classmethod
    async def resume(
        cls,
        config: AggregateConfig,
        store: LatencyStore,
        telemetry: ConsumerTelemetry | None = None,
    ) -> AggregateService:
        """The service as storage left it: the watermark and series of the last write."""
        progress = await store.progress(config.group)
        if progress is not None and progress.window_ns != config.window_ns:
            raise ConsumerConfigError(
                f"storage {redact_url(store.url)} holds windows of "
                f"{format_duration_ns(progress.window_ns)} written by group {config.group!r}, "
                f"not --window {format_duration_ns(config.window_ns)}: use the same --window, "
                "or another --group and --storage"
            )
        registry = SeriesRegistry(
            config.max_series_per_workload, config.max_workloads, config.max_series
        )
        registry.seed(await store.series())
        aggregator = WindowAggregator(
            config.window_ns,
            config.lateness_ns,
            config.idle_timeout_ns,
            relative_accuracy=DEFAULT_RELATIVE_ACCURACY,
            watermark_ns=progress.watermark_ns if progress else None,
            max_future_ns=config.time_bounds.max_skew_ns,
        )
        return cls(config, store, registry, aggregator, telemetry)

    # -- life cycle -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Aggregate until `stop` is set; waits out Kafka and storage outages."""
        self._stop = stop
        await self.start()
        try:
            await self.loop(stop)
        finally:
            await self.close()

    async def start(self) -> None:
        config = self.config
        await ensure_topics(
            config.connection,
            {
                config.latency_topic: topics.LATENCY_PARTITIONS,
                config.deadletter_topic: topics.DEADLETTER_PARTITIONS,
            },
        )
        await self.output.start()
        try:
            await self.input.start()
        except BaseException:
            await self.output.stop(0)
            raise
        self.telemetry.watch(self.input)
        watermark = self.aggregator.watermark_ns
        log.info(
            "aggregating %s into %s and %s: windows of %s, lateness %s, group %s%s",
            config.spans_topic,
            redact_url(self.store.url),
            config.latency_topic,
            format_duration_ns(config.window_ns),
            format_duration_ns(config.lateness_ns),
            config.group,
            f", resuming after watermark {watermark}" if watermark is not None else "",
        )

    async def close(self) -> None:
        await self.telemetry.stop()
        await self.input.stop()
        await self.output.stop(5.0)

    async def _storage_unreachable(self) -> str | None:
        await self.store.ping()  # raises StorageError, which readiness reports
        return None

    async def _on_revoked(self, revoked: list[TopicPart]) -> None:
        # The open windows hold spans of partitions we may lose; whoever owns them next
        # (we, usually) replays them from the committed offsets.
        self.aggregator.forget()
        self.next_offsets.clear()
        self.committed.clear()
        self.generation += 1

    # -- the loop -------------------------------------------------------------------------

    async def loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            batches = await self.input.poll(200)
            self.telemetry.turned()
            now_ns = time.time_ns()
            if batches:
                await self.ingest(batches, now_ns)
            elif await self.input.all_caught_up():
                self.aggregator.advance_idle(now_ns)
            closed = self.aggregator.close_ready()
            if closed:
                await self.emit(closed)
            await self.commit()

    async def ingest(self, batches: dict[TopicPart, list[InputRecord]], now_ns: int) -> None:
        # Two passes over the records, in C (map with attrgetter): Python work per span is
        # what this service cannot afford.
        parts = [batches[tp] for tp in sorted(batches) if batches[tp]]
        if not parts:
            return
        self.telemetry.read(self.config.spans_topic, sum(map(len, parts)))
        values: list[bytes | None] = []
        for part in parts:
            values.extend(map(_value, part))
        offsets = np.concatenate(
            [np.fromiter(map(_offset, part), np.int64, len(part)) for part in parts]
        )
        partitions = np.concatenate(
            [np.full(len(part), part[0].partition, dtype=np.int64) for part in parts]
        )
        generation = self.generation
        bad = self.add_spans(values, partitions, offsets, now_ns)
        if bad:
            records = [r for part in parts for r in part]
            await self._deadletter([(records[i], why) for i, why in sorted(bad.items())])
        if generation != self.generation:
            return  # partitions were revoked meanwhile: these spans will be read again
        for (_, partition), records in batches.items():
            if records:
                self.next_offsets[partition] = records[-1].offset + 1

    def add_spans(
        self,
        values: list[bytes | None],
        partitions: np.ndarray,
        offsets: np.ndarray,
        now_ns: int,
    ) -> dict[int, str]:
        """Decode apm.spans message values and add them to the windows; the indices of the
        messages that could not be used, with the reason (for the dead letter)."""
        bad: dict[int, str] = {}
        for first in range(0, len(values), DECODE_CHUNK):
            chunk = values[first : first + DECODE_CHUNK]
            columns = decode_spans(chunk)
            rejected = check_span_values(columns, now_ns, self.config.time_bounds)
            for row in np.flatnonzero(columns.bad).tolist():
                rejected[row] = explain_bad_span(chunk[row] or b"")
            good = np.setdiff1d(np.arange(columns.n), np.fromiter(rejected, np.int64))
            try:
                self._add(columns, good, partitions[first + good], offsets[first + good], now_ns)
            except Exception:  # find the messages that fail on their own
                for row in good.tolist():
                    one = np.array([row])
                    try:
                        self._add(
                            columns, one, partitions[first + one], offsets[first + one], now_ns
                        )
                    except Exception as exc:
                        rejected[row] = f"aggregating failed: {type(exc).__name__}: {exc}"
            bad.update({first + row: why for row, why in rejected.items()})
        return bad

    def _add(
        self,
        columns: SpanColumns,
        rows: np.ndarray,
        sources: np.ndarray,
        positions: np.ndarray,
        now_ns: int,
    ) -> None:
        series = self.resolver.resolve(columns, rows)
        self.aggregator.add(
            series,
            columns.ints["end_ns"][rows],
            columns.ints["duration_ns"][rows],
            arrival_ns=now_ns,
            sources=sources,
            positions=positions,
        )

    async def _deadletter(self, rejected: Sequence[tuple[InputRecord, str]]) -> None:
        """Dead-letter the messages (retried while Kafka refuses them)."""
        letters = [
            DeadLetter.of(r.topic, r.partition, r.offset, r.key, r.value, why)
            for r, why in rejected
        ]
        await self.output.outage.retry(
            f"dead-lettering {len(letters)} message(s)",
            lambda: self.output.deliver_dead_letters(letters),
            self._stop,
        )
        self.deadlettered += len(letters)
        self.telemetry.dead_lettered(self.config.spans_topic, "undecodable", len(letters))

    async def emit(self, closed: list[ClosedWindow]) -> None:
        """Publish, then store (durably), the closed windows; offsets are committed after."""
        rows = self.rows_of(closed)
        messages = [(row.series.encode(), self.encode(row)) for row in rows]
        await self.output.outage.retry(
            f"publishing {len(rows)} windows to {self.config.latency_topic}",
            lambda: self.output.deliver(self.config.latency_topic, messages),
            self._stop,
        )
        self.telemetry.acked(self.config.latency_topic, len(rows))
        await self.storage_outage.retry(
            f"writing {len(rows)} windows", lambda: self.write(rows), self._stop
        )
        self.writes += 1
        self.metrics.written(rows)
        stats = self.aggregator.stats
        log.info(
            "wrote %d windows (%d series, up to %s); spans %d, late %d, from the future %d, "
            "dead-lettered %d, series refused by the cap %d (per workload) and %d (global caps)",
            len({r.window_start_ns for r in rows}),
            len(rows),
            time.strftime("%H:%M:%S", time.localtime(rows[-1].window_end_ns / 1e9)),
            stats.spans,
            stats.late,
            stats.future,
            self.deadlettered,
            sum(self.registry.refused.values()),
            self.registry.refused_workloads + self.registry.refused_global,
        )
        if self.config.crash_after_writes and self.writes >= self.config.crash_after_writes:
            os.kill(os.getpid(), signal.SIGKILL)  # tests: die between the write and the commit

    def rows_of(self, closed: list[ClosedWindow]) -> list[LatencyRow]:
        keys = self.registry.keys
        return [LatencyRow.of(keys[window.series_id], window) for window in closed]

    def encode(self, row: LatencyRow) -> bytes:
        """The apm.latency message of a row."""
        return self.latency_codec.encode(row.as_dict())

    async def write(self, rows: list[LatencyRow]) -> None:
        """Store rows and the watermark in one durable transaction."""
        assert self.aggregator.watermark_ns is not None  # a window closed: there is one
        await self.store.write(
            rows,
            consumer=self.config.group,
            window_ns=self.config.window_ns,
            watermark_ns=self.aggregator.watermark_ns,
        )

    async def commit(self) -> None:
        """Commit, per partition, the oldest offset an open window still needs."""
        safe = self.aggregator.safe_positions()
        assigned = {partition for _, partition in self.input.assignment()}
        offsets = {}
        for partition, after_last in self.next_offsets.items():
            offset = min(after_last, safe.get(partition, after_last))
            if partition in assigned and self.committed.get(partition) != offset:
                offsets[(self.config.spans_topic, partition)] = offset
        # Not fatal when refused: the next commit carries the same or newer offsets. A
        # rebalance in between replays a little more, which the stored watermark makes harmless.
        if offsets and await self.input.commit(offsets):
            for (_, partition), offset in offsets.items():
                self.committed[partition] = offset
