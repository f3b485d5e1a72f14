"""`ebpf-apm aggregate`'s stages, wired in one place (flags: aggregate_command.py).

    apm.span.batches (GroupInput) -> span_batch: messages -> the spans' byte ranges
      -> span_columns: Avro -> numpy columns, whole fetches at once
      -> series_resolver: series id per span (route templating, cap per workload)
      -> window_aggregator, one per input partition: tumbling event-time windows, sketches;
         closes windows by that partition's watermark
      -> closed windows: apm.latency (Avro, acknowledged) -> storage (one transaction: rows
         and the partition's watermark) -> commit offsets
    undecodable messages -> apm.deadletter (acknowledged) before their offsets are committed

Scaling out. The join keys apm.span.batches by workload, so all spans of a series sit in one
partition. Each partition has its own windows and its own watermark (stored as progress
`<group>#p<partition>`), which depend only on that partition's content: whichever member
owns a partition, before or after a rebalance or a SIGKILL, it closes the same windows with
the same spans, and writes complete rows that no other member writes. Any number of members
therefore store what one member stores.

Plain apm.spans records (one span per message, keyed by node/pid: `--spans-topic apm.spans`)
are still read, into one shared set of windows (progress `<group>`): a series is then spread
over partitions, so only one member per group may read such a topic.

Crash safety. Offsets are committed only after the windows are durable in storage, and only
up to the oldest span an open window holds, so a restart replays every span of every open
window. Spans of windows that were already written replay too (they sit past the committed
offset); the watermark stored with the rows marks those windows closed, so their spans count
as late and nothing is counted twice. A crash between publishing and storing publishes
those windows again after the restart (same content): apm.latency is at-least-once.

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
from ebpf_apm.consumers.span_batch import SpanSlices, is_batch, slice_messages
from ebpf_apm.consumers.span_columns import (
    SpanColumns,
    check_span_values,
    decode_slices,
    explain_bad_span,
    padded,
)
from ebpf_apm.consumers.time_spec import format_duration_ns
from ebpf_apm.consumers.window_aggregator import AggregatorStats, ClosedWindow, WindowAggregator
from ebpf_apm.kafka import topics
from ebpf_apm.kafka.admin import ensure_topics
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.deadletter import DeadLetter
from ebpf_apm.schemas.avro_codec import codec
from ebpf_apm.schemas.input_limits import TimeBounds

log = logging.getLogger(__name__)

DECODE_CHUNK = 16384  # spans per columnar decode: numpy temporaries stay in cache
POLL_MS = 1000  # the longest a quiet loop waits for input: idle members cost little
SHARED = -1  # the windows of plain apm.spans records (not batches): one set for all partitions
CLIENT_ID = "ebpf-apm-aggregate"


@dataclass(frozen=True)
class AggregateConfig:
    connection: KafkaConnection
    storage: str
    group: str = "ebpf-apm-aggregate"
    spans_topic: str = topics.SPAN_BATCHES
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


def progress_key(group: str, shard: int) -> str:
    """Where a shard's watermark is stored (aggregate_progress.consumer)."""
    return group if shard == SHARED else f"{group}#p{shard}"


def _sum_stats(parts: list[AggregatorStats]) -> AggregatorStats:
    out = AggregatorStats()
    for part in parts:
        for name in vars(out):
            setattr(out, name, getattr(out, name) + getattr(part, name))
    return out


