"""The join's own gauges and counters, read from its state at each scrape.

    ebpf_apm_join_events_total{kind}   spans_in, net_in, spans_emitted, spans_late,
                                       spans_truncated, net_late, net_unmatched
    ebpf_apm_join_waiting_spans        spans held until the watermark passes their end
    ebpf_apm_join_retained_net_events  network events kept for spans still to come

Nothing is counted twice: the collector reads the counters the service keeps anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ebpf_apm.consumers.join_service import JoinService


class JoinCollector(Collector):
    def __init__(self, service: JoinService) -> None:
        self._service = service

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        service = self._service
        live = service.live_partitions()
        counters = service.totals.counters(live)
        events = CounterMetricFamily(
            "ebpf_apm_join_events",
            "Spans and network events through the join, by what happened to them",
            labels=["kind"],
        )
        unmatched = service.totals.unmatched + sum(p.joiner.unmatched_events for p in live)
        for kind, value in (
            ("spans_in", counters.spans_in),
            ("net_in", counters.net_in),
            ("spans_emitted", counters.spans_emitted),
            ("spans_late", counters.spans_late),
            ("spans_truncated", counters.spans_truncated),
            ("net_late", counters.net_late),
            ("net_unmatched", unmatched),
        ):
            events.add_metric([kind], value)
        yield events
        yield GaugeMetricFamily(
            "ebpf_apm_join_waiting_spans",
            "Spans held until the watermark passes their end",
            value=sum(p.joiner.waiting_spans for p in live),
        )
        yield GaugeMetricFamily(
            "ebpf_apm_join_retained_net_events",
            "Network events kept for spans that may still contain them",
            value=sum(p.joiner.retained_events for p in live),
        )
