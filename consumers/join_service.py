"""The join consumer's stages, wired in one place (`ebpf-apm join`: join_command.py).

    apm.uprobe.events ─┐              ┌─ PartitionJoiner ─ encode_spans ─> apm.spans
                       │              │                                 └> apm.span.batches
                       ├─ GroupInput ─┤   (one per partition number: watermark, store)
    apm.kprobe.events ─┘ (one group)  └─ unreadable (join_input) ──────> apm.deadletter
    acknowledgements ─> offset ledgers ─> commit (only what every output it fed is acked)

One loop: poll both topics, read each message into its partition's joiner (or a dead
letter), advance every partition's watermark to the wall clock, publish what it releases.
Kafka acknowledgements update the ledgers as they arrive; offsets are committed every
`commit_interval_s`, on partition revocation and at exit. On revocation the partition's
state is dropped after that commit: the next owner re-reads from the committed offsets, so
a span is emitted at least once (a replay has the same span_id).

Every span goes out twice, with the same bytes: one message each on apm.spans (keyed by
node/pid, for outside subscribers and the export) and, ~1,000 spans per message keyed by
workload, on apm.span.batches (consumers/span_batch.py: what the aggregators read). An input
message is committed once both copies of all its spans are acknowledged.

Outages. A frozen broker only delays acknowledgements (output waits up to kafka_io's
OUTPUT_TIMEOUT_MS); output Kafka gave up on (a broker that died, an outage longer than that)
rewinds the join: every partition's state is dropped and its input read again from the last
commit, after a backoff, as a revocation would. The join never exits because Kafka went away.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ebpf_apm.consumers.consumer_telemetry import ConsumerTelemetry
from ebpf_apm.consumers.errors import ConsumerError, ConsumerKafkaError, TopicLayoutError
from ebpf_apm.consumers.join_input import read_net_message, read_span_message
from ebpf_apm.consumers.join_metrics import JoinCollector
from ebpf_apm.consumers.kafka_io import (
    AckedOutput,
    GroupInput,
    InputRecord,
    OutputBatch,
    TopicPart,
)
from ebpf_apm.consumers.offset_ledger import EmitStep, EmitSteps, InputMessage, TopicPartitionLedger
from ebpf_apm.consumers.outage import stopped_within
from ebpf_apm.consumers.span_avro import encode_spans
from ebpf_apm.consumers.span_batch import MAX_SPANS_PER_BATCH, encode_batch, workload_of
from ebpf_apm.consumers.span_joiner import JoinCounters, JoinedSpans, JoinSettings, PartitionJoiner
from ebpf_apm.kafka import topics
from ebpf_apm.kafka.admin import ensure_topics, existing_partition_counts
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.deadletter import DeadLetter
from ebpf_apm.kafka.errors import describe_error
from ebpf_apm.schemas.input_limits import TimeBounds

log = logging.getLogger(__name__)

SPAN_TOPIC = topics.SPAN_EVENTS
NET_TOPIC = topics.NET_EVENTS
OUTPUT_TOPIC = topics.SPANS
BATCH_TOPIC = topics.SPAN_BATCHES
COPIES = 2  # outputs per span: apm.spans and apm.span.batches
CLIENT_ID = "ebpf-apm-join"
# zstd: aiokafka compresses lz4 at level 9, 115 MB/s here; zstd's level 3 runs at 350 MB/s
# and packs span records 4.6:1 (lz4 3.3:1). Output compression is most of the producer's CPU.
OUTPUT_COMPRESSION = "zstd"


@dataclass(frozen=True)
class JoinConfig:
    """The service's settings (consumers/join_command.py reads them from flags)."""

    connection: KafkaConnection
    join: JoinSettings
    group: str = "ebpf-apm-join"
    partitions: int = topics.EVENT_PARTITIONS  # for input topics that do not exist yet
    session_timeout_ms: int = 10_000
    poll_ms: int = 100
    commit_interval_s: float = 1.0
    stats_interval_s: float = 10.0
    close_timeout_s: float = 10.0
    # How far an event's time may be from the wall clock (older: max age; newer: skew).
    time_bounds: TimeBounds = field(default_factory=TimeBounds)


