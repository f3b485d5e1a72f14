"""The join's Kafka edge: one consumer group over both event topics, one producer for
`apm.spans` and `apm.deadletter`. The only module of the join that imports aiokafka.

The group uses the range assignor: it lays each topic's partitions out in order, so with
equal partition counts every member gets the same partition numbers of both topics, which
is what a co-partitioned join needs (aiokafka's default, round robin, would split them).
Offsets are committed by the service, never automatically.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.partitioner import murmur2

from producer.kafka_publisher import (
    KafkaUnavailableError,
    PublisherError,
    describe_error,
    ensure_topics,
    quiet_aiokafka_logs,
)

log = logging.getLogger(__name__)

TopicPart = tuple[str, int]
_MAX_BATCH_BYTES = 1 << 20


class JoinKafkaError(Exception):
    """Kafka cannot be used as the join needs it; `exit_code` 1, or 2 for a bad layout."""

    exit_code = 1


class TopicLayoutError(JoinKafkaError):
    """The input topics are not co-partitioned (bad input: exit code 2)."""

    exit_code = 2


class InputRecord(Protocol):
    """What the join reads of a consumed message (aiokafka's ConsumerRecord has it)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str
    group_id: str
    span_topic: str
    net_topic: str
    output_topic: str
    deadletter_topic: str
    # Partitions for input topics that do not exist yet (the agent's default).
    default_partitions: int = 6
    session_timeout_ms: int = 10_000
    client_id: str = "ebpf-apm-join"
    # zstd: aiokafka compresses lz4 at level 9, 115 MB/s here; zstd's level 3 runs at 350 MB/s
    # and packs span records 4.6:1 (lz4 3.3:1). Output compression is most of the producer's CPU.
    compression: str | None = "zstd"

    @property
    def input_topics(self) -> tuple[str, str]:
        return (self.span_topic, self.net_topic)


async def _existing_partition_counts(bootstrap_servers: str) -> dict[str, int]:
    # Lists all topics first: naming a missing topic in a metadata request makes brokers
    # with auto-creation (Tansu, default Kafka) create it with their default count.
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="ebpf-apm-join")
    try:
        await admin.start()
        names = [t for t in await admin.list_topics() if not t.startswith("__")]
        if not names:
            return {}
        described = await admin.describe_topics(names)
        return {t["topic"]: len(t["partitions"]) for t in described if not t["error_code"]}
    except KafkaError as exc:
        raise KafkaUnavailableError(
            f"cannot reach Kafka at {bootstrap_servers}: {describe_error(exc)}; start one with "
            "`ebpf-apm broker` or set --bootstrap-servers / KAFKA_BOOTSTRAP_SERVERS"
        ) from exc
    finally:
        await admin.close()


def _layout_error(counts: dict[str, int], spans: str, net: str) -> TopicLayoutError:
    return TopicLayoutError(
        f"{spans} has {counts[spans]} partitions and {net} has {counts[net]}: the join needs "
        "them co-partitioned (same key, same partition count); add partitions to the smaller "
        "one (kafka-topics.sh --alter --partitions N) or recreate both, then restart the join"
    )


async def prepare_topics(settings: KafkaSettings) -> int:
    """Check (and create what is missing of) the four topics; the input partition count.

    A missing input topic is created with the other's partition count, so that the agent,
    which leaves existing topics alone, finds them co-partitioned.
    """
    quiet_aiokafka_logs()
    spans, net = settings.input_topics
    existing = await _existing_partition_counts(settings.bootstrap_servers)
    known = {t: existing[t] for t in (spans, net) if t in existing}
    if len(set(known.values())) > 1:
        raise _layout_error(known, spans, net)
    count = next(iter(known.values()), settings.default_partitions)
    wanted = {t: count for t in (spans, net, settings.output_topic, settings.deadletter_topic)}
    try:
        counts = await ensure_topics(settings.bootstrap_servers, wanted)
    except PublisherError as exc:
        raise JoinKafkaError(str(exc)) from exc
    if counts[spans] != counts[net]:
        raise _layout_error(counts, spans, net)
    return counts[spans]


RebalanceCallback = Callable[[list[TopicPart]], Awaitable[None]]


class _Listener(ConsumerRebalanceListener):
    def __init__(self, revoked: RebalanceCallback, assigned: RebalanceCallback) -> None:
        self._revoked = revoked
        self._assigned = assigned

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._revoked([(tp.topic, tp.partition) for tp in revoked])

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._assigned([(tp.topic, tp.partition) for tp in assigned])


