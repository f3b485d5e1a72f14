"""`ebpf-apm export`'s stages, wired in one place (flags: export_command.py).

    apm.spans (GroupInput) -> span.avsc decode -> pending (bounded)
      -> batches of --max-batch-spans, or whatever waited --max-batch-delay
      -> otlp_spans: one ExportTraceServiceRequest, spans grouped by resource
      -> otlp_client: http/protobuf or grpc, one request in flight
           accepted -> commit the batch's offsets
           retry    -> pause every partition, back off (Retry-After honoured), send again
           rejected -> the batch's messages to apm.deadletter (acknowledged), then commit
           refused  -> stop with an error (bad endpoint or credentials); nothing committed
    undecodable messages -> apm.deadletter with their batch, before their offsets are committed

At least once: offsets are committed only after the collector accepted a batch (or it was
dead-lettered), so a crash or a stop re-sends what was not yet accepted; the span ids are
deterministic (otlp_spans), so a backend sees the same span again, not a new one.

Bounded memory while the collector is away: one batch is in flight, the partitions are
paused while it is retried (the polls that keep the group membership alive return nothing),
so at most --max-batch-spans spans wait beside it, and Kafka keeps the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ebpf_apm.consumers.consumer_telemetry import ConsumerTelemetry
from ebpf_apm.consumers.errors import ConsumerError
from ebpf_apm.consumers.kafka_io import AckedOutput, GroupInput, InputRecord, TopicPart
from ebpf_apm.consumers.otlp_client import (
    ACCEPTED,
    REFUSED,
    REJECTED,
    Answer,
    Backoff,
    OtlpClient,
    sleep_or_stop,
)
from ebpf_apm.consumers.otlp_settings import OtlpSettings
from ebpf_apm.consumers.otlp_spans import export_request
from ebpf_apm.kafka import topics
from ebpf_apm.kafka.admin import ensure_topics
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.deadletter import DeadLetter
from ebpf_apm.schemas.avro_codec import AvroDecodeError, codec

log = logging.getLogger(__name__)

CLIENT_ID = "ebpf-apm-export"
PAUSED_POLL_S = 1.0  # while retrying: how often the paused consumer polls (group liveness)


class ExportRefusedError(ConsumerError):
    """The collector refuses this exporter (endpoint, credentials): exit status 1."""


@dataclass(frozen=True)
class ExportConfig:
    connection: KafkaConnection
    otlp: OtlpSettings
    group: str = "ebpf-apm-export"
    spans_topic: str = topics.SPANS
    deadletter_topic: str = topics.DEADLETTER
    max_batch_spans: int = 2048
    max_batch_delay_s: float = 1.0
    retry_initial_s: float = 0.5
    retry_max_s: float = 5.0
    session_timeout_ms: int = 10_000
    stats_interval_s: float = 10.0
    from_beginning: bool = True


@dataclass
class ExportCounts:
    """What the exporter did; logged in its stats line and read by the metrics endpoint."""

    read: int = 0  # apm.spans messages read
    exported: int = 0  # spans in requests the collector accepted
    requests: int = 0  # export requests sent, retries included
    retries: int = 0  # requests sent again after a retryable answer
    retried_spans: int = 0  # spans in those requests
    partial_rejected: int = 0  # spans of accepted requests the collector said it dropped
    rejected: int = 0  # spans dead-lettered after a non-retryable answer
    undecodable: int = 0  # messages dead-lettered as not span.avsc records

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ExportCollector(Collector):
    """The exporter's counts as Prometheus counters, read at scrape time."""

    def __init__(self, counts: ExportCounts) -> None:
        self.counts = counts

    def describe(self) -> Iterator[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        c = self.counts
        spans = CounterMetricFamily(
            "ebpf_apm_export_spans",
            "Spans by what became of them: exported (the collector accepted the request), "
            "partial_rejected (accepted requests' spans the collector said it dropped), "
            "rejected and undecodable (dead-lettered), retried (sent again)",
            labels=["outcome"],
        )
        for outcome, value in (
            ("exported", c.exported),
            ("partial_rejected", c.partial_rejected),
            ("rejected", c.rejected),
            ("undecodable", c.undecodable),
            ("retried", c.retried_spans),
        ):
            spans.add_metric([outcome], value)
        yield spans
        yield CounterMetricFamily(
            "ebpf_apm_export_requests",
            "OTLP export requests sent, retries included",
            value=c.requests,
        )


@dataclass
class Pending:
    record: InputRecord
    span: dict[str, Any] | None  # None: undecodable, dead-lettered with its batch
    reason: str = ""


class ExportService:
    def __init__(
        self,
        config: ExportConfig,
        client: OtlpClient,
        telemetry: ConsumerTelemetry | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.counts = ExportCounts()
        self.telemetry = telemetry or ConsumerTelemetry.unserved("export")
        self.telemetry.server.register(ExportCollector(self.counts))
        self.telemetry.server.require("collector", self._collector_ready)
        self.retrying_since: float | None = None  # monotonic; the collector is not accepting
        self.codec = codec("span.avsc")
        self.backoff = Backoff(config.retry_initial_s, config.retry_max_s)
        self.input = GroupInput(
            config.connection,
            group=config.group,
            topics=(config.spans_topic,),
            client_id=CLIENT_ID,
            on_revoked=self._on_revoked,
            session_timeout_ms=config.session_timeout_ms,
            from_beginning=config.from_beginning,
        )
        self.output = AckedOutput(
            config.connection, client_id=CLIENT_ID, deadletter_topic=config.deadletter_topic
        )
        self.pending: list[Pending] = []
        self.due = 0.0  # monotonic time by which the oldest pending span goes out
        self.in_flight = 0  # spans of the batch being sent
        self.next_stats = 0.0
        self.abandoned = False  # a batch was left unsettled at a stop: commit nothing after it

    # -- life cycle -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Export until `stop` is set; Kafka failures and a refusing collector are raised."""
        await self.start()
        try:
            await self.loop(stop)
            await self.last_attempt()
        finally:
            await self.close()

    async def start(self) -> None:
        config = self.config
        await ensure_topics(
            config.connection, {config.deadletter_topic: topics.DEADLETTER_PARTITIONS}
        )
        await self.output.start()
        try:
            await self.client.start()
            await self.input.start()
            self.telemetry.watch(self.input)
        except BaseException:
            await self.client.close()
            await self.output.stop(0)
            raise
        log.info(
            "exporting %s as OpenTelemetry traces, %s; group %s, batches of up to %d spans "
            "or %.3g s",
            config.spans_topic,
            config.otlp.describe(),
            config.group,
            config.max_batch_spans,
            config.max_batch_delay_s,
        )

    async def close(self) -> None:
        self.log_stats()
        await self.telemetry.stop()
        await self.input.stop()
        await self.client.close()
        await self.output.stop(5.0)

    async def _on_revoked(self, revoked: list[TopicPart]) -> None:
        # Whoever owns them next reads these from the committed offsets.
        gone = set(revoked)
        self.pending = [p for p in self.pending if (p.record.topic, p.record.partition) not in gone]

    # -- the loop -------------------------------------------------------------------------

    async def loop(self, stop: asyncio.Event) -> None:
        config = self.config
        self.next_stats = time.monotonic() + config.stats_interval_s
        while not stop.is_set():
            wait_s = 0.2 if not self.pending else min(0.2, self.due - time.monotonic())
            batches = await self.input.poll(
                max(0, int(wait_s * 1000)), max_records=config.max_batch_spans
            )
            self.take(batches)
            self.telemetry.turned()
            now = time.monotonic()
            while self.pending and (len(self.pending) >= config.max_batch_spans or now >= self.due):
                if not await self.export_batch(stop):
                    break
                now = time.monotonic()
            self.maybe_log_stats(now)

    def maybe_log_stats(self, now: float) -> None:
        if now >= self.next_stats:
            self.log_stats()
            self.next_stats = now + self.config.stats_interval_s

    def take(self, batches: dict[TopicPart, list[InputRecord]]) -> None:
        if not batches:
            return
        if not self.pending:
            self.due = time.monotonic() + self.config.max_batch_delay_s
        decode = self.codec.decode
        for (topic, _), records in batches.items():
            self.telemetry.read(topic, len(records))
            for record in records:
                try:
                    self.pending.append(Pending(record, decode(record.value or b"")))
                except AvroDecodeError as exc:
                    self.pending.append(Pending(record, None, f"span: {exc}"))
                self.counts.read += 1

    async def export_batch(self, stop: asyncio.Event) -> bool:
        """Send the oldest pending spans until the collector settles them (accepted or
        rejected); False when `stop` came first (nothing is committed then)."""
        size = self.config.max_batch_spans
        batch, self.pending = self.pending[:size], self.pending[size:]
        if not self.pending:
            self.due = time.monotonic() + self.config.max_batch_delay_s
        # else: the rest keeps the batch's due time (it arrived no earlier), so under load
        # full batches go out and a remainder waits to fill, at most --max-batch-delay.
        spans = [p.span for p in batch if p.span is not None]
        self.in_flight = len(batch)
        try:
            answer = await self._send_until_settled(spans, stop) if spans else Answer(ACCEPTED)
        finally:
            self.in_flight = 0
        if answer is None:
            self.abandoned = True
            self.pending[:0] = batch  # for the stop's count; never committed
            return False
        letters = [self._letter(p, p.reason) for p in batch if p.span is None]
        if answer.outcome == REJECTED:
            reason = (
                f"OTLP collector {self.config.otlp.describe()} rejected the batch: {answer.detail}"
            )
            letters += [self._letter(p, reason) for p in batch if p.span is not None]
            self.counts.rejected += len(spans)
            self.telemetry.dead_lettered(self.config.spans_topic, "rejected", len(spans))
            log.error(
                "%s; its %d spans go to %s (no retry: the same request would be refused again)",
                reason,
                len(spans),
                self.config.deadletter_topic,
            )
        if letters:
            await self.output.deliver_dead_letters(letters)
            undecodable = sum(p.span is None for p in batch)
            self.counts.undecodable += undecodable
            self.telemetry.dead_lettered(self.config.spans_topic, "undecodable", undecodable)
        await self.commit(batch)
        return True

    async def _send_until_settled(
        self, spans: Sequence[dict[str, Any]], stop: asyncio.Event
    ) -> Answer | None:
        body = export_request(spans).SerializeToString()
        attempt = 0
        try:
            while True:
                answer = await self.client.export(body)
                self.counts.requests += 1
                if answer.outcome == ACCEPTED:
                    self._accepted(answer, len(spans))
                    return answer
                if answer.outcome == REJECTED:
                    return answer
                if answer.outcome == REFUSED:
                    raise ExportRefusedError(
                        f"the OTLP collector ({self.config.otlp.describe()}) refuses this "
                        f"exporter: {answer.detail}; check --otlp-endpoint (the traces URL), "
                        "--protocol and the OTEL_EXPORTER_OTLP_HEADERS credentials (nothing "
                        "was committed: the spans are sent again at the next start)"
                    )
                delay = self.backoff.delay(attempt, answer.retry_after_s)
                if attempt == 0:
                    self.input.pause()
                    self.retrying_since = time.monotonic()
                if attempt == 0 or attempt % 10 == 9:
                    log.warning(
                        "OTLP collector %s: %s; %d spans wait, retry %d in %.1f s (input paused)",
                        self.config.otlp.url,
                        answer.detail,
                        len(spans),
                        attempt + 1,
                        delay,
                    )
                attempt += 1
                if not await self._wait_paused(delay, stop):
                    return None
                self.counts.retries += 1
                self.counts.retried_spans += len(spans)
        finally:
            self.retrying_since = None
            if attempt:
                self.input.resume()
                log.info("OTLP collector %s: back after %d retries", self.config.otlp.url, attempt)

    async def _wait_paused(self, seconds: float, stop: asyncio.Event) -> bool:
        """Wait with every partition paused, polling so the group keeps us; False on stop."""
        deadline = time.monotonic() + seconds
        while not stop.is_set():
            self.input.pause()  # partitions assigned by a rebalance meanwhile, too
            self.take(await self.input.poll(0, max_records=self.config.max_batch_spans))
            self.telemetry.turned()  # waiting on the collector is alive, not stuck
            now = time.monotonic()
            self.maybe_log_stats(now)  # the stats go on while the collector is away
            remaining = deadline - now
            if remaining <= 0:
                return True
            await sleep_or_stop(min(remaining, PAUSED_POLL_S), stop)
        return False

    def _accepted(self, answer: Answer, spans: int) -> None:
        self.counts.exported += spans
        if answer.rejected_spans or answer.detail:
            self.counts.partial_rejected += answer.rejected_spans
            log.warning(
                "OTLP collector %s accepted a batch of %d spans but dropped %d of them: %s",
                self.config.otlp.url,
                spans,
                answer.rejected_spans,
                answer.detail or "(no message)",
            )

    def _collector_ready(self) -> str | None:
        if self.retrying_since is None:
            return None
        waited = time.monotonic() - self.retrying_since
        return f"collector: not accepting spans for {waited:.0f} s ({self.config.otlp.url})"

    def _letter(self, pending: Pending, reason: str) -> DeadLetter:
        r = pending.record
        return DeadLetter.of(r.topic, r.partition, r.offset, r.key, r.value, reason)

    async def commit(self, batch: Sequence[Pending]) -> None:
        """Commit past the batch's records, on the partitions still assigned to us."""
        assigned = self.input.assignment()
        offsets: dict[TopicPart, int] = {}
        for p in batch:
            tp = (p.record.topic, p.record.partition)
            if tp in assigned:
                offsets[tp] = max(offsets.get(tp, 0), p.record.offset + 1)
        await self.input.commit(offsets)

    async def last_attempt(self) -> None:
        """At a stop: one attempt for what is pending; what fails is read again at the next
        start (it was not committed)."""
        while self.pending and not self.abandoned:
            size = self.config.max_batch_spans
            batch = self.pending[:size]
            spans = [p.span for p in batch if p.span is not None]
            if any(p.span is None for p in batch):
                break  # dead letters wait for the next start, with their neighbours
            answer = await self.client.export(export_request(spans).SerializeToString())
            self.counts.requests += 1
            if answer.outcome != ACCEPTED:
                break
            self._accepted(answer, len(spans))
            del self.pending[:size]
            await self.commit(batch)
        if self.pending:
            log.warning(
                "stopping with %d spans not exported: they are sent at the next start",
                len(self.pending),
            )

    def log_stats(self) -> None:
        c = self.counts
        log.info(
            "spans read %d, exported %d (requests %d, retries %d), dropped by the collector "
            "%d, dead-lettered: rejected %d, undecodable %d; in flight %d, pending %d",
            c.read,
            c.exported,
            c.requests,
            c.retries,
            c.partial_rejected,
            c.rejected,
            c.undecodable,
            self.in_flight,
            len(self.pending),
        )