@dataclass(eq=False)
class _Partition:
    """Everything the join holds for one partition number of both input topics."""

    number: int
    joiner: PartitionJoiner
    spans: TopicPartitionLedger = field(default_factory=TopicPartitionLedger)
    net: TopicPartitionLedger = field(default_factory=TopicPartitionLedger)
    steps: EmitSteps = field(default_factory=EmitSteps)
    committed: dict[str, int] = field(default_factory=dict)
    first_read: dict[str, int] = field(default_factory=dict)  # topic -> first offset read

    def rewind_offsets(self) -> dict[TopicPart, int]:
        """Where to read this partition again from: the last commit, else the first read."""
        offsets = {}
        for topic in (SPAN_TOPIC, NET_TOPIC):
            offset = self.committed.get(topic, self.first_read.get(topic))
            if offset is not None:
                offsets[(topic, self.number)] = offset
        return offsets


@dataclass
class JoinTotals:
    """Counts over the service's life, reported by the stats line and at exit."""

    joined: JoinCounters = field(default_factory=JoinCounters)
    unmatched: int = 0
    dead_letters: int = 0
    spans_acked: int = 0
    rewinds: int = 0
    # time.monotonic() of the first record read and of the latest acknowledgement.
    first_input_at: float | None = None
    last_acked_at: float | None = None

    def counters(self, live: list[_Partition]) -> JoinCounters:
        """Join counters over the service's life: dropped partitions and live ones."""
        total = JoinCounters()
        total.add(self.joined)
        for p in live:
            total.add(p.joiner.counters)
        return total

    def line(self, live: list[_Partition], elapsed_s: float) -> str:
        j = self.counters(live)
        unmatched = self.unmatched + sum(p.joiner.unmatched_events for p in live)
        waiting = sum(p.joiner.waiting_spans for p in live)
        kept = sum(p.joiner.retained_events for p in live)
        rate = (j.spans_in + j.net_in) / elapsed_s if elapsed_s > 0 else 0.0
        return (
            f"in {j.spans_in} spans + {j.net_in} net events ({rate:,.0f}/s); "
            f"out {j.spans_emitted} spans ({self.spans_acked} acknowledged); "
            f"waiting {waiting} spans, keeping {kept} net events; "
            f"late {j.spans_late} spans (emitted) + {j.net_late} net events (dropped); "
            f"unmatched {unmatched} net events; truncated {j.spans_truncated} spans; "
            f"dead letters {self.dead_letters}; rewinds after Kafka failures {self.rewinds}"
        )


class _Delivery:
    """What one acknowledged output batch completes."""

    __slots__ = ("sources", "step", "steps", "spans", "records", "rewinds", "topic")

    def __init__(
        self,
        step: EmitStep | None,
        steps: EmitSteps | None,
        rewinds: int,
        topic: str = OUTPUT_TOPIC,
    ) -> None:
        self.sources: dict[InputMessage, int] = {}
        self.step = step
        self.steps = steps
        self.spans = 0
        self.records = 0  # Kafka messages (a batch message carries many spans)
        self.rewinds = rewinds  # state it belongs to: failures of older state are moot
        self.topic = topic