class InputConsumer:
    """Group member reading both input topics; rebalances call the given coroutines (they
    run while the consumer is not fetching, before other members get the partitions)."""

    def __init__(
        self, settings: KafkaSettings, on_revoked: RebalanceCallback, on_assigned: RebalanceCallback
    ) -> None:
        self._settings = settings
        self._listener = _Listener(on_revoked, on_assigned)
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        # Created here, not in __init__: an unstarted aiokafka client warns when collected.
        settings = self._settings
        self._consumer = consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            group_id=settings.group_id,
            client_id=settings.client_id,
            enable_auto_commit=False,
            # A new group starts at the oldest input: a span emitted twice is recognisable
            # by its span_id, a span never emitted is not.
            auto_offset_reset="earliest",
            partition_assignment_strategy=(RangePartitionAssignor,),
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=max(100, settings.session_timeout_ms // 5),
            max_partition_fetch_bytes=4 << 20,  # the agent's messages go up to 4 MiB
        )
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            raise JoinKafkaError(
                f"cannot start the consumer group {self._settings.group_id!r} on "
                f"{self._settings.bootstrap_servers}: {describe_error(exc)}; check that Kafka "
                "runs there (--bootstrap-servers)"
            ) from exc
        consumer.subscribe(list(self._settings.input_topics), listener=self._listener)

    @property
    def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("InputConsumer.start() was not called")
        return self._consumer

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def poll(self, timeout_ms: int) -> list[InputRecord]:
        batches = await self._started.getmany(timeout_ms=timeout_ms)
        return [record for records in batches.values() for record in records]

    async def caught_up(self, topic: str, partition: int) -> bool:
        """Whether everything Kafka had for the partition at the last fetch has been read."""
        tp = TopicPartition(topic, partition)
        try:
            highwater = self._started.highwater(tp)
            # No fetch answered yet (highwater None): not known to be caught up.
            return highwater is not None and await self._started.position(tp) >= highwater
        except (AssertionError, IllegalStateError):  # no longer assigned (rebalancing)
            return False

    def assignment(self) -> set[TopicPart]:
        return {(tp.topic, tp.partition) for tp in self._started.assignment()}

    async def commit(self, offsets: dict[TopicPart, int]) -> bool:
        """Commit; False (logged) when the group moved on and the partitions are gone."""
        if not offsets:
            return True
        try:
            await self._started.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
        except (CommitFailedError, KafkaError) as exc:
            log.warning(
                "could not commit offsets %s: %s; the next owner re-reads from the last "
                "committed offsets (spans may be emitted twice, same span_id)",
                offsets,
                describe_error(exc),
            )
            return False
        return True


class OutputBatch:
    """Messages for one partition of one topic, sent together (one acknowledgement)."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self._builder = producer.create_batch()
        self.count = 0

    def extend(self, key: bytes, values: list[bytes], start: int = 0) -> int:
        """Append values[start:] until the batch is full; how many went in (send the batch
        and start another for the rest)."""
        append = self._builder.append
        taken = 0
        for value in values[start:] if start else values:
            if append(timestamp=None, key=key, value=value) is None:
                break
            taken += 1
        self.count += taken
        return taken


class OutputProducer:
    """Producer of the join's results (acks=all); futures resolve on acknowledgement."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._producer_or_none: AIOKafkaProducer | None = None
        self._partitions: dict[str, int] = {}
        self._partition_of_key: dict[tuple[str, bytes], int] = {}

    @property
    def _producer(self) -> AIOKafkaProducer:
        if self._producer_or_none is None:
            raise RuntimeError("OutputProducer.start() was not called")
        return self._producer_or_none

    async def start(self) -> None:
        settings = self._settings
        self._producer_or_none = producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id=settings.client_id,
            acks="all",
            compression_type=settings.compression,
            linger_ms=5,
            max_batch_size=_MAX_BATCH_BYTES,
            max_request_size=4 << 20,
        )
        try:
            await producer.start()
            for topic in (settings.output_topic, settings.deadletter_topic):
                self._partitions[topic] = len(await producer.partitions_for(topic))
        except KafkaError as exc:
            await producer.stop()
            raise JoinKafkaError(
                f"cannot start the producer on {self._settings.bootstrap_servers}: "
                f"{describe_error(exc)}; check that Kafka runs there (--bootstrap-servers)"
            ) from exc

    async def flush(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for every batch handed over to be acknowledged (or failed)."""
        try:
            await asyncio.wait_for(self._producer.flush(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout_s: float) -> bool:
        """Flush for up to timeout_s, then stop; False if something was not delivered."""
        if self._producer_or_none is None:
            return True
        flushed = await self.flush(timeout_s)
        await self._producer.stop()
        return flushed

    def partition_of(self, topic: str, key: bytes) -> int:
        """Kafka's default partitioner (murmur2 of the key), as the agent's producer uses:
        with equal partition counts a span lands on its input partition number."""
        cached = self._partition_of_key.get((topic, key))
        if cached is None:
            cached = (murmur2(key) & 0x7FFFFFFF) % self._partitions[topic]
            self._partition_of_key[(topic, key)] = cached
        return cached

    def new_batch(self, topic: str, partition: int) -> OutputBatch:
        return OutputBatch(self._producer, topic, partition)

    async def send(self, batch: OutputBatch) -> asyncio.Future[object]:
        """Hand a batch to the producer; waits while the partition's previous batch is
        still queued (backpressure). The future resolves when Kafka acknowledges it."""
        try:
            future: asyncio.Future[object] = await self._producer.send_batch(
                batch._builder, batch.topic, partition=batch.partition
            )
        except KafkaError as exc:
            raise self._send_error(batch.topic, exc) from exc
        return future

    async def send_one(
        self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[object]:
        try:
            future: asyncio.Future[object] = await self._producer.send(
                topic, value, key=key, headers=headers
            )
        except KafkaError as exc:
            raise self._send_error(topic, exc) from exc
        return future

    def _send_error(self, topic: str, exc: KafkaError) -> JoinKafkaError:
        return JoinKafkaError(
            f"cannot hand output for {topic} to Kafka at {self._settings.bootstrap_servers}: "
            f"{describe_error(exc)}; check the broker and restart the join (it re-reads the "
            "input it did not commit)"
        )
