"""The consumer services' Kafka toolkit: group input, acknowledged output, dead letters.

    GroupInput    one consumer group over a service's input topics; rebalance callbacks,
                  "caught up", commits of offsets the service chose (never automatic)
    AckedOutput   a producer (acks=all) whose futures resolve on acknowledgement: whole
                  batches for one partition, single messages, dead letters
    TopicReader   every partition of one topic by assignment, no group (`ebpf-apm tail`)

Every consumer service (join, aggregate, alert, and those to come) reads and writes through
these classes; the clients come from the shared edge (ebpf_apm.kafka.clients). This is the
only consumer module that imports aiokafka.

Outages. aiokafka reconnects by itself; these classes make sure a broker that is away for
minutes costs waiting, never an exit: a failed fetch is retried after a backoff, a refused
commit is carried by the next one, output waits up to `OUTPUT_TIMEOUT_MS` for a frozen
broker before aiokafka gives a message up (the services then send it again or re-read its
input). Each says once, through an `Outage`, what it is waiting for, and once that it is back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.partitioner import murmur2

from ebpf_apm.consumers.errors import ConsumerKafkaError
from ebpf_apm.consumers.outage import Outage
from ebpf_apm.kafka import topics
from ebpf_apm.kafka.clients import new_consumer, new_producer, stop_producer
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.deadletter import DeadLetter
from ebpf_apm.kafka.errors import describe_error, unreachable_hint

log = logging.getLogger(__name__)

TopicPart = tuple[str, int]
# Keys whose partition AckedOutput remembers (murmur2 in Python costs ~2 us a key).
PARTITION_CACHE_LIMIT = 65_536
RebalanceCallback = Callable[[list[TopicPart]], Awaitable[None]]

# How long output may wait for a broker before aiokafka fails it (its request timeout and
# batch lifetime): a frozen broker of up to this long costs waiting, not a resend.
OUTPUT_TIMEOUT_MS = 180_000
# Output not acknowledged for this long is reported as waiting for Kafka.
STALL_S = 5.0
# A partition whose last fetch answer is older than this is not known to be caught up: a
# frozen or restarting broker must not look like quiet input (services advance event time
# on quiet input, and the events the outage held back would then arrive late).
FETCH_FRESH_MS = 3_000
# aiokafka retries a commit until it succeeds (while no coordinator answers, or for a
# partition the broker no longer has). A commit is awaited this long; one that takes longer
# goes on in the background, and no other starts until it ends (the next carries the
# offsets) or is COMMIT_ABANDON_S old: then it is cancelled and a new one starts.
COMMIT_TIMEOUT_S = 2.0
COMMIT_ABANDON_S = 30.0


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
    max_records: int | None = None,
) -> dict[TopicPartition, list[Any]]:
    try:
        return await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
    except KafkaError as exc:
        raise ConsumerKafkaError(
            f"reading {', '.join(topics)} from Kafka at {connection} failed: "
            f"{describe_error(exc)}; check the broker (input is read again from the last "
            "commit)"
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
        self._committing: asyncio.Future[None] | None = None
        self._commit_started = 0.0
        self.outage = Outage(f"Kafka at {connection} (group {group!r} reading {', '.join(topics)})")
        self.commit_outage = Outage(f"Kafka at {connection} (group {group!r} committing offsets)")

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
                f"{describe_error(exc)}; {unreachable_hint(exc)}"
            ) from exc
        consumer.subscribe(list(self.topics), listener=self._listener)

    @property
    def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("GroupInput.start() was not called")
        return self._consumer

    async def stop(self) -> None:
        if self._committing is not None and not self._committing.done():
            await asyncio.wait({self._committing}, timeout=COMMIT_TIMEOUT_S)
            self._abandon_commit()
        if self._consumer is not None:
            try:
                await self._consumer.stop()
            except KafkaError as exc:
                log.warning("leaving group %r: %s", self.group, describe_error(exc))

    async def poll(
        self, timeout_ms: int, max_records: int | None = None
    ) -> dict[TopicPart, list[InputRecord]]:
        """Records fetched since the last poll (at most `max_records`), per partition in
        offset order; nothing (after a backoff) while Kafka fails the fetch."""
        try:
            batches = await _fetch(
                self._started, self.connection, self.topics, timeout_ms, max_records
            )
        except ConsumerKafkaError as exc:
            await asyncio.sleep(min(self.outage.failed(str(exc)), timeout_ms / 1000 + 1))
            return {}
        if batches:
            self.outage.recovered()
        return {(tp.topic, tp.partition): list(records) for tp, records in batches.items()}

    def pause(self) -> None:
        """Stop fetching every assigned partition (polls keep the membership alive and return
        nothing of them). Partitions assigned later start unpaused: call again after a poll."""
        consumer = self._started
        consumer.pause(*consumer.assignment())

    def resume(self) -> None:
        consumer = self._started
        consumer.resume(*consumer.paused())

    def seek(self, offsets: dict[TopicPart, int]) -> None:
        """Read these partitions again from these offsets (those still assigned)."""
        consumer = self._started
        assigned = consumer.assignment()
        for (topic, partition), offset in offsets.items():
            tp = TopicPartition(topic, partition)
            if tp in assigned:
                consumer.seek(tp, offset)

    async def caught_up(self, topic: str, partition: int) -> bool:
        """Whether everything Kafka had for the partition at a recent fetch has been read."""
        tp = TopicPartition(topic, partition)
        consumer = self._started
        try:
            highwater = consumer.highwater(tp)
            # No fetch answered yet (highwater None): not known to be caught up.
            if highwater is None or await consumer.position(tp) < highwater:
                return False
            answered_ms = consumer.last_poll_timestamp(tp)
        except (AssertionError, IllegalStateError):  # no longer assigned (rebalancing)
            return False
        return answered_ms is not None and time.time() * 1000 - answered_ms <= FETCH_FRESH_MS

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
        if self._consumer is None:  # not started yet: nothing assigned
            return set()
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    async def lag(self) -> dict[TopicPart, int | None]:
        """Records behind the high watermark of the last fetch, per assigned partition
        (None until a fetch of that partition has been answered)."""
        lags: dict[TopicPart, int | None] = {}
        if self._consumer is None:
            return lags
        for tp in self._consumer.assignment():
            try:
                highwater = self._consumer.highwater(tp)
                position = await self._consumer.position(tp) if highwater is not None else None
            except (AssertionError, IllegalStateError):  # revoked meanwhile
                continue
            lags[(tp.topic, tp.partition)] = (
                None if highwater is None or position is None else max(0, highwater - position)
            )
        return lags

    async def commit(self, offsets: dict[TopicPart, int]) -> bool:
        """Commit; False when Kafka refused or did not answer within COMMIT_TIMEOUT_S (said
        once per outage): the next commit carries the same or newer offsets, or the next
        owner of the partitions reads that input again."""
        consumer = self._started
        # Only partitions the broker has now: a restarted in-memory broker may have fewer.
        offsets = {
            (t, p): o
            for (t, p), o in offsets.items()
            if p in (consumer.partitions_for_topic(t) or ())
        }
        if not offsets:
            return True
        loop = asyncio.get_running_loop()
        if self._committing is not None and not self._committing.done():
            if loop.time() - self._commit_started < COMMIT_ABANDON_S:
                return False  # the last commit still waits for Kafka
            self._abandon_commit()
        self._commit_started = loop.time()
        what = ", ".join(f"{t}/{p}@{o}" for (t, p), o in sorted(offsets.items()))
        committing = asyncio.ensure_future(
            consumer.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
        )
        committing.add_done_callback(functools.partial(self._committed, what))
        self._committing = committing
        done, _ = await asyncio.wait({committing}, timeout=COMMIT_TIMEOUT_S)
        if not done:
            self.commit_outage.failed(f"committing {what}: no answer in {COMMIT_TIMEOUT_S:g} s")
            return False
        return not committing.cancelled() and committing.exception() is None

    def _abandon_commit(self) -> None:
        """Cancel a commit aiokafka keeps retrying. Its request runs in a task of its own
        (shielded); its error, once it comes, is retrieved here so that asyncio does not
        report it as never retrieved (reaches into aiokafka 0.14, pinned below 0.15)."""
        if self._committing is None or self._committing.done():
            return
        self._committing.cancel()
        for task in asyncio.all_tasks():
            if getattr(task.get_coro(), "__qualname__", "").endswith("._do_commit_offsets"):
                task.add_done_callback(_retrieve)

    def _committed(self, what: str, committing: asyncio.Future[None]) -> None:
        if committing.cancelled():
            return
        exc = committing.exception()  # retrieved here, whoever still waits for it
        if exc is None:
            self.commit_outage.recovered()
        else:
            self.commit_outage.failed(f"committing {what}: {describe_error(exc)}")


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


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
        self.outage = Outage(f"Kafka at {connection} (acknowledging output)")
        self._unacked: set[asyncio.Future[object]] = set()
        self._progress_at = 0.0  # loop time of the last acknowledgement, or of the first send
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
            self.connection,
            self._client_id,
            compression=self._compression,
            request_timeout_ms=OUTPUT_TIMEOUT_MS,
        )
        try:
            await producer.start()
            await self.refresh_partitions(keyed_topics)
        except KafkaError as exc:
            await producer.stop()
            raise ConsumerKafkaError(
                f"cannot start a producer on Kafka at {self.connection}: "
                f"{describe_error(exc)}; {unreachable_hint(exc)}"
            ) from exc

    async def refresh_partitions(self, keyed_topics: Iterable[str]) -> None:
        """(Re)learn the partition counts `partition_of` uses: after a broker lost its
        topics (a restarted in-memory broker) they may differ."""
        for topic in keyed_topics:
            self._partitions[topic] = len(await self._producer.partitions_for(topic))
        self._partition_of_key.clear()

    def _track(self, future: asyncio.Future[object]) -> asyncio.Future[object]:
        """Count the message as unacknowledged until its future resolves."""
        if not self._unacked:
            self._progress_at = asyncio.get_running_loop().time()
        self._unacked.add(future)
        future.add_done_callback(self._settled)
        return future

    def _settled(self, future: asyncio.Future[object]) -> None:
        self._unacked.discard(future)
        if not future.cancelled() and future.exception() is None:
            self._progress_at = asyncio.get_running_loop().time()
            self.outage.recovered()

    def check_stalled(self) -> None:
        """Say (once) that output waits for Kafka when nothing was acknowledged for STALL_S."""
        if self._unacked and not self.outage.waiting:
            stalled = asyncio.get_running_loop().time() - self._progress_at
            if stalled >= STALL_S:
                self.outage.failed(
                    f"{len(self._unacked)} message batch(es) not acknowledged for {stalled:.0f} s"
                )

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
            await stop_producer(self._producer, flushed)
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
        return self._track(future)

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
        return self._track(future)

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

    async def _acknowledged(self, topic: str, futures: list[asyncio.Future[object]]) -> None:
        gathered = asyncio.gather(*futures)
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=STALL_S)
            if done:
                break
            self.check_stalled()
        try:
            gathered.result()
        except KafkaError as exc:
            raise ConsumerKafkaError(
                f"Kafka at {self.connection} did not acknowledge {len(futures)} message(s) for "
                f"{topic}: {describe_error(exc)}"
            ) from exc

    def _send_error(self, topic: str, exc: KafkaError) -> ConsumerKafkaError:
        return ConsumerKafkaError(
            f"cannot hand output for {topic} to Kafka at {self.connection}: {describe_error(exc)}"
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
                f"{unreachable_hint(exc)}"
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

    async def seek_to_time(self, since_ms: int, timeout_s: float = 5.0) -> dict[int, int]:
        """Move each partition to its first message published at or after `since_ms`;
        return each partition's end offset as it is now (what `reached` waits for).

        The ends come from a fetch's high watermark, as in _skip_to_high_watermark."""
        consumer = self._started
        assigned = [TopicPartition(self.topic, p) for p in self.partitions]
        ends: dict[int, int] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(ends) < len(assigned) and loop.time() < deadline:
            await consumer.getmany(*assigned, timeout_ms=100)
            for tp in assigned:
                highwater = consumer.highwater(tp)
                if highwater is not None:
                    ends[tp.partition] = highwater
        if len(ends) < len(assigned):
            raise ConsumerKafkaError(
                f"Kafka at {self.connection} did not answer a fetch of {self.topic} within "
                f"{timeout_s:g} s; try again when it answers"
            )
        try:
            found = await consumer.offsets_for_times({tp: since_ms for tp in assigned})
        except KafkaError as exc:  # a broker without timestamp lookups: read it all
            log.debug("offsets_for_times failed (%s): reading from the beginning", exc)
            found = {}
        for tp in assigned:
            at = found.get(tp)
            consumer.seek(tp, at.offset if at is not None else ends[tp.partition])
        if not found:
            await consumer.seek_to_beginning(*assigned)
        return ends

    async def reached(self, ends: dict[int, int]) -> bool:
        """Whether every partition was read up to its offset in `ends`."""
        consumer = self._started
        for partition, end in ends.items():
            if await consumer.position(TopicPartition(self.topic, partition)) < end:
                return False
        return True

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
