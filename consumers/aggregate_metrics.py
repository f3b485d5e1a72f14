"""What the aggregator shows Prometheus: its throughput and every series' latest window.

    emit(rows) -> LatestWindows (newest closed window per series) -> scrape:
      ebpf_apm_latency_window_seconds{workload, operation, status_class, quantile="0.5|0.9|0.99"}
      ebpf_apm_latency_window_spans{workload, operation, status_class}
      ebpf_apm_latency_window_sum_seconds{workload, operation, status_class}
      ebpf_apm_latency_window_end_timestamp_seconds{workload, operation, status_class}
    ebpf_apm_windows_written_total           series windows stored (one per series and window)
    ebpf_apm_aggregate_spans_total{outcome}  aggregated | late | future (left out)
    ebpf_apm_aggregate_series                series known; ebpf_apm_aggregate_series_refused
                                             series the cap sent to {overflow}

So a Prometheus server can graph and alert on latency without reading storage. The series
are bounded by the aggregator's series cap (--max-series-per-workload); a series whose
latest window is more than STALE_WINDOWS windows older than the newest one written is
dropped, so a route that stopped being called does not show its last latency forever.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ebpf_apm.consumers.latency_store import LatencyRow
from ebpf_apm.consumers.window_aggregator import AggregatorStats
from ebpf_apm.telemetry import MetricsServer

STALE_WINDOWS = 6
SERIES_LABELS = ["workload", "operation", "status_class"]
NS = 1e9


class LatestWindows(Collector):
    """The newest closed window of each series, as gauges."""

    def __init__(self, window_ns: int) -> None:
        self.window_ns = window_ns
        self._latest: dict[str, LatencyRow] = {}
        self._newest_end_ns = 0

    def update(self, rows: Sequence[LatencyRow]) -> None:
        for row in rows:
            held = self._latest.get(row.series)
            if held is None or held.window_end_ns <= row.window_end_ns:
                self._latest[row.series] = row
            self._newest_end_ns = max(self._newest_end_ns, row.window_end_ns)
        oldest = self._newest_end_ns - STALE_WINDOWS * self.window_ns
        for series in [s for s, r in self._latest.items() if r.window_end_ns < oldest]:
            del self._latest[series]

    def __len__(self) -> int:
        return len(self._latest)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        quantiles = GaugeMetricFamily(
            "ebpf_apm_latency_window_seconds",
            "Latency quantiles of each series' latest closed window",
            labels=[*SERIES_LABELS, "quantile"],
        )
        spans = GaugeMetricFamily(
            "ebpf_apm_latency_window_spans",
            "Spans in each series' latest closed window",
            labels=SERIES_LABELS,
        )
        total = GaugeMetricFamily(
            "ebpf_apm_latency_window_sum_seconds",
            "Summed duration of the spans in each series' latest closed window",
            labels=SERIES_LABELS,
        )
        end = GaugeMetricFamily(
            "ebpf_apm_latency_window_end_timestamp_seconds",
            "End of each series' latest closed window (Unix time)",
            labels=SERIES_LABELS,
        )
        for row in self._latest.values():
            labels = [row.workload, row.operation, row.status_class or ""]
            for quantile, value in (("0.5", row.p50), ("0.9", row.p90), ("0.99", row.p99)):
                quantiles.add_metric([*labels, quantile], value / NS)
            spans.add_metric(labels, row.count)
            total.add_metric(labels, row.sum / NS)
            end.add_metric(labels, row.window_end_ns / NS)
        yield from (quantiles, spans, total, end)


@dataclass(frozen=True)
class SeriesFigures:
    known: int
    refused: int


class _AggregatorCollector(Collector):
    def __init__(
        self, stats: Callable[[], AggregatorStats], series: Callable[[], SeriesFigures]
    ) -> None:
        self._stats = stats
        self._series = series

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._stats()
        spans = CounterMetricFamily(
            "ebpf_apm_aggregate_spans",
            "Spans the aggregator took into a window (aggregated) or left out (late: their "
            "window had closed; future: from a clock too far ahead)",
            labels=["outcome"],
        )
        for outcome, value in (
            ("aggregated", stats.spans),
            ("late", stats.late),
            ("future", stats.future),
        ):
            spans.add_metric([outcome], value)
        yield spans
        series = self._series()
        yield GaugeMetricFamily(
            "ebpf_apm_aggregate_series", "Series the aggregator knows", value=series.known
        )
        yield GaugeMetricFamily(
            "ebpf_apm_aggregate_series_refused",
            "Distinct series the per-workload cap sent to the {overflow} series",
            value=series.refused,
        )


class AggregateMetrics:
    """The aggregator's metrics in `server`'s registry."""

    def __init__(
        self,
        server: MetricsServer,
        window_ns: int,
        stats: Callable[[], AggregatorStats],
        series: Callable[[], SeriesFigures],
    ) -> None:
        self.latest = LatestWindows(window_ns)
        self._written = Counter(
            "ebpf_apm_windows_written",
            "Series windows written to storage (one per series and closed window)",
            registry=server.registry,
        )
        server.register(self.latest)
        server.register(_AggregatorCollector(stats, series))

    def written(self, rows: Sequence[LatencyRow]) -> None:
        self._written.inc(len(rows))
        self.latest.update(rows)
