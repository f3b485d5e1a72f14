"""Publish the agent's batches to Kafka without ever letting the broker stall the agent.

The agent calls `KafkaPublisher.publish()` from its hot loop. A message goes into a buffer
bounded by bytes and a background task hands it to aiokafka; the agent never waits for the
network. While the broker is down or slow the buffer absorbs the backlog; once it is full,
new messages are dropped at once and counted, because losing fresh spans is better than
blocking the probes' ring buffer reader (a drain loop that waited for room on every message
of every process would pass the liveness probe's limit during an outage). Only while the
broker is connected and acknowledging, and no message was dropped since the last one that
fitted, does publish() wait briefly (`enqueue_timeout_s`) for the room its acknowledgements
free.

Every accepted message is accounted for: it ends up acknowledged, failed (a non-retriable
error, logged once per kind), or reported as lost by `close()`. Messages that hit a
retriable error go back to the front of the buffer, in their original order.

This is the only agent module that imports aiokafka; clients and tuning come from the
shared Kafka edge (ebpf_apm.kafka).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError

from ebpf_apm.errors import InputError
from ebpf_apm.kafka.clients import new_producer, stop_producer
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.errors import describe_error
from ebpf_apm.producer.errors import AgentError

log = logging.getLogger(__name__)

MiB = 1 << 20
COMPRESSIONS = ("none", "gzip", "snappy", "lz4", "zstd")
# aiokafka takes acks as an int or "all"; the config keeps the Kafka CLI spelling.
_ACKS: dict[str, int | str] = {"0": 0, "1": 1, "all": "all", "-1": "all"}
_PROBE_TIMEOUT_S = 3.0
_DROP_WARNING_INTERVAL_S = 60.0
# The watchdog probes the broker when no acknowledgement came for _STALL_S; a broker that
# accepts connections but acknowledges nothing for _SILENT_S (frozen, overloaded) is away too.
_WATCH_INTERVAL_S = 1.0
_STALL_S = 3.0
_SILENT_S = 10.0


class PublisherError(AgentError):
    """The publisher cannot do its job (exit status 1)."""


class PublisherConfigError(PublisherError, InputError):
    """A publisher setting is invalid (exit status 2)."""


@dataclass(frozen=True)
class PublisherConfig:
    connection: KafkaConnection
    topic: str
    acks: str = "all"
    compression: str = "lz4"
    # Off by default: Tansu (the embedded broker) fails InitProducerId with UnknownError.
    idempotent: bool = False
    linger_ms: int = 20
    max_request_size: int = 4 * MiB
    # Bytes of messages held while the broker is down or slow (accepted, not yet acknowledged).
    buffer_max_bytes: int = 64 * MiB
    # How long publish() waits for room in a full buffer before dropping the message, while
    # the broker is connected and acknowledging (never while it is away, nor while dropping).
    enqueue_timeout_s: float = 0.2
    # How long aiokafka may try to deliver a message before we take it back and retry: long
    # enough that a broker frozen for a minute or two delays messages without reordering them.
    send_timeout_s: float = 120.0
    client_id: str = "ebpf-apm-agent"
    # Reconnect / retry backoff: starts here and doubles up to retry_backoff_max_s.
    retry_backoff_s: float = 0.5
    retry_backoff_max_s: float = 10.0

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.topic:
            problems.append("topic is empty")
        if self.acks not in _ACKS:
            problems.append(f"acks={self.acks!r} is not one of {', '.join(_ACKS)}")
        if self.compression not in COMPRESSIONS:
            problems.append(
                f"compression={self.compression!r} is not one of {', '.join(COMPRESSIONS)}"
            )
        if self.idempotent and _ACKS.get(self.acks) != "all":
            problems.append("idempotent=True requires acks='all'")
        for name in ("max_request_size", "buffer_max_bytes"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("send_timeout_s", "retry_backoff_s", "retry_backoff_max_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.linger_ms < 0 or self.enqueue_timeout_s < 0:
            problems.append("linger_ms and enqueue_timeout_s must not be negative")
        if problems:
            raise PublisherConfigError("invalid Kafka publisher settings: " + "; ".join(problems))


@dataclass(frozen=True)
class PublisherStats:
    accepted_messages: int
    accepted_events: int
    acked_messages: int
    acked_events: int
    dropped_messages: int
    dropped_events: int
    failed_messages: int
    failed_events: int
    buffered_bytes: int
    connected: bool


@dataclass(order=True, slots=True)
class _Message:
    # Ordered by acceptance so that retried messages go out again in their original order.
    seq: int
    key: bytes = field(compare=False)
    value: bytes = field(compare=False)
    events: int = field(compare=False)
    size: int = field(compare=False)


def _is_retriable(exc: BaseException) -> bool:
    # aiokafka marks its own timeout as not retriable, but for us it only means "the broker
    # did not answer in time": the message must go back to the buffer, not be dropped.
    if isinstance(exc, KafkaTimeoutError | TimeoutError | ConnectionError):
        return True
    return isinstance(exc, KafkaError) and bool(exc.retriable)


def _size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n} bytes"


async def _probe(servers: list[tuple[str, int]]) -> str | None:
    """None if some bootstrap server accepts TCP connections, else why none did.

    Checked before starting aiokafka so that an absent broker costs one failed connect per
    retry instead of a burst of aiokafka error logs.
    """
    errors: list[str] = []
    for host, port in servers:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), _PROBE_TIMEOUT_S
            )
        except (TimeoutError, OSError) as exc:
            errors.append(describe_error(exc))
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None
    return "; ".join(errors) or "no address"


class KafkaPublisher:
    """Buffered, never-blocking Kafka producer for one topic (see the module docstring)."""

    def __init__(self, config: PublisherConfig) -> None:
        self._config = config
        self._servers = config.connection.servers
        self._pending: deque[_Message] = deque()
        self._retry: list[_Message] = []  # heap by seq; sent before anything in _pending
        self._seq = itertools.count()
        self._buffered_bytes = 0
        self._unacked = 0
        self._unacked_events = 0
        self._accepted = [0, 0]  # messages, events
        self._acked = [0, 0]
        self._dropped = [0, 0]
        self._failed = [0, 0]
        self._connected = False
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._fatal: BaseException | None = None
        self._closing = False
        self._closed = False
        self._wakeup = asyncio.Event()
        self._space = asyncio.Event()  # replaced each time bytes are freed; waiters see set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._dead = asyncio.Event()  # set when the background task stopped on an error
        self._resume_at = 0.0  # loop time before which retried messages are not resent
        self._waiting_since = 0.0  # loop time since which the oldest unacked message waits
        self._backoff = config.retry_backoff_s
        self._outage = False
        self._dropping = False
        self._last_drop_warning = -_DROP_WARNING_INTERVAL_S
        self._drop_warned = False
        self._failure_kinds: set[str] = set()

    # -- public API ---------------------------------------------------------------------

    @property
    def config(self) -> PublisherConfig:
        return self._config

    @property
    def stats(self) -> PublisherStats:
        return PublisherStats(
            accepted_messages=self._accepted[0],
            accepted_events=self._accepted[1],
            acked_messages=self._acked[0],
            acked_events=self._acked[1],
            dropped_messages=self._dropped[0],
            dropped_events=self._dropped[1],
            failed_messages=self._failed[0],
            failed_events=self._failed[1],
            buffered_bytes=self._buffered_bytes,
            connected=self._connected,
        )

    @property
    def started(self) -> bool:
        return self._task is not None

    async def start(self) -> None:
        """Return at once; connecting (and reconnecting) happens in a background task."""
        if self._task is not None:
            raise RuntimeError("KafkaPublisher.start() was called twice")
        self._task = asyncio.create_task(self._run(), name=f"kafka-publisher:{self._config.topic}")

    async def publish(self, key: bytes, value: bytes, events: int) -> bool:
        """Buffer one message; False if it was dropped (buffer full) or can never be sent."""
        if self._closing:
            raise PublisherError(
                f"publish() to topic {self._config.topic!r} after close(); stop publishing first"
            )
        if self._fatal is not None:
            raise PublisherError(
                f"the Kafka publisher for topic {self._config.topic!r} stopped: "
                f"{self._fatal_reason()}"
            ) from self._fatal
        size = len(key) + len(value)
        if size > self._config.max_request_size:
            self._count_failure(
                "MessageTooLarge",
                f"a {size}-byte message exceeds max_request_size={self._config.max_request_size}; "
                "the agent must split batches smaller",
                events,
            )
            return False
        limit = self._config.buffer_max_bytes
        if self._buffered_bytes + size > limit:
            # Wait only when acknowledgements are coming: never while the broker is away,
            # nor once dropping has started (each wait would stall the agent's drain loop).
            if size <= limit and self._connected and not self._outage and not self._dropping:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + self._config.enqueue_timeout_s
                while self._buffered_bytes + size > limit:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        await asyncio.wait_for(self._space.wait(), remaining)
                    except TimeoutError:
                        break
            if self._buffered_bytes + size > limit or self._closing:
                self._drop(events)
                return False
        if self._dropping:
            self._dropping = False
            if self._drop_warned:  # pairs with the warning, so rate-limited like it
                self._drop_warned = False
                log.info(
                    "Kafka buffer has room again; %d messages (%d events) were dropped so far",
                    *self._dropped,
                )
        self._accept(_Message(next(self._seq), key, value, events, size))
        return True

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every accepted message is acknowledged or failed; False on timeout
        (or as soon as the publisher has stopped on an error)."""
        if self._unacked == 0 or self._fatal is not None:
            return self._unacked == 0
        waits = {asyncio.ensure_future(self._idle.wait()), asyncio.ensure_future(self._dead.wait())}
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        return self._unacked == 0

    async def close(self, timeout_s: float = 10.0) -> None:
        """Flush for up to timeout_s, then stop; what is still unacknowledged is counted as
        failed and logged (not retried: the agent is going away)."""
        if self._closed:
            return
        self._closing = True
        flushed = self._unacked == 0
        if self._task is not None and self._fatal is None:
            flushed = await self.flush(timeout_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._producer is not None:
            await stop_producer(self._producer, flushed)
            self._producer = None
            # Delivery callbacks of batches acknowledged during stop() run on the next loop
            # iteration; let them count before the rest is declared lost.
            await asyncio.sleep(0)
        self._connected = False
        self._closed = True
        if self._unacked:
            log.warning(
                "closing the Kafka publisher with %d messages (%d events) for topic %r not "
                "acknowledged by %s; they are lost (%s)",
                self._unacked,
                self._unacked_events,
                self._config.topic,
                self._config.connection,
                self._fatal_reason() or "the broker was unreachable or too slow",
            )
            self._failed[0] += self._unacked
            self._failed[1] += self._unacked_events
            self._retry.clear()
            self._pending.clear()
            self._unacked = self._unacked_events = self._buffered_bytes = 0
            self._idle.set()

    # -- buffer bookkeeping ---------------------------------------------------------------

    def _accept(self, msg: _Message) -> None:
        if self._unacked == 0:
            self._waiting_since = asyncio.get_running_loop().time()
        self._pending.append(msg)
        self._buffered_bytes += msg.size
        self._unacked += 1
        self._unacked_events += msg.events
        self._accepted[0] += 1
        self._accepted[1] += msg.events
        self._idle.clear()
        self._wakeup.set()

    def _drop(self, events: int) -> None:
        self._dropped[0] += 1
        self._dropped[1] += events
        if self._dropping:
            return
        self._dropping = True
        now = asyncio.get_running_loop().time()
        # A buffer hovering at its limit would otherwise warn at every short recovery.
        if now - self._last_drop_warning >= _DROP_WARNING_INTERVAL_S:
            self._last_drop_warning = now
            self._drop_warned = True
            log.warning(
                "Kafka buffer full (%s pending for %s): dropping new messages until the "
                "broker catches up; the publisher's stats count them",
                _size(self._config.buffer_max_bytes),
                self._config.connection,
            )

    def _release(self, msg: _Message) -> None:
        self._buffered_bytes -= msg.size
        self._unacked -= 1
        self._unacked_events -= msg.events
        space, self._space = self._space, asyncio.Event()
        space.set()
        if self._unacked == 0:
            self._idle.set()

    def _requeue(self, msg: _Message) -> None:
        heapq.heappush(self._retry, msg)
        self._wakeup.set()

    def _next_message(self) -> _Message | None:
        if self._retry:
            return heapq.heappop(self._retry)
        if self._pending:
            return self._pending.popleft()
        return None

    def _count_failure(self, kind: str, detail: str, events: int) -> None:
        self._failed[0] += 1
        self._failed[1] += events
        if kind not in self._failure_kinds:  # once per kind: no log line per message
            self._failure_kinds.add(kind)
            log.error(
                "Kafka rejected a message for topic %r (%s); it is not retried and further "
                "failures of this kind are only counted in the publisher's stats",
                self._config.topic,
                detail,
            )

    def _fail(self, msg: _Message, exc: BaseException) -> None:
        self._release(msg)
        self._count_failure(type(exc).__name__, describe_error(exc), msg.events)

    # -- connection state ---------------------------------------------------------------

    def _unreachable_warning(self, reason: str) -> None:
        log.warning(
            "broker %s unreachable (%s); buffering up to %s of events and retrying; "
            "check --bootstrap-servers / KAFKA_BOOTSTRAP_SERVERS",
            self._config.connection,
            reason,
            _size(self._config.buffer_max_bytes),
        )

    def _note_outage(self, exc: BaseException) -> None:
        self._connected = False
        loop = asyncio.get_running_loop()
        self._resume_at = loop.time() + self._backoff
        self._backoff = min(self._backoff * 2, self._config.retry_backoff_max_s)
        if not self._outage:
            self._outage = True
            self._unreachable_warning(describe_error(exc))

    def _note_delivery(self) -> None:
        self._connected = True
        self._backoff = self._config.retry_backoff_s
        if self._outage:
            self._outage = False
            log.info(
                "Kafka at %s accepts messages again (%d still buffered)",
                self._config.connection,
                self._unacked,
            )

    # -- background task ----------------------------------------------------------------

    async def _run(self) -> None:
        try:
            producer = await self._connect()
            async with asyncio.TaskGroup() as group:
                group.create_task(self._send_loop(producer))
                group.create_task(self._watch(), name="kafka-publisher-watchdog")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]  # from the TaskGroup: say what actually failed
            # Keep the error for publish() to raise: a dead sender must not go unnoticed.
            self._fatal = exc
            self._dead.set()
            log.error(
                "the Kafka publisher for topic %r stopped: %s",
                self._config.topic,
                self._fatal_reason(),
                exc_info=not isinstance(exc, PublisherError),  # ours say it all already
            )

    def _fatal_reason(self) -> str:
        exc = self._fatal
        if exc is None:
            return ""
        return str(exc) if isinstance(exc, PublisherError) else describe_error(exc)

    def _new_producer(self) -> AIOKafkaProducer:
        cfg = self._config
        return new_producer(
            cfg.connection,
            cfg.client_id,
            compression=cfg.compression,
            linger_ms=cfg.linger_ms,
            max_request_size=cfg.max_request_size,
            acks=_ACKS[cfg.acks],
            enable_idempotence=cfg.idempotent,
            request_timeout_ms=int(cfg.send_timeout_s * 1000),
        )

    async def _connect(self) -> AIOKafkaProducer:
        delay = self._config.retry_backoff_s
        while True:
            reason = await _probe(self._servers)
            if reason is None:
                producer = self._new_producer()
                try:
                    await producer.start()
                except BaseException as exc:
                    await producer.stop()  # even when cancelled: no unclosed connections
                    if not isinstance(exc, KafkaError) or not exc.retriable:
                        raise self._start_error(exc) from exc
                    reason = describe_error(exc)
                else:
                    self._producer = producer
                    self._connected = True
                    self._outage = False
                    log.info(
                        "connected to Kafka at %s (topic %r, acks=%s, compression=%s)",
                        self._config.connection,
                        self._config.topic,
                        self._config.acks,
                        self._config.compression,
                    )
                    return producer
            if not self._outage:
                self._outage = True
                self._unreachable_warning(reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._config.retry_backoff_max_s)

    def _start_error(self, exc: BaseException) -> BaseException:
        # The broker answers but refuses the producer: retrying will not help.
        if not isinstance(exc, KafkaError):
            return exc
        hint = ""
        if self._config.idempotent:
            hint = (
                "; idempotent producers need InitProducerId, which Tansu (the embedded "
                "broker) does not support: turn idempotence off"
            )
        return PublisherError(
            f"Kafka at {self._config.connection} refused to start a producer: "
            f"{describe_error(exc)}{hint}"
        )

    async def _send_loop(self, producer: AIOKafkaProducer) -> None:
        loop = asyncio.get_running_loop()
        topic = self._config.topic
        while True:
            if self._retry and loop.time() < self._resume_at:
                await asyncio.sleep(self._resume_at - loop.time())
            msg = self._next_message()
            if msg is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                future = await producer.send(topic, msg.value, key=msg.key)
            except asyncio.CancelledError:
                self._requeue(msg)
                raise
            except Exception as exc:
                if _is_retriable(exc):
                    self._requeue(msg)
                    self._note_outage(exc)
                else:
                    self._fail(msg, exc)
                continue
            future.add_done_callback(functools.partial(self._on_delivery, msg))

    async def _watch(self) -> None:
        """Warn early when the broker goes away after we connected.

        aiokafka retries a lost broker quietly until send_timeout_s (30 s by default) expires
        a batch; a TCP probe says sooner whether the broker is gone. Only a failed probe
        warns: a broker that is merely slow to acknowledge a backlog is not unreachable.
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_WATCH_INTERVAL_S)
            waited = loop.time() - self._waiting_since if self._unacked else 0.0
            if waited > _STALL_S and not self._outage:
                reason = await _probe(self._servers)
                if reason is None and waited > _SILENT_S:
                    reason = f"it accepts connections but acknowledged nothing for {waited:.0f} s"
                if reason is not None and not self._outage:
                    self._connected = False
                    self._outage = True
                    self._unreachable_warning(reason)

    def _on_delivery(self, msg: _Message, future: asyncio.Future[object]) -> None:
        if self._closed:
            return  # close() already accounted for everything still unacknowledged
        if future.cancelled():
            self._requeue(msg)
            return
        exc = future.exception()
        if exc is None:
            self._release(msg)
            self._acked[0] += 1
            self._acked[1] += msg.events
            self._waiting_since = asyncio.get_running_loop().time()
            self._note_delivery()
        elif _is_retriable(exc):
            self._requeue(msg)
            if not self._closing:  # close() abandons batches: that is no outage
                self._note_outage(exc)
        else:
            self._fail(msg, exc)
