"""`ebpf-apm alert`'s stages, wired in one place (flags: alert_command.py).

    apm.latency (GroupInput; Avro) -> AlertEngine (alert_rules: buffers windows, evaluates
      them in order) -> transitions -> apm.alerts (Avro, key rule/series, acknowledged)
      -> commit offsets
    undecodable windows -> apm.deadletter (acknowledged) before their offsets are committed

The aggregator closes all series of a window together, but they sit on different partitions
of apm.latency; an error-rate rule needs them all. So a window is evaluated once windows two
lengths newer have arrived, or once the input has been quiet for --settle (the usual case
live: windows close every --window). Offsets are committed when nothing is pending.

Rule state (streaks, which alerts fire) lives in memory: after a restart a rule needs its
`for` windows again, and an alert that was firing fires again if the condition still holds.

Outages: publishing transitions and dead letters is retried with backoff until Kafka takes
them (one log line when the wait starts, one when it ends); nothing is committed meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from ebpf_apm.consumers.alert_rules import AlertEngine, Rule, Transition
from ebpf_apm.consumers.consumer_telemetry import ConsumerTelemetry
from ebpf_apm.consumers.kafka_io import AckedOutput, GroupInput, InputRecord, TopicPart
from ebpf_apm.consumers.latency_input import read_latency_window
from ebpf_apm.kafka import topics
from ebpf_apm.kafka.admin import ensure_topics
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.deadletter import DeadLetter
from ebpf_apm.schemas.avro_codec import codec
from ebpf_apm.schemas.input_limits import InputRejected, TimeBounds

log = logging.getLogger(__name__)

CLIENT_ID = "ebpf-apm-alert"


@dataclass(frozen=True)
class AlertConfig:
    connection: KafkaConnection
    rules: list[Rule]
    rules_path: str
    group: str = "ebpf-apm-alert"
    latency_topic: str = topics.LATENCY
    alerts_topic: str = topics.ALERTS
    deadletter_topic: str = topics.DEADLETTER
    settle_ns: int = 1_000_000_000
    from_beginning: bool = False
    time_bounds: TimeBounds = field(default_factory=TimeBounds)


class AlertService:
    def __init__(self, config: AlertConfig, telemetry: ConsumerTelemetry | None = None) -> None:
        self.config = config
        self.telemetry = telemetry or ConsumerTelemetry.unserved("alert")
        self._alerts = Counter(
            "ebpf_apm_alerts",
            "Alert transitions published to the alerts topic, by state (firing, resolved)",
            ["state"],
            registry=self.telemetry.server.registry,
        )
        for state in ("firing", "resolved"):  # both series exist from the start, at 0
            self._alerts.labels(state)
        self.engine = AlertEngine(config.rules)
        self.latency_codec = codec("latency.avsc")
        self.alert_codec = codec("alert.avsc")
        self.input = GroupInput(
            config.connection,
            group=config.group,
            topics=(config.latency_topic,),
            client_id=CLIENT_ID,
            from_beginning=config.from_beginning,
        )
        self.output = AckedOutput(
            config.connection, client_id=CLIENT_ID, deadletter_topic=config.deadletter_topic
        )
        self.next_offsets: dict[TopicPart, int] = {}
        self.transitions = 0
        self.deadlettered = 0
        self._stop = asyncio.Event()  # run()'s: retries give up when it is set

    async def run(self, stop: asyncio.Event) -> None:
        """Evaluate until `stop` is set; waits out Kafka outages."""
        self._stop = stop
        await self.start()
        try:
            await self.loop(stop)
        finally:
            await self.telemetry.stop()
            await self.input.stop()
            await self.output.stop(5.0)

    async def start(self) -> None:
        config = self.config
        await ensure_topics(
            config.connection,
            {
                config.alerts_topic: topics.ALERT_PARTITIONS,
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
            "evaluating %d rules from %s on %s, publishing to %s",
            len(config.rules),
            config.rules_path,
            config.latency_topic,
            config.alerts_topic,
        )

    async def loop(self, stop: asyncio.Event) -> None:
        last_input = time.monotonic_ns()
        newest_start: int | None = None
        window_ns = 0
        while not stop.is_set():
            batches = await self.input.poll(200)
            self.telemetry.turned()
            rejected: list[DeadLetter] = []
            for records in batches.values():
                self.telemetry.read(self.config.latency_topic, len(records))
                for record in records:
                    window = self._decode(record, rejected)
                    if window is None:
                        continue
                    try:
                        self.engine.add(window)
                    except Exception as exc:  # one bad window must not stop the service
                        why = f"alert engine failed: {type(exc).__name__}: {exc}"
                        rejected.append(self._letter(record, why))
                        continue
                    start = int(window["window_start_ns"])
                    window_ns = int(window["window_end_ns"]) - start
                    newest_start = start if newest_start is None else max(newest_start, start)
                if records:
                    last = records[-1]
                    self.next_offsets[(last.topic, last.partition)] = last.offset + 1
            if rejected:
                await self._dead_letter(rejected)
            now = time.monotonic_ns()
            if batches:
                last_input = now
                if newest_start is not None:
                    await self.publish(self.engine.evaluate(newest_start - 2 * window_ns + 1))
            elif self.engine.pending_windows and now - last_input >= self.config.settle_ns:
                await self.publish(self.engine.evaluate())
            ready = self.next_offsets and not self.engine.pending_windows
            if ready and await self.input.commit(self.next_offsets):
                self.next_offsets = {}

    async def _dead_letter(self, letters: list[DeadLetter]) -> None:
        await self.output.outage.retry(
            f"dead-lettering {len(letters)} window(s)",
            lambda: self.output.deliver_dead_letters(letters),
            self._stop,
        )
        self.deadlettered += len(letters)
        self.telemetry.dead_lettered(self.config.latency_topic, "undecodable", len(letters))

    def _decode(self, record: InputRecord, rejected: list[DeadLetter]) -> dict[str, Any] | None:
        try:
            return read_latency_window(record.value, time.time_ns(), self.config.time_bounds)
        except InputRejected as exc:
            rejected.append(self._letter(record, f"latency window: {exc}"))
            return None

    @staticmethod
    def _letter(record: InputRecord, why: str) -> DeadLetter:
        return DeadLetter.of(
            record.topic, record.partition, record.offset, record.key, record.value, why
        )

    async def publish(self, transitions: list[Transition]) -> None:
        if not transitions:
            return
        messages = [(t.key.encode(), self.alert_codec.encode(t.as_record())) for t in transitions]
        await self.output.outage.retry(
            f"publishing {len(messages)} alert transition(s)",
            lambda: self.output.deliver(self.config.alerts_topic, messages),
            self._stop,
        )
        self.transitions += len(transitions)
        self.telemetry.acked(self.config.alerts_topic, len(transitions))
        for t in transitions:
            self._alerts.labels(t.state).inc()
            log.info("%s", t.message())