class AggregateService:
    """Built by `resume` from what storage holds: the known series; each partition's
    watermark is read when its first message arrives (`load`)."""

    def __init__(
        self,
        config: AggregateConfig,
        store: LatencyStore,
        registry: SeriesRegistry,
        telemetry: ConsumerTelemetry | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.registry = registry
        self.resolver = SeriesResolver(registry)
        self.aggregators: dict[int, WindowAggregator] = {}  # shard -> its windows
        self._dropped = AggregatorStats()  # of aggregators forgotten at revocations
        self.telemetry = telemetry or ConsumerTelemetry.unserved("aggregate")
        self.metrics = AggregateMetrics(
            self.telemetry.server,
            config.window_ns,
            stats=lambda: self.stats,
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
        """The service as storage left it: the series written so far."""
        await _stored_watermark(config, store, SHARED)  # checks the window length
        registry = SeriesRegistry(
            config.max_series_per_workload, config.max_workloads, config.max_series
        )
        registry.seed(await store.series())
        return cls(config, store, registry, telemetry)

    @property
    def stats(self) -> AggregatorStats:
        return _sum_stats([self._dropped, *(a.stats for a in self.aggregators.values())])

    @property
    def open_windows(self) -> int:
        return sum(len(a.open_windows) for a in self.aggregators.values())

    async def load(self, shard: int) -> WindowAggregator:
        """The shard's windows; new ones start after the watermark storage holds for it."""
        aggregator = self.aggregators.get(shard)
        if aggregator is None:
            config = self.config
            aggregator = self.aggregators[shard] = WindowAggregator(
                config.window_ns,
                config.lateness_ns,
                config.idle_timeout_ns,
                relative_accuracy=DEFAULT_RELATIVE_ACCURACY,
                watermark_ns=await _stored_watermark(config, self.store, shard),
                max_future_ns=config.time_bounds.max_skew_ns,
            )
        return aggregator

    def advance_idle(self, now_ns: int) -> None:
        for aggregator in self.aggregators.values():
            aggregator.advance_idle(now_ns)

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
        log.info(
            "aggregating %s into %s and %s: windows of %s, lateness %s, group %s",
            config.spans_topic,
            redact_url(self.store.url),
            config.latency_topic,
            format_duration_ns(config.window_ns),
            format_duration_ns(config.lateness_ns),
            config.group,
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
        # (we, usually) replays them from the committed offsets, after the watermark it
        # reads back from storage.
        self._dropped = self.stats
        self.aggregators.clear()
        self.next_offsets.clear()
        self.committed.clear()
        self.generation += 1

    # -- the loop -------------------------------------------------------------------------

    async def loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            batches = await self.input.poll(POLL_MS)
            self.telemetry.turned()
            now_ns = time.time_ns()
            if batches:
                await self.ingest(batches, now_ns)
            elif await self.input.all_caught_up():
                self.advance_idle(now_ns)
            for shard, aggregator in list(self.aggregators.items()):
                closed = aggregator.close_ready()
                if closed:
                    await self.emit(shard, aggregator, closed)
            await self.commit()

    async def ingest(self, batches: dict[TopicPart, list[InputRecord]], now_ns: int) -> None:
        # In C (map with attrgetter): Python work per span is what this service cannot
        # afford; per message (a batch of ~1,000 spans) it can. All partitions go in one
        # call, as plain apm.spans records of all partitions share one watermark.
        parts = [batches[tp] for tp in sorted(batches) if batches[tp]]
        if not parts:
            return
        self.telemetry.read(self.config.spans_topic, sum(map(len, parts)))
        records = [r for part in parts for r in part]
        values: list[bytes | None] = list(map(_value, records))
        offsets = np.fromiter(map(_offset, records), np.int64, len(records))
        partitions = np.concatenate(
            [np.full(len(part), part[0].partition, dtype=np.int64) for part in parts]
        )
        batched = np.fromiter(map(is_batch, values), np.bool_, len(values))
        shards = np.where(batched, partitions, SHARED)
        generation = self.generation
        for shard in np.unique(shards).tolist():
            await self.load(shard)
        if generation != self.generation:
            return  # partitions were revoked meanwhile: these spans will be read again
        bad = self.add_spans(values, shards, partitions, offsets, now_ns)
        if bad:
            await self._deadletter([(records[i], why) for i, why in sorted(bad.items())])
        if generation != self.generation:
            return
        for part in parts:
            self.next_offsets[part[0].partition] = part[-1].offset + 1

    def add_spans(
        self,
        values: list[bytes | None],
        shards: np.ndarray,
        partitions: np.ndarray,
        offsets: np.ndarray,
        now_ns: int,
    ) -> dict[int, str]:
        """Add the spans of messages (batches, or plain apm.spans records) to the windows of
        their shard (`load`ed); the indices of the messages that could not be used, with the
        reason (for the dead letter: a batch with one bad span is dead-lettered whole, its
        other spans are counted)."""
        slices = slice_messages(values)
        buf = padded(slices.buf)
        span_shards = shards[slices.message]
        sources = partitions[slices.message]
        positions = offsets[slices.message]
        bad: dict[int, str] = {}
        for first in range(0, len(slices.starts), DECODE_CHUNK):
            part = slice(first, first + DECODE_CHUNK)
            columns = decode_slices(buf, slices.starts[part], slices.sizes[part])
            rejected = check_span_values(columns, now_ns, self.config.time_bounds)
            for row in np.flatnonzero(columns.bad).tolist():
                rejected[row] = _explain(slices, first + row)
            usable = np.ones(columns.n, dtype=np.bool_)
            usable[np.fromiter(rejected, np.int64, len(rejected))] = False
            good = np.flatnonzero(usable)
            chunk = (span_shards[part], sources[part], positions[part])
            try:
                self._add(columns, good, chunk, now_ns)
            except Exception:  # find the spans that fail on their own
                for row in good.tolist():
                    try:
                        self._add(columns, np.array([row]), chunk, now_ns)
                    except Exception as exc:
                        rejected[row] = f"aggregating failed: {type(exc).__name__}: {exc}"
            for row, why in rejected.items():
                message = int(slices.message[first + row])
                if message not in bad:
                    batched = shards[message] != SHARED
                    bad[message] = f"a span of the batch: {why}" if batched else why
        return bad

    def _add(
        self,
        columns: SpanColumns,
        rows: np.ndarray,
        chunk: tuple[np.ndarray, np.ndarray, np.ndarray],
        now_ns: int,
    ) -> None:
        shards, sources, positions = (a[rows] for a in chunk)
        series = self.resolver.resolve(columns, rows)
        end, duration = columns.ints["end_ns"][rows], columns.ints["duration_ns"][rows]
        for shard in np.unique(shards).tolist():
            mine = shards == shard
            self.aggregators[shard].add(
                series[mine],
                end[mine],
                duration[mine],
                arrival_ns=now_ns,
                sources=sources[mine],
                positions=positions[mine],
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

    async def emit(
        self, shard: int, aggregator: WindowAggregator, closed: list[ClosedWindow]
    ) -> None:
        """Publish, then store (durably, with the shard's watermark), the closed windows;
        offsets are committed after."""
        rows = self.rows_of(closed)
        messages = [(row.series.encode(), self.encode(row)) for row in rows]
        await self.output.outage.retry(
            f"publishing {len(rows)} windows to {self.config.latency_topic}",
            lambda: self.output.deliver(self.config.latency_topic, messages),
            self._stop,
        )
        self.telemetry.acked(self.config.latency_topic, len(rows))
        await self.storage_outage.retry(
            f"writing {len(rows)} windows",
            lambda: self.write(rows, shard, aggregator),
            self._stop,
        )
        self.writes += 1
        self.metrics.written(rows)
        stats = self.stats
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

    async def write(self, rows: list[LatencyRow], shard: int, aggregator: WindowAggregator) -> None:
        """Store rows and the shard's watermark in one durable transaction."""
        assert aggregator.watermark_ns is not None  # a window closed: there is one
        await self.store.write(
            rows,
            consumer=progress_key(self.config.group, shard),
            window_ns=self.config.window_ns,
            watermark_ns=aggregator.watermark_ns,
        )

    async def commit(self) -> None:
        """Commit, per partition, the oldest offset an open window still needs."""
        safe: dict[int, int] = {}
        for aggregator in self.aggregators.values():
            for partition, position in aggregator.safe_positions().items():
                safe[partition] = min(safe.get(partition, position), position)
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


def _explain(slices: SpanSlices, index: int) -> str:
    """Why span `index` of the slices cannot be read."""
    message = int(slices.message[index])
    if message in slices.problems:
        return slices.problems[message]
    start, size = int(slices.starts[index]), int(slices.sizes[index])
    return explain_bad_span(slices.buf[start : start + size])


async def _stored_watermark(config: AggregateConfig, store: LatencyStore, shard: int) -> int | None:
    """The watermark storage holds for a shard. A partition never written by a batch reader
    starts from the group's own (a store written before windows were kept per partition);
    ConsumerConfigError if the stored windows have another length."""
    progress = await store.progress(progress_key(config.group, shard))
    if progress is None and shard != SHARED:
        progress = await store.progress(config.group)
    if progress is not None and progress.window_ns != config.window_ns:
        raise ConsumerConfigError(
            f"storage {redact_url(store.url)} holds windows of "
            f"{format_duration_ns(progress.window_ns)} written by group {config.group!r}, "
            f"not --window {format_duration_ns(config.window_ns)}: use the same --window, "
            "or another --group and --storage"
        )
    return progress.watermark_ns if progress else None
