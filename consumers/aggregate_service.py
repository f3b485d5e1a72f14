"""`ebpf-apm aggregate`: apm.spans -> latency percentiles per series and window.

    apm.spans (consumer group) -> span_columns: Avro -> numpy columns, whole fetches at once
      -> series_resolver: series id per span (route templating, cap per workload)
      -> window_aggregator: tumbling event-time windows, sketches; closes windows by watermark
      -> closed windows: apm.latency (Avro, acknowledged) -> storage (one transaction: rows
         and watermark) -> commit offsets

Crash safety. Offsets are committed only after the windows are durable in storage, and only
up to the oldest span an open window holds, so a restart replays every span of every open
window. Spans of windows that were already written replay too (they sit past the committed
offset); the watermark stored with the rows marks those windows closed, so their spans count
as late and nothing is counted twice. A crash between publishing and storing publishes
those windows again after the restart (same content): apm.latency is at-least-once.

Messages the reader cannot decode go to apm.deadletter (original key and bytes, `reason` and
`source` headers as the join writes them) before their offsets are committed.

One aggregator per group holds all partitions' windows; a second member of the group would
write partial windows of its own partitions over the first one's (see the report's notes).
This is the only module of the service that imports aiokafka.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import operator
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord

from consumers.deadletter import REASON_HEADER, SOURCE_HEADER
from consumers.latency_sketch import DEFAULT_RELATIVE_ACCURACY
from consumers.latency_store import (
    DEFAULT_STORAGE,
    STORAGE_ENV,
    LatencyRow,
    LatencyStore,
    Progress,
    StorageError,
    open_store,
    storage_url,
)
from consumers.route_template import SeriesRegistry
from consumers.series_resolver import SeriesResolver
from consumers.service_loop import run_until_stopped
from consumers.span_columns import decode_spans, explain_bad_span
from consumers.time_spec import format_duration_ns, parse_duration_ns
from consumers.window_aggregator import ClosedWindow, WindowAggregator
from producer.kafka_publisher import (
    add_bootstrap_argument,
    bootstrap_servers,
    describe_error,
    ensure_topics,
    parse_bootstrap_servers,
    quiet_aiokafka_logs,
)
from schemas.avro_codec import codec

log = logging.getLogger(__name__)

DECODE_CHUNK = 8192  # messages per columnar decode: numpy temporaries stay in cache
LATENCY_PARTITIONS = 6


class AggregateError(Exception):
    """The aggregator cannot go on; exit_code 1 (runtime) or 2 (configuration)."""

    exit_code = 1


class AggregateConfigError(AggregateError):
    exit_code = 2


@dataclass(frozen=True)
class AggregateConfig:
    bootstrap_servers: str
    storage: str
    group: str = "ebpf-apm-aggregate"
    spans_topic: str = "apm.spans"
    latency_topic: str = "apm.latency"
    deadletter_topic: str = "apm.deadletter"
    window_ns: int = 10_000_000_000
    lateness_ns: int = 5_000_000_000
    idle_timeout_ns: int = 2_000_000_000
    max_series_per_workload: int = 500
    session_timeout_ms: int = 10_000
    max_future_ns: int = 600_000_000_000  # spans from a clock 10 min ahead are left out
    crash_after_writes: int = 0  # tests: SIGKILL itself after that many writes, before commit

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AggregateConfig:
        bootstrap = bootstrap_servers(args.bootstrap_servers)
        try:
            parse_bootstrap_servers(bootstrap)
            durations = {
                name: parse_duration_ns(getattr(args, name))
                for name in ("window", "lateness", "idle_timeout", "session_timeout")
            }
        except ValueError as exc:
            raise AggregateConfigError(str(exc)) from exc
        if durations["window"] < 1_000_000:
            raise AggregateConfigError(
                f"--window {args.window} is shorter than 1ms; use e.g. --window 10s"
            )
        if args.max_series_per_workload < 1:
            raise AggregateConfigError(
                f"--max-series-per-workload {args.max_series_per_workload} must be at least 1"
            )
        return cls(
            bootstrap_servers=bootstrap,
            storage=storage_url(args.storage),
            group=args.group,
            spans_topic=args.spans_topic,
            latency_topic=args.latency_topic,
            deadletter_topic=args.deadletter_topic,
            window_ns=durations["window"],
            lateness_ns=durations["lateness"],
            idle_timeout_ns=durations["idle_timeout"],
            max_series_per_workload=args.max_series_per_workload,
            session_timeout_ms=max(1, durations["session_timeout"] // 1_000_000),
            crash_after_writes=args.crash_after_writes,
        )


_value = operator.attrgetter("value")
_offset = operator.attrgetter("offset")


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, service: AggregateService) -> None:
        self._service = service

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._service.partitions_revoked()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("assigned %d partitions of %s", len(assigned), self._service.config.spans_topic)


class AggregateService:
    def __init__(self, config: AggregateConfig, store: LatencyStore) -> None:
        self.config = config
        self.store = store
        self.registry = SeriesRegistry(config.max_series_per_workload)
        self.resolver = SeriesResolver(self.registry)
        self.aggregator: WindowAggregator | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.latency_codec = codec("latency.avsc")
        self.next_offsets: dict[int, int] = {}  # partition -> after the last span consumed
        self.committed: dict[int, int] = {}
        self.writes = 0
        self.deadlettered = 0
        self.generation = 0  # counts revocations

    # -- set-up ---------------------------------------------------------------------------

    async def start(self) -> None:
        progress = await self.resume()
        await self.connect(progress.watermark_ns if progress else None)

    async def resume(self) -> Progress | None:
        """Restore the watermark and the known series from storage."""
        config = self.config
        progress = await self.store.progress(config.group)
        if progress is not None and progress.window_ns != config.window_ns:
            raise AggregateConfigError(
                f"storage {config.storage} holds windows of "
                f"{format_duration_ns(progress.window_ns)} written by group {config.group!r}, "
                f"not --window {format_duration_ns(config.window_ns)}: use the same --window, "
                "or another --group and --storage"
            )
        self.registry.seed(await self.store.series())
        self.aggregator = WindowAggregator(
            config.window_ns,
            config.lateness_ns,
            config.idle_timeout_ns,
            relative_accuracy=DEFAULT_RELATIVE_ACCURACY,
            watermark_ns=progress.watermark_ns if progress else None,
            max_future_ns=config.max_future_ns,
        )
        return progress

    async def connect(self, resumed_at_ns: int | None) -> None:
        config = self.config
        quiet_aiokafka_logs()
        try:
            await ensure_topics(
                config.bootstrap_servers,
                {config.latency_topic: LATENCY_PARTITIONS, config.deadletter_topic: 1},
            )
            self.producer = AIOKafkaProducer(
                bootstrap_servers=config.bootstrap_servers,
                client_id="ebpf-apm-aggregate",
                acks="all",
                linger_ms=5,
                enable_idempotence=False,
            )
            await self.producer.start()
            self.consumer = AIOKafkaConsumer(
                bootstrap_servers=config.bootstrap_servers,
                group_id=config.group,
                client_id="ebpf-apm-aggregate",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=config.session_timeout_ms,
                heartbeat_interval_ms=max(100, config.session_timeout_ms // 5),
                max_partition_fetch_bytes=1 << 20,
            )
            await self.consumer.start()
            self.consumer.subscribe([config.spans_topic], listener=_Rebalance(self))
        except KafkaError as exc:
            raise AggregateError(
                f"cannot reach Kafka at {config.bootstrap_servers}: {describe_error(exc)}; "
                "start one with `ebpf-apm broker` or set --bootstrap-servers"
            ) from exc
        log.info(
            "aggregating %s into %s and %s: windows of %s, lateness %s, group %s%s",
            config.spans_topic,
            config.storage,
            config.latency_topic,
            format_duration_ns(config.window_ns),
            format_duration_ns(config.lateness_ns),
            config.group,
            f", resuming after watermark {resumed_at_ns}" if resumed_at_ns is not None else "",
        )

    async def close(self) -> None:
        for client in (self.consumer, self.producer):
            if client is not None:
                try:
                    await client.stop()
                except KafkaError as exc:
                    log.warning("stopping a Kafka client: %s", describe_error(exc))

    def partitions_revoked(self) -> None:
        # The open windows hold spans of partitions we may lose; whoever owns them next
        # (we, usually) replays them from the committed offsets.
        assert self.aggregator is not None
        self.aggregator.forget()
        self.next_offsets.clear()
        self.committed.clear()
        self.generation += 1

    # -- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        assert self.consumer is not None and self.aggregator is not None
        while not stop.is_set():
            try:
                batches = await self.consumer.getmany(timeout_ms=200)
            except KafkaError as exc:
                raise AggregateError(
                    f"reading {self.config.spans_topic} failed: {describe_error(exc)}; "
                    "check the broker, then restart (spans are replayed from the last commit)"
                ) from exc
            now_ns = time.time_ns()
            if batches:
                await self.ingest(batches, now_ns)
            elif await self._caught_up():
                self.aggregator.advance_idle(now_ns)
            closed = self.aggregator.close_ready()
            if closed:
                await self.emit(closed)
            await self.commit()

    async def _caught_up(self) -> bool:
        assert self.consumer is not None
        assignment = self.consumer.assignment()
        if not assignment:
            return False
        try:
            for tp in assignment:
                highwater = self.consumer.highwater(tp)
                if highwater is None or await self.consumer.position(tp) < highwater:
                    return False
        except (AssertionError, IllegalStateError):  # no longer assigned: rebalancing
            return False
        return True

    async def ingest(
        self, batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]], now_ns: int
    ) -> None:
        # Two passes over the records, in C (map with attrgetter): Python work per span is
        # what this service cannot afford.
        parts = [batches[tp] for tp in sorted(batches) if batches[tp]]
        values: list[bytes | None] = []
        for part in parts:
            values.extend(map(_value, part))
        offsets = np.concatenate(
            [np.fromiter(map(_offset, part), np.int64, len(part)) for part in parts]
        )
        partitions = np.concatenate(
            [np.full(len(part), part[0].partition, dtype=np.int64) for part in parts]
        )
        bad = self.add_spans(values, partitions, offsets, now_ns)
        generation = self.generation
        if bad:
            records = [r for part in parts for r in part]
            await self._deadletter([records[i] for i in bad])
        if generation != self.generation:
            return  # partitions were revoked meanwhile: these spans will be read again
        for tp in batches:
            if batches[tp]:
                self.next_offsets[tp.partition] = batches[tp][-1].offset + 1

    def add_spans(
        self,
        values: list[bytes | None],
        partitions: np.ndarray,
        offsets: np.ndarray,
        now_ns: int,
    ) -> list[int]:
        """Decode apm.spans message values and add them to the windows; the indices of the
        messages that could not be decoded."""
        assert self.aggregator is not None
        bad: list[int] = []
        parts: list[tuple[np.ndarray, ...]] = []
        for first in range(0, len(values), DECODE_CHUNK):
            columns = decode_spans(values[first : first + DECODE_CHUNK])
            if columns.bad.any():
                bad.extend((np.flatnonzero(columns.bad) + first).tolist())
            good = np.flatnonzero(~columns.bad)
            series = self.resolver.resolve(columns, good)
            parts.append(
                (
                    series,
                    columns.ints["end_ns"][good],
                    columns.ints["duration_ns"][good],
                    partitions[first + good],
                    offsets[first + good],
                )
            )
        series, end_ns, durations, sources, positions = (
            np.concatenate(c) for c in zip(*parts, strict=True)
        )
        self.aggregator.add(
            series, end_ns, durations, arrival_ns=now_ns, sources=sources, positions=positions
        )
        return bad

    async def _deadletter(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        assert self.producer is not None
        futures = []
        reasons = []
        for record in records:
            reason = explain_bad_span(record.value or b"")
            reasons.append(reason)
            source = f"{record.topic}/{record.partition}/{record.offset}"
            headers = [(REASON_HEADER, reason.encode()), (SOURCE_HEADER, source.encode())]
            futures.append(
                await self.producer.send(
                    self.config.deadletter_topic,
                    value=record.value,
                    key=record.key,
                    headers=headers,
                )
            )
        await asyncio.gather(*futures)
        self.deadlettered += len(records)
        log.warning(
            "sent %d undecodable messages of %s to %s (first: %s)",
            len(records),
            self.config.spans_topic,
            self.config.deadletter_topic,
            reasons[0],
        )

    async def emit(self, closed: list[ClosedWindow]) -> None:
        """Publish, then store (durably), the closed windows; offsets are committed after."""
        assert self.producer is not None and self.aggregator is not None
        rows = self.rows_of(closed)
        try:
            futures = [
                await self.producer.send(
                    self.config.latency_topic, value=self.encode(row), key=row.series.encode()
                )
                for row in rows
            ]
            await asyncio.gather(*futures)
        except KafkaError as exc:
            raise AggregateError(
                f"publishing {len(rows)} windows to {self.config.latency_topic} failed: "
                f"{describe_error(exc)}; check the broker, then restart"
            ) from exc
        await self.write(rows)
        self.writes += 1
        stats = self.aggregator.stats
        log.info(
            "wrote %d windows (%d series, up to %s); spans %d, late %d, from the future %d, "
            "dead-lettered %d, series refused by the cap %d",
            len({r.window_start_ns for r in rows}),
            len(rows),
            time.strftime("%H:%M:%S", time.localtime(rows[-1].window_end_ns / 1e9)),
            stats.spans,
            stats.late,
            stats.future,
            self.deadlettered,
            sum(self.registry.refused.values()),
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
        assert self.aggregator is not None and self.aggregator.watermark_ns is not None
        await self.store.write(
            rows,
            consumer=self.config.group,
            window_ns=self.config.window_ns,
            watermark_ns=self.aggregator.watermark_ns,
        )

    async def commit(self) -> None:
        """Commit, per partition, the oldest offset an open window still needs."""
        assert self.consumer is not None and self.aggregator is not None
        safe = self.aggregator.safe_positions()
        assigned = {tp.partition: tp for tp in self.consumer.assignment()}
        offsets = {}
        for partition, after_last in self.next_offsets.items():
            offset = min(after_last, safe.get(partition, after_last))
            if partition in assigned and self.committed.get(partition) != offset:
                offsets[assigned[partition]] = offset
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            # Not fatal: the next commit carries the same or newer offsets. A rebalance in
            # between replays a little more, which the stored watermark makes harmless.
            log.warning("committing offsets failed, will retry: %s", describe_error(exc))
            return
        for tp, offset in offsets.items():
            self.committed[tp.partition] = offset


async def serve(config: AggregateConfig, stop: asyncio.Event) -> None:
    try:
        store = await open_store(config.storage)
    except StorageError as exc:
        raise AggregateError(str(exc)) from exc
    service = AggregateService(config, store)
    try:
        await service.start()
        await service.run(stop)
    except StorageError as exc:
        raise AggregateError(
            f"{exc}; fix the storage and restart: spans are replayed from the last commit"
        ) from exc
    finally:
        await service.close()
        await store.close()


# -- the command --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", default="10s", help="window length (default: 10s)")
    parser.add_argument(
        "--lateness",
        default="5s",
        help="how far behind the newest span a span may be and still count (default: 5s)",
    )
    parser.add_argument(
        "--idle-timeout",
        default="2s",
        help="after this long without input the watermark follows the wall clock, so the "
        "last windows close (default: 2s)",
    )
    parser.add_argument(
        "--storage",
        metavar="URL",
        default=None,
        help=f"sqlite:///path or postgresql://user@host/db (default: ${STORAGE_ENV}, else "
        f"{DEFAULT_STORAGE})",
    )
    add_bootstrap_argument(parser)
    parser.add_argument("--group", default="ebpf-apm-aggregate", help="Kafka consumer group")
    parser.add_argument("--spans-topic", default="apm.spans", help="input (default: apm.spans)")
    parser.add_argument(
        "--latency-topic", default="apm.latency", help="closed windows (default: apm.latency)"
    )
    parser.add_argument(
        "--deadletter-topic",
        default="apm.deadletter",
        help="undecodable input (default: apm.deadletter)",
    )
    parser.add_argument(
        "--max-series-per-workload",
        type=int,
        default=500,
        metavar="N",
        help="series beyond N in a workload go to its {overflow} series (default: 500)",
    )
    parser.add_argument(
        "--session-timeout",
        default="10s",
        help="Kafka group session timeout: how soon a crashed aggregator's partitions are "
        "handed to its restart (default: 10s)",
    )
    parser.add_argument("--crash-after-writes", type=int, default=0, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Runs until SIGINT/SIGTERM: 0; 2 bad flags; 1 Kafka or storage failure."""
    try:
        config = AggregateConfig.from_args(args)
    except AggregateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code

    return run_until_stopped(lambda stop: serve(config, stop), (AggregateError, StorageError))


if __name__ == "__main__":  # the same as `ebpf-apm aggregate`
    from producer.cli import main

    sys.exit(main(["aggregate", *sys.argv[1:]]))