class JoinService:
    def __init__(
        self,
        config: JoinConfig,
        clock: Callable[[], int] = time.time_ns,
        telemetry: ConsumerTelemetry | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self.telemetry = telemetry or ConsumerTelemetry.unserved("join")
        self._output = AckedOutput(
            config.connection, client_id=CLIENT_ID, compression=OUTPUT_COMPRESSION
        )
        self._input = GroupInput(
            config.connection,
            group=config.group,
            topics=(SPAN_TOPIC, NET_TOPIC),
            client_id=CLIENT_ID,
            on_revoked=self._on_revoked,
            on_assigned=self._on_assigned,
            co_partitioned=True,
            session_timeout_ms=config.session_timeout_ms,
        )
        self._partitions: dict[int, _Partition] = {}
        self._lock = asyncio.Lock()
        # Counts revocations: records polled before one may belong to another member now.
        self._generation = 0
        self._stop = asyncio.Event()  # set by run()'s caller, or by a failure
        # Why the service stopped on its own: raised when it has shut down cleanly.
        self._failure: ConsumerError | None = None
        self._dead: list[tuple[DeadLetter, InputMessage, int]] = []
        self._rewind_reason: str | None = None  # output failed: read input again
        self.totals = JoinTotals()
        self.telemetry.server.register(JoinCollector(self))

    @property
    def partitions(self) -> list[int]:
        """Partition numbers (of both input topics) this instance holds now."""
        return sorted(self._partitions)

    def live_partitions(self) -> list[_Partition]:
        return list(self._partitions.values())

    def input_counters(self) -> JoinCounters:
        """Spans and network events read so far (every partition ever held)."""
        return self.totals.counters(list(self._partitions.values()))

    # -- life cycle -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        """Join until `stop` is set; 0 when everything emitted was acknowledged and
        committed, 1 otherwise. A failure (Kafka refused output, topics not co-partitioned)
        is raised once the service has shut down, with what to do about it."""
        config = self.config
        partitions = await prepare_topics(config)
        await self._output.start(keyed_topics=(OUTPUT_TOPIC, BATCH_TOPIC, topics.DEADLETTER))
        try:
            await self._input.start()
        except BaseException:
            await self._output.stop(0)
            raise
        self.telemetry.watch(self._input)
        log.info(
            "joining %s and %s (%d partitions each) into %s on %s as group %r",
            SPAN_TOPIC,
            NET_TOPIC,
            partitions,
            OUTPUT_TOPIC,
            config.connection,
            config.group,
        )
        started = time.monotonic()
        stopping = asyncio.create_task(stop.wait())
        stopping.add_done_callback(lambda _: self._stop.set())
        try:
            await self._loop(started)
        finally:
            stopping.cancel()
            clean = await self._shutdown(started)
        if self._failure is not None:
            raise self._failure
        return 0 if clean else 1

    def _fail(self, failure: ConsumerError) -> None:
        if self._failure is None:
            self._failure = failure
        self._stop.set()

    async def _loop(self, started: float) -> None:
        last_commit = last_stats = time.monotonic()
        while not self._stop.is_set():
            if self._rewind_reason is not None:
                delay = self._output.outage.failed(self._rewind_reason)
                if await stopped_within(self._stop, delay):
                    break
                await self._rewind()
            self._output.check_stalled()
            polled = await self._input.poll(self.config.poll_ms)
            self.telemetry.turned()
            for (topic, _), polled_records in polled.items():
                self.telemetry.read(topic, len(polled_records))
            records = [record for part in polled.values() for record in part]
            # aiokafka returns no records while a rebalance is under way, but one may start
            # while this loop waits for the lock below.
            generation = self._generation
            if records and self.totals.first_input_at is None:
                self.totals.first_input_at = time.monotonic()
            async with self._lock:
                if generation == self._generation:
                    self._read(records, self._clock())
                # else: polled before a rebalance; whoever owns them now reads them again
                await self._send_dead_letters()
                now = self._clock()
                for part in list(self._partitions.values()):
                    caught_up = (
                        await self._input.caught_up(SPAN_TOPIC, part.number),
                        await self._input.caught_up(NET_TOPIC, part.number),
                    )
                    await self._emit(part, part.joiner.advance(now, caught_up))
                if time.monotonic() - last_commit >= self.config.commit_interval_s:
                    await self._commit(list(self._partitions.values()))
                    last_commit = time.monotonic()
            if time.monotonic() - last_stats >= self.config.stats_interval_s:
                live = list(self._partitions.values())
                log.info("join: %s", self.totals.line(live, time.monotonic() - started))
                last_stats = time.monotonic()

    async def _shutdown(self, started: float) -> bool:
        """Wait for acknowledgements, commit, leave the group; True if all was delivered."""
        async with self._lock:
            delivered = await self._output.stop(self.config.close_timeout_s)
            parts = list(self._partitions.values())
            # Even after a failure: the ledgers only count acknowledged outputs as done.
            await self._commit(parts)
            log.info("at exit: %s", self.totals.line(parts, time.monotonic() - started))
            if any(p.joiner.waiting_spans for p in parts):
                log.info(
                    "the spans still waiting for the watermark are read again by the next "
                    "join, from the committed offsets"
                )
            for part in parts:
                self._forget(part)
        await self._input.stop()
        await self.telemetry.stop()
        if not delivered:
            log.error(
                "some spans were not acknowledged by Kafka within %g s; their input was not "
                "committed and is read again by the next join",
                self.config.close_timeout_s,
            )
        return delivered

    # -- rebalancing ------------------------------------------------------------------------

    async def _on_assigned(self, assigned: list[TopicPart]) -> None:
        span_parts = {p for t, p in assigned if t == SPAN_TOPIC}
        net_parts = {p for t, p in assigned if t == NET_TOPIC}
        if span_parts != net_parts:
            self._fail(
                TopicLayoutError(
                    f"the group assigned partitions {sorted(span_parts)} of {SPAN_TOPIC} but "
                    f"{sorted(net_parts)} of {NET_TOPIC}: the topics are not co-partitioned or "
                    f"another member of group {self.config.group!r} uses a different assignor; "
                    "give both topics the same partition count and run only `ebpf-apm join` "
                    "in the group"
                )
            )
        now = self._clock()
        async with self._lock:
            # A broker that lost its topics (a restarted in-memory one) may have new counts.
            await self._output.refresh_partitions((OUTPUT_TOPIC, BATCH_TOPIC))
            for number in sorted(span_parts & net_parts):
                self._partition(number, now)
        log.info("assigned partitions %s", sorted(span_parts & net_parts))

    def _partition(self, number: int, now_ns: int) -> _Partition:
        """The state of a partition number, new if the group just gave it to us (records
        can come before the assignment callback has run)."""
        part = self._partitions.get(number)
        if part is None:
            part = self._partitions[number] = _Partition(
                number, PartitionJoiner(self.config.join, now_ns)
            )
        return part

    async def _on_revoked(self, revoked: list[TopicPart]) -> None:
        numbers = {p for _, p in revoked}
        async with self._lock:
            self._generation += 1
            parts = [self._partitions[n] for n in sorted(numbers) if n in self._partitions]
            if not parts:
                return
            # Acknowledgements first, so that the commit covers every span already out.
            timeout_s = min(5.0, self.config.session_timeout_ms / 2000)
            await self._output.flush(timeout_s)
            await self._commit(parts)
            for part in parts:
                self._forget(part)
                del self._partitions[part.number]
        log.info("revoked partitions %s (state dropped after commit)", sorted(numbers))

    def _forget(self, part: _Partition) -> None:
        self.totals.joined.add(part.joiner.counters)
        self.totals.unmatched += part.joiner.unmatched_events

    # -- outages ----------------------------------------------------------------------------

    def _output_failed(self, delivery: _Delivery | None, why: str) -> None:
        """Kafka gave up on output: rewind (once per failure of the current state)."""
        current = delivery is None or delivery.rewinds == self.totals.rewinds
        if current and self._rewind_reason is None:
            self._rewind_reason = why

    async def _rewind(self) -> None:
        """Drop every partition's state and read its input again from the last commit, as a
        revocation would; the spans that come out again keep their span_id."""
        async with self._lock:
            self._generation += 1  # records polled before now are read again
            self.totals.rewinds += 1
            offsets: dict[TopicPart, int] = {}
            for part in self._partitions.values():
                offsets.update(part.rewind_offsets())
                self._forget(part)
            self._partitions.clear()
            self._dead = []
            self._input.seek(offsets)
            reason, self._rewind_reason = self._rewind_reason, None
        log.warning(
            "output to Kafka failed (%s): reading input again from %s",
            reason,
            ", ".join(f"{t}/{p}@{o}" for (t, p), o in sorted(offsets.items())) or "the start",
        )

    # -- input ------------------------------------------------------------------------------

    def _read(self, records: list[InputRecord], now_ns: int) -> None:
        assigned = self._input.assignment()
        bounds = self.config.time_bounds
        for r in records:
            if (r.topic, r.partition) not in assigned:
                continue  # not ours any more: the new owner reads it
            part = self._partition(r.partition, now_ns)
            part.first_read.setdefault(r.topic, r.offset)
            if r.topic == SPAN_TOPIC:
                spans = read_span_message(
                    r.topic, r.partition, r.offset, r.key, r.value, now_ns, bounds
                )
                if isinstance(spans, DeadLetter):
                    self._dead.append((spans, part.spans.track(r.offset, outstanding=1), 1))
                    continue
                outputs = COPIES * len(spans)
                message = part.spans.track(r.offset, outstanding=outputs, record=r)
                try:
                    part.joiner.add_spans(spans, message, now_ns)
                except Exception as exc:  # one bad message must not stop the join
                    self._dead_letter(r, message, outputs, "joining", exc)
            else:
                net = read_net_message(
                    r.topic, r.partition, r.offset, r.key, r.value, now_ns, bounds
                )
                if isinstance(net, DeadLetter):
                    self._dead.append((net, part.net.track(r.offset, outstanding=1), 1))
                    continue
                try:
                    newest_kept = part.joiner.add_net(net, now_ns)
                except Exception as exc:
                    self._dead_letter(r, part.net.track(r.offset, outstanding=1), 1, "joining", exc)
                    continue
                part.net.track(r.offset, newest_kept_ns=newest_kept)

    def _dead_letter(
        self, record: Any, message: InputMessage, count: int, step: str, exc: Exception
    ) -> None:
        """Dead-letter a message whose processing failed; `count` of its outputs are then
        done (when the dead letter is acknowledged)."""
        why = f"{step} failed: {type(exc).__name__}: {exc}"
        letter = DeadLetter.of(
            record.topic, record.partition, record.offset, record.key, record.value, why
        )
        self._dead.append((letter, message, count))

    async def _send_dead_letters(self) -> None:
        for letter, message, count in self._dead:
            delivery = _Delivery(None, None, self.totals.rewinds)
            delivery.sources[message] = count
            try:
                future = await self._output.dead_letter(letter)
            except ConsumerKafkaError as exc:
                self._output_failed(None, str(exc))
                break
            self.totals.dead_letters += 1
            self.telemetry.dead_lettered(letter.source.rsplit("/", 2)[0], "undecodable")
            future.add_done_callback(functools.partial(self._delivered, delivery))
        self._dead = []

    # -- output -----------------------------------------------------------------------------

    async def _emit(self, part: _Partition, joined: list[JoinedSpans]) -> None:
        step = part.steps.open(part.joiner.kept_from_ns)
        try:
            if joined:
                await self._publish(joined, step, part.steps)
        finally:
            part.steps.close(step)

    async def _publish(self, joined: list[JoinedSpans], step: EmitStep, steps: EmitSteps) -> None:
        topic = OUTPUT_TOPIC
        try:
            encoded = encode_spans(joined)
        except Exception:  # find the spans that cannot be encoded, dead-letter their input
            joined = self._encodable(joined)
            await self._send_dead_letters()
            if not joined:
                return
            encoded = encode_spans(joined)
        open_batches: dict[int, tuple[OutputBatch, _Delivery]] = {}
        for spans, values in zip(joined, encoded.parts, strict=True):
            key = f"{spans.batch.node}/{spans.batch.pid}".encode()
            number = self._output.partition_of(topic, key)
            source = spans.token
            assert isinstance(source, InputMessage)
            current = open_batches.get(number)
            if current is None:
                current = open_batches[number] = self._new_batch(topic, number, step, steps)
            batch, delivery = current
            part_values = encoded.values[values]
            done = 0
            while True:
                taken = batch.extend(key, part_values, done)
                done += taken
                delivery.sources[source] = delivery.sources.get(source, 0) + taken
                delivery.spans += taken
                delivery.records += taken
                if done == len(part_values):
                    break
                await self._send(batch, delivery)  # full: the rest goes into a new batch
                batch, delivery = open_batches[number] = self._new_batch(topic, number, step, steps)
        for batch, delivery in open_batches.values():
            await self._send(batch, delivery)
        await self._publish_batches(joined, encoded.values, encoded.parts, step, steps)

    async def _publish_batches(
        self,
        joined: list[JoinedSpans],
        values: list[bytes],
        parts: list[slice],
        step: EmitStep,
        steps: EmitSteps,
    ) -> None:
        """The same spans on apm.span.batches: per workload, messages of up to
        MAX_SPANS_PER_BATCH spans (a series' spans all land in the workload's partition)."""
        by_workload: dict[str, list[tuple[JoinedSpans, slice]]] = {}
        for spans, where in zip(joined, parts, strict=True):
            b = spans.batch
            labels = b.k8s or {}
            name = workload_of(labels.get("k8s_namespace"), labels.get("k8s_workload"), b.exe)
            by_workload.setdefault(name, []).append((spans, where))
        open_batches: dict[int, tuple[OutputBatch, _Delivery]] = {}
        for name, members in by_workload.items():
            key = name.encode()
            number = self._output.partition_of(BATCH_TOPIC, key)
            pending: list[bytes] = []
            counts: dict[InputMessage, int] = {}
            for spans, where in members:
                source = spans.token
                assert isinstance(source, InputMessage)
                at = where.start
                while at < where.stop:
                    take = min(where.stop - at, MAX_SPANS_PER_BATCH - len(pending))
                    pending += values[at : at + take]
                    counts[source] = counts.get(source, 0) + take
                    at += take
                    if len(pending) == MAX_SPANS_PER_BATCH:
                        await self._add_batch(
                            open_batches, (number, key), pending, counts, step, steps
                        )
                        pending, counts = [], {}
            if pending:
                await self._add_batch(open_batches, (number, key), pending, counts, step, steps)
        for batch, delivery in open_batches.values():
            await self._send(batch, delivery)

    async def _add_batch(
        self,
        open_batches: dict[int, tuple[OutputBatch, _Delivery]],
        where: tuple[int, bytes],
        values: list[bytes],
        counts: dict[InputMessage, int],
        step: EmitStep,
        steps: EmitSteps,
    ) -> None:
        """One apm.span.batches message into the partition's open Kafka batch."""
        number, key = where
        value = encode_batch(values)
        current = open_batches.get(number)
        if current is None:
            current = open_batches[number] = self._new_batch(BATCH_TOPIC, number, step, steps)
        batch, delivery = current
        if not batch.extend(key, [value]):
            await self._send(batch, delivery)  # full: this one goes into a new batch
            batch, delivery = open_batches[number] = self._new_batch(
                BATCH_TOPIC, number, step, steps
            )
            if not batch.extend(key, [value]):
                raise ConsumerKafkaError(
                    f"a {BATCH_TOPIC} message of {len(value)} bytes does not fit a Kafka batch"
                )
        for source, count in counts.items():
            delivery.sources[source] = delivery.sources.get(source, 0) + count
        delivery.spans += len(values)
        delivery.records += 1

    def _encodable(self, joined: list[JoinedSpans]) -> list[JoinedSpans]:
        """The parts that encode on their own; the others' input messages are queued as
        dead letters."""
        good: list[JoinedSpans] = []
        for spans in joined:
            try:
                encode_spans([spans])
            except Exception as exc:
                message = spans.token
                assert isinstance(message, InputMessage)
                self._dead_letter(
                    message.record, message, COPIES * len(spans), "encoding spans", exc
                )
            else:
                good.append(spans)
        return good

    def _new_batch(
        self, topic: str, number: int, step: EmitStep, steps: EmitSteps
    ) -> tuple[OutputBatch, _Delivery]:
        delivery = _Delivery(step, steps, self.totals.rewinds, topic)
        return self._output.new_batch(topic, number), delivery

    async def _send(self, batch: OutputBatch, delivery: _Delivery) -> None:
        if not batch.count:
            return
        try:
            future = await self._output.send(batch)
        except ConsumerKafkaError as exc:
            self._output_failed(delivery, str(exc))
            return
        if delivery.step is not None:
            delivery.step.outstanding += 1
        future.add_done_callback(functools.partial(self._delivered, delivery))

    def _delivered(self, delivery: _Delivery, future: asyncio.Future[object]) -> None:
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or error is not None:
            why = describe_error(error) if error is not None else "cancelled"
            self._output_failed(delivery, f"Kafka did not acknowledge output ({why})")
            return
        for message, count in delivery.sources.items():
            message.outstanding -= count
        if delivery.topic == OUTPUT_TOPIC:  # the batches carry the same spans
            self.totals.spans_acked += delivery.spans
        self.telemetry.acked(delivery.topic, delivery.records)
        self.totals.last_acked_at = time.monotonic()
        if delivery.step is not None and delivery.steps is not None:
            delivery.steps.acked(delivery.step)

    # -- commits ----------------------------------------------------------------------------

    async def _commit(self, parts: list[_Partition]) -> None:
        offsets: dict[TopicPart, int] = {}
        for part in parts:
            span_offset = part.spans.committable(None)
            net_offset = part.net.committable(part.steps.safe_kept_from_ns)
            for topic, offset in ((SPAN_TOPIC, span_offset), (NET_TOPIC, net_offset)):
                if offset is not None and offset != part.committed.get(topic):
                    offsets[(topic, part.number)] = offset
        if offsets and await self._input.commit(offsets):
            for (topic, number), offset in offsets.items():
                if number in self._partitions:
                    self._partitions[number].committed[topic] = offset


# -- topics -----------------------------------------------------------------------------------


def _layout_error(counts: dict[str, int]) -> TopicLayoutError:
    return TopicLayoutError(
        f"{SPAN_TOPIC} has {counts[SPAN_TOPIC]} partitions and {NET_TOPIC} has "
        f"{counts[NET_TOPIC]}: the join needs them co-partitioned (same key, same partition "
        "count); add partitions to the smaller one (kafka-topics.sh --alter --partitions N) or "
        "recreate both, then restart the join"
    )


async def prepare_topics(config: JoinConfig) -> int:
    """Check (and create what is missing of) the join's topics; the input partition count.

    A missing input topic is created with the other's partition count, so that the agent,
    which leaves existing topics alone, finds them co-partitioned.
    """
    existing = await existing_partition_counts(config.connection)
    known = {t: existing[t] for t in (SPAN_TOPIC, NET_TOPIC) if t in existing}
    if len(set(known.values())) > 1:
        raise _layout_error(known)
    count = next(iter(known.values()), config.partitions)
    wanted = {t: count for t in (SPAN_TOPIC, NET_TOPIC, OUTPUT_TOPIC, BATCH_TOPIC)}
    wanted[topics.DEADLETTER] = count
    counts = await ensure_topics(config.connection, wanted)
    if counts[SPAN_TOPIC] != counts[NET_TOPIC]:
        raise _layout_error(counts)
    return counts[SPAN_TOPIC]
