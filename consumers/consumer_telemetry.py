"""What every consumer service reports: records, lag, dead letters, readiness.

    ConsumerTelemetry(service, server, connection)   (one per service, from its command)
      .watch(group_input)      lag per partition, sampled every second; readiness from it
      .read(topic, n)          input records taken in          -> records_total{outcome=read}
      .acked(topic, n)         output records Kafka acknowledged -> records_total{outcome=acked}
      .dead_lettered(topic, reason, n)  -> records_total{outcome=deadlettered} and
                                           deadletters_total{service,reason}
      .turned()                the service's loop went round (liveness)

Metrics (the contract, README "Operating it"):
    ebpf_apm_consumer_records_total{service, topic, outcome}
    ebpf_apm_consumer_lag_records{service, topic, partition}
    ebpf_apm_consumer_assigned_partitions{service}
    ebpf_apm_deadletters_total{service, reason}
A command wires it with `add_telemetry_arguments(parser)`, `telemetry_settings_from_args`
and `async with served_telemetry(service, settings, connection) as telemetry:`.
Readiness: the broker answers (ApiVersions probe), partitions are assigned, and every
assigned partition is within `ready_max_lag` records of its high watermark. A service
without telemetry configured gets one with no server (`ConsumerTelemetry.unserved`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ebpf_apm.consumers.errors import ConsumerConfigError
from ebpf_apm.consumers.kafka_io import GroupInput, TopicPart
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.reachability import broker_unreachable
from ebpf_apm.telemetry import MetricsServer, add_metrics_arguments, metrics_address_from_args

log = logging.getLogger(__name__)

DEFAULT_READY_MAX_LAG = 100_000
LAG_SAMPLE_INTERVAL_S = 1.0


class ConsumerTelemetry:
    def __init__(
        self,
        service: str,
        server: MetricsServer,
        connection: KafkaConnection | None,
        *,
        ready_max_lag: int = DEFAULT_READY_MAX_LAG,
    ) -> None:
        self.service = service
        self.server = server
        self.ready_max_lag = ready_max_lag
        self._input: GroupInput | None = None
        self._lag: dict[TopicPart, int | None] = {}
        self._sampling: asyncio.Task[None] | None = None
        self._records = Counter(
            "ebpf_apm_consumer_records",
            "Records a consumer service read (read), had acknowledged by Kafka (acked) or sent "
            "to the dead-letter topic (deadlettered), per topic",
            ["service", "topic", "outcome"],
            registry=server.registry,
        )
        self._dead_letters = Counter(
            "ebpf_apm_deadletters",
            "Input messages sent to the dead-letter topic, by reason",
            ["service", "reason"],
            registry=server.registry,
        )
        server.register(_LagCollector(self))
        if connection is not None:
            server.probe("kafka", lambda: broker_unreachable(connection, server.probe_timeout_s))
        server.require("partitions", self._partitions_ready)

    @classmethod
    def unserved(cls, service: str) -> ConsumerTelemetry:
        """Counts kept, nothing served, no probes: services built without a command."""
        return cls(service, MetricsServer(service, None), None)

    # -- what the service tells it -----------------------------------------------------------

    def read(self, topic: str, count: int = 1) -> None:
        if count:
            self._records.labels(self.service, topic, "read").inc(count)

    def acked(self, topic: str, count: int = 1) -> None:
        if count:
            self._records.labels(self.service, topic, "acked").inc(count)

    def dead_lettered(self, topic: str, reason: str, count: int = 1) -> None:
        """`reason` is a short fixed name (a label), not the message's text."""
        if count:
            self._records.labels(self.service, topic, "deadlettered").inc(count)
            self._dead_letters.labels(self.service, reason).inc(count)

    def turned(self) -> None:
        self.server.turned()

    def watch(self, group_input: GroupInput) -> None:
        """Sample this input's lag from now on (call after it started)."""
        self._input = group_input
        if self._sampling is None:
            self._sampling = asyncio.create_task(self._sample_forever())

    async def stop(self) -> None:
        if self._sampling is not None:
            self._sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampling
            self._sampling = None

    # -- readiness and lag -------------------------------------------------------------------

    def _partitions_ready(self) -> str | None:
        if self._input is None:
            return "input: not connected yet"
        if not self._input.assignment():
            return f"input: no partitions of {', '.join(self._input.topics)} assigned yet"
        unknown = sorted(tp for tp, lag in self._lag.items() if lag is None)
        if unknown or not self._lag:
            return "input: waiting for the first fetch of " + (
                ", ".join(f"{t}/{p}" for t, p in unknown) or "the assigned partitions"
            )
        behind = {tp: lag for tp, lag in self._lag.items() if lag and lag > self.ready_max_lag}
        if behind:
            worst = max(behind, key=lambda tp: behind[tp] or 0)
            return (
                f"input: {len(behind)} partition(s) more than {self.ready_max_lag} records "
                f"behind (worst {worst[0]}/{worst[1]}: {behind[worst]})"
            )
        return None

    def lags(self) -> dict[TopicPart, int | None]:
        return dict(self._lag)

    async def _sample_forever(self) -> None:
        while True:
            if self._input is not None:
                # The broker away: its probe says so; the last sample stays.
                with contextlib.suppress(TimeoutError):
                    self._lag = await asyncio.wait_for(self._input.lag(), 2.0)
            await asyncio.sleep(LAG_SAMPLE_INTERVAL_S)


class _LagCollector(Collector):
    def __init__(self, telemetry: ConsumerTelemetry) -> None:
        self._telemetry = telemetry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        t = self._telemetry
        lag = GaugeMetricFamily(
            "ebpf_apm_consumer_lag_records",
            "Records between the consumer's position and the partition's high watermark "
            "(sampled every second)",
            labels=["service", "topic", "partition"],
        )
        lags = t.lags()
        for (topic, partition), records in sorted(lags.items()):
            if records is not None:
                lag.add_metric([t.service, topic, str(partition)], records)
        yield lag
        assigned = GaugeMetricFamily(
            "ebpf_apm_consumer_assigned_partitions",
            "Partitions of its input topics the consumer holds",
            labels=["service"],
        )
        assigned.add_metric([t.service], len(lags))
        yield assigned


@dataclass(frozen=True)
class TelemetrySettings:
    address: str | None  # None: nothing served
    ready_max_lag: int = DEFAULT_READY_MAX_LAG


def add_telemetry_arguments(parser: argparse.ArgumentParser) -> None:
    """--metrics-address and --ready-max-lag, the same for every consumer command."""
    add_metrics_arguments(parser)
    parser.add_argument(
        "--ready-max-lag",
        type=int,
        default=DEFAULT_READY_MAX_LAG,
        metavar="N",
        help="/readyz answers not ready while a partition is more than N records behind "
        f"(default: {DEFAULT_READY_MAX_LAG})",
    )


def telemetry_settings_from_args(args: argparse.Namespace) -> TelemetrySettings:
    if args.ready_max_lag < 0:
        raise ConsumerConfigError(f"--ready-max-lag {args.ready_max_lag}: must be at least 0")
    return TelemetrySettings(metrics_address_from_args(args), args.ready_max_lag)


@contextlib.asynccontextmanager
async def served_telemetry(
    service: str, settings: TelemetrySettings, connection: KafkaConnection
) -> AsyncIterator[ConsumerTelemetry]:
    """The service's telemetry, served (when an address is set) for as long as it runs."""
    async with MetricsServer(service, settings.address) as server:
        telemetry = ConsumerTelemetry(
            service, server, connection, ready_max_lag=settings.ready_max_lag
        )
        try:
            yield telemetry
        finally:
            await telemetry.stop()
