"""The consumer services' Kafka toolkit: group input, acknowledged output, dead letters.

    GroupInput    one consumer group over a service's input topics; rebalance callbacks,
                  "caught up", commits of offsets the service chose (never automatic)
    AckedOutput   a producer (acks=all) whose futures resolve on acknowledgement: whole
                  batches for one partition, single messages, dead letters
    TopicReader   every partition of one topic by assignment, no group (`ebpf-apm tail`)

Every consumer service (join, aggregate, alert, and those to come) reads and writes through
these classes; the clients come from the shared edge (ebpf_apm.kafka.clients). This is the
only consumer module that imports aiokafka.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.partitioner import murmur2

from ebpf_apm.consumers.errors import ConsumerKafkaError
from ebpf_apm.kafka import topics
from ebpf_apm.kafka.clients import new_consumer, new_producer
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.deadletter import DeadLetter
from ebpf_apm.kafka.errors import describe_error, unreachable_hint

log = logging.getLogger(__name__)

TopicPart = tuple[str, int]
# Keys whose partition AckedOutput remembers (murmur2 in Python costs ~2 us a key).
PARTITION_CACHE_LIMIT = 65_536
RebalanceCallback = Callable[[list[TopicPart]], Awaitable[None]]


class InputRecord(Protocol):
    """What a service reads of a consumed message (aiokafka's ConsumerRecord has it)."""

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
    @property
    def timestamp(self) -> int: ...


async def _no_rebalance_work(_: list[TopicPart]) -> None:
    return None


async def _fetch(
    consumer: AIOKafkaConsumer,
    connection: KafkaConnection,
    topics: Sequence[str],
    timeout_ms: int,
) -> dict[TopicPartition, list[Any]]:
    try:
        return await consumer.getmany(timeout_ms=timeout_ms)
    except KafkaError as exc:
        raise ConsumerKafkaError(
            f"reading {', '.join(topics)} from Kafka at {connection} failed: "
            f"{describe_error(exc)}; check the broker, then start again (input is read again "
            "from the last commit)"
        ) from exc


class _Listener(ConsumerRebalanceListener):
    def __init__(self, revoked: RebalanceCallback, assigned: RebalanceCallback) -> None:
        self._revoked = revoked
        self._assigned = assigned

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._revoked([(tp.topic, tp.partition) for tp in revoked])

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._assigned([(tp.topic, tp.partition) for tp in assigned])


class GroupInput:
    """A member of a consumer group reading `topics`; offsets are committed by the service.

    Rebalances call the given coroutines while the consumer is not fetching, before other
    members get the partitions. `co_partitioned` uses the range assignor, which lays each
    topic's partitions out in order: with equal partition counts every member gets the same
    partition numbers of every topic, which a co-partitioned join needs (aiokafka's default,
    round robin, would split them).
    """

    def __init__(
        self,
        connection: KafkaConnection,
        *,
        group: str,
        topics: Sequence[str],
        client_id: str,
        on_revoked: RebalanceCallback = _no_rebalance_work,
        on_assigned: RebalanceCallback = _no_rebalance_work,
        co_partitioned: bool = False,
        session_timeout_ms: int = 10_000,
        from_beginning: bool = True,
    ) -> None:
        self.connection = connection
        self.group = group
        self.topics = tuple(topics)
        self._client_id = client_id
        self._listener = _Listener(on_revoked, on_assigned)
        self._co_partitioned = co_partitioned
        self._session_timeout_ms = session_timeout_ms
        self._from_beginning = from_beginning
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        # Created here, not in __init__: an unstarted aiokafka client warns when collected.
        options: dict[str, Any] = {}
        if self._co_partitioned:
            options["partition_assignment_strategy"] = (RangePartitionAssignor,)
        self._consumer = consumer = new_consumer(
            self.connection,
            self._client_id,
            group_id=self.group,
            # A new group of a service that must see everything starts at the oldest input.
            auto_offset_reset="earliest" if self._from_beginning else "latest",
            session_timeout_ms=self._session_timeout_ms,
            heartbeat_interval_ms=max(100, self._session_timeout_ms // 5),
            **options,
        )
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            raise ConsumerKafkaError(
                f"cannot join the consumer group {self.group!r} on Kafka at {self.connection}: "
                f"{describe_error(exc)}; {unreachable_hint()}"
            ) from exc
        consumer.subscribe(list(self.topics), listener=self._listener)

    @property
    def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("GroupInput.start() was not called")
        return self._consumer

    async def stop(self) -> None:
        if self._consumer is not None:
            try:
                await self._consumer.stop()
            except KafkaError as exc:
                log.warning("leaving group %r: %s", self.group, describe_error(exc))

    async def poll(self, timeout_ms: int) -> dict[TopicPart, list[InputRecord]]:
        """Records fetched since the last poll, per partition in offset order."""
        batches = await _fetch(self._started, self.connection, self.topics, timeout_ms)
        return {(tp.topic, tp.partition): list(records) for tp, records in batches.items()}

    async def caught_up(self, topic: str, partition: int) -> bool:
        """Whether everything Kafka had for the partition at the last fetch has been read."""
        tp = TopicPartition(topic, partition)
        try:
            highwater = self._started.highwater(tp)
            # No fetch answered yet (highwater None): not known to be caught up.
            return highwater is not None and await self._started.position(tp) >= highwater
        except (AssertionError, IllegalStateError):  # no longer assigned (rebalancing)
            return False

    async def all_caught_up(self) -> bool:
        """Whether every assigned partition is caught up (False while nothing is assigned)."""
        assigned = self.assignment()
        if not assigned:
            return False
        for topic, partition in assigned:
            if not await self.caught_up(topic, partition):
                return False
        return True

    def assignment(self) -> set[TopicPart]:
        return {(tp.topic, tp.partition) for tp in self._started.assignment()}

    async def commit(self, offsets: dict[TopicPart, int]) -> bool:
        """Commit; False (logged) when Kafka refused, e.g. the group moved on and the
        partitions are gone: the next owner reads again from the last committed offsets."""
        if not offsets:
            return True
        try:
            await self._started.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
        except (CommitFailedError, KafkaError) as exc:
            log.warning(
                "could not commit offsets of group %r (%s): %s; the next commit carries them, "
                "or the next owner reads that input again",
                self.group,
                ", ".join(f"{t}/{p}@{o}" for (t, p), o in sorted(offsets.items())),
                describe_error(exc),
            )
            return False
        return True


class OutputBatch:
    """Messages for one partition of one topic, sent together (one acknowledgement)."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.builder = producer.create_batch()
        self.count = 0

    def extend(self, key: bytes, values: list[bytes], start: int = 0) -> int:
        """Append values[start:] until the batch is full; how many went in (send the batch
        and start another for the rest)."""
        append = self.builder.append
        taken = 0
        for value in values[start:] if start else values:
            if append(timestamp=None, key=key, value=value) is None:
                break
            taken += 1
        self.count += taken
        return taken


class AckedOutput:
    """A service's producer (acks=all): every send returns a future that resolves when Kafka
    acknowledged it, so the service commits its input only after its output is safe."""

    def __init__(
        self,
        connection: KafkaConnection,
        *,
        client_id: str,
        compression: str | None = None,
        deadletter_topic: str = topics.DEADLETTER,
    ) -> None:
        self.connection = connection
        self.deadletter_topic = deadletter_topic
        self._client_id = client_id
        self._compression = compression
        self._producer_or_none: AIOKafkaProducer | None = None
        self._partitions: dict[str, int] = {}
        self._partition_of_key: dict[tuple[str, bytes], int] = {}
        self.partition_cache_resets = 0
        self._last_dead_letter_log = -1e9
        self._unlogged = 0

    @property
    def _producer(self) -> AIOKafkaProducer:
        if self._producer_or_none is None:
            raise RuntimeError("AckedOutput.start() was not called")
        return self._producer_or_none

    async def start(self, keyed_topics: Iterable[str] = ()) -> None:
        """Connect; learn the partition counts of the topics `partition_of` is asked about."""
        self._producer_or_none = producer = new_producer(
            self.connection, self._client_id, compression=self._compression
        )
        try:
            await producer.start()
            for topic in keyed_topics:
                self._partitions[topic] = len(await producer.partitions_for(topic))
        except KafkaError as exc:
            await producer.stop()
            raise ConsumerKafkaError(
                f"cannot start a producer on Kafka at {self.connection}: "
                f"{describe_error(exc)}; {unreachable_hint()}"
            ) from exc

    async def flush(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for every message handed over to be acknowledged (or failed)."""
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
        try:
            await self._producer.stop()
        except KafkaError as exc:
            log.warning("stopping the producer: %s", describe_error(exc))
            return False
        return flushed

    def partition_of(self, topic: str, key: bytes) -> int:
        """Kafka's default partitioner (murmur2 of the key), as the agent's producer uses:
        with equal partition counts a record lands on its input partition number."""
        cached = self._partition_of_key.get((topic, key))
        if cached is None:
            cached = (murmur2(key) & 0x7FFFFFFF) % self._partitions[topic]
            if len(self._partition_of_key) >= PARTITION_CACHE_LIMIT:
                # Keys come from input (node/pid): start over rather than grow without end.
                self._partition_of_key.clear()
                self.partition_cache_resets += 1
            self._partition_of_key[(topic, key)] = cached
        return cached

    def new_batch(self, topic: str, partition: int) -> OutputBatch:
        return OutputBatch(self._producer, topic, partition)

    async def send(self, batch: OutputBatch) -> asyncio.Future[object]:
        """Hand a batch over; waits while the partition's previous batch is still queued
        (backpressure). The future resolves when Kafka acknowledges it."""
        try:
            future: asyncio.Future[object] = await self._producer.send_batch(
                batch.builder, batch.topic, partition=batch.partition
            )
        except KafkaError as exc:
            raise self._send_error(batch.topic, exc) from exc
        return future

    async def send_one(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[object]:
        try:
            future: asyncio.Future[object] = await self._producer.send(
                topic, value, key=key, headers=headers
            )
        except KafkaError as exc:
            raise self._send_error(topic, exc) from exc
        return future

    async def dead_letter(self, letter: DeadLetter) -> asyncio.Future[object]:
        """Send a rejected input message to the dead-letter topic, unchanged, with why."""
        # At most one line a second: a flood of poison must not flood the log too.
        now = time.monotonic()
        if now - self._last_dead_letter_log >= 1.0:
            more = f" (and {self._unlogged} more since the last line)" if self._unlogged else ""
            log.warning(
                "message %s goes to %s: %s%s",
                letter.source,
                self.deadletter_topic,
                letter.reason,
                more,
            )
            self._last_dead_letter_log, self._unlogged = now, 0
        else:
            self._unlogged += 1
        return await self.send_one(self.deadletter_topic, letter.key, letter.value, letter.headers)

    async def deliver(
        self, topic: str, messages: Sequence[tuple[bytes | None, bytes | None]]
    ) -> None:
        """Send (key, value) messages and return once Kafka acknowledged every one."""
        futures = [await self.send_one(topic, key, value) for key, value in messages]
        await self._acknowledged(topic, futures)

    async def deliver_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Dead-letter each message and return once Kafka acknowledged every one."""
        futures = [await self.dead_letter(letter) for letter in letters]
        await self._acknowledged(self.deadletter_topic, futures)

    async def deliver_dead_letters_retrying(
        self, letters: Sequence[DeadLetter], max_delay_s: float = 30.0
    ) -> None:
        """deliver_dead_letters, retried with backoff and jitter while Kafka refuses them:
        a consumer must not commit past a message before its dead letter is safe, nor stop."""
        delay = 0.5
        while True:
            try:
                await self.deliver_dead_letters(letters)
                return
            except ConsumerKafkaError as exc:
                log.warning(
                    "waiting for Kafka to take %d dead letter(s), retrying in about %.1f s: %s",
                    len(letters),
                    delay,
                    exc,
                )
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, max_delay_s)

    async def _acknowledged(self, topic: str, futures: list[asyncio.Future[object]]) -> None:
        try:
            await asyncio.gather(*futures)
        except KafkaError as exc:
            raise ConsumerKafkaError(
                f"Kafka at {self.connection} did not acknowledge {len(futures)} message(s) for "
                f"{topic}: {describe_error(exc)}; check the broker, then restart (the input "
                "that was not committed is read again)"
            ) from exc

    def _send_error(self, topic: str, exc: KafkaError) -> ConsumerKafkaError:
        return ConsumerKafkaError(
            f"cannot hand output for {topic} to Kafka at {self.connection}: "
            f"{describe_error(exc)}; check the broker and restart (the input that was not "
            "committed is read again)"
        )


class TopicReader:
    """Every partition of one topic by direct assignment: no group, no commits, so reading
    never moves a real consumer's offsets and needs no group coordinator."""

    def __init__(self, connection: KafkaConnection, topic: str, client_id: str) -> None:
        self.connection = connection
        self.topic = topic
        self._client_id = client_id
        self._consumer: AIOKafkaConsumer | None = None
        self.partitions: list[int] = []

    async def start(self, from_beginning: bool) -> None:
        """Assign every partition; raise ConsumerKafkaError when Kafka or the topic is missing."""
        self._consumer = consumer = new_consumer(
            self.connection,
            self._client_id,
            group_id=None,
            auto_offset_reset="earliest" if from_beginning else "latest",
        )
        try:
            await consumer.start()
            # All-topics listing on purpose: naming the topic in a metadata request makes
            # brokers with auto-creation (Tansu, default Kafka) create it.
            existing = await consumer.topics()
        except KafkaError as exc:
            raise ConsumerKafkaError(
                f"cannot reach Kafka at {self.connection}: {describe_error(exc)}; "
                f"{unreachable_hint()}"
            ) from exc
        partitions = consumer.partitions_for_topic(self.topic) if self.topic in existing else None
        if not partitions:
            have = ", ".join(sorted(t for t in existing if not t.startswith("__"))) or "none"
            raise ConsumerKafkaError(
                f"topic {self.topic!r} does not exist on Kafka at {self.connection} (topics "
                f"there: {have}); it is created when its producer starts publishing"
            )
        self.partitions = sorted(partitions)
        assigned = [TopicPartition(self.topic, p) for p in self.partitions]
        consumer.assign(assigned)
        if from_beginning:
            await consumer.seek_to_beginning(*assigned)
        else:
            await consumer.seek_to_end(*assigned)
            await self._skip_to_high_watermark(assigned)
        # Resolve the offsets now, so "from the end" means from when reading started, not
        # from whenever the first fetch happens.
        for tp in assigned:
            await consumer.position(tp)

    async def _skip_to_high_watermark(
        self, assigned: list[TopicPartition], timeout_s: float = 5.0
    ) -> None:
        """Move each partition past the last message that exists now.

        Tansu 0.6 answers ListOffsets(latest) with the last record batch's base offset + 1,
        short of the end when that batch holds several messages (the agent's usually do); the
        high watermark in a fetch response is right. On Apache Kafka both agree and this
        costs one fetch round trip. Records fetched here predate the start and are skipped.
        """
        consumer = self._started
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        pending = set(assigned)
        while pending and loop.time() < deadline:
            await consumer.getmany(*pending, timeout_ms=100)
            for tp in list(pending):
                highwater = consumer.highwater(tp)
                if highwater is None:
                    continue
                if highwater > await consumer.position(tp):
                    consumer.seek(tp, highwater)
                pending.discard(tp)

    @property
    def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("TopicReader.start() was not called")
        return self._consumer

    async def poll(self, timeout_ms: int) -> list[InputRecord]:
        """Records fetched since the last poll, partition by partition in offset order."""
        batches = await _fetch(self._started, self.connection, (self.topic,), timeout_ms)
        return [record for tp in sorted(batches) for record in batches[tp]]

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
