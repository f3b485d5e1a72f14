"""What the agent shows Prometheus, read from the pipeline's own counters at each scrape.

    ebpf_apm_agent_events_total{stream="spans"|"net", outcome}
        read         records drained from the stream's rings
        lost_kernel  records the kernel could not write (ring full; for spans also calls
                     left untimed because the in-flight table was full)
        acked        events Kafka acknowledged
        dropped      events the publisher dropped (buffer full while the broker was away)
        failed       events Kafka refused for good
    ebpf_apm_agent_kernel_events_total{counter}   the BPF programs' raw counters
    ebpf_apm_agent_traced_processes               processes with probes attached
    ebpf_apm_agent_attached_uprobes               uprobe descriptors attached (a leak shows here)
    ebpf_apm_agent_publisher_buffered_bytes{stream}  bytes waiting for acknowledgement
    ebpf_apm_agent_publisher_connected{stream}    1 while the publisher reaches Kafka

Nothing is counted twice on the hot path: the drain loop keeps these counts anyway (they
make its stats line), the collector only reads them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ebpf_apm.producer.pipeline import AgentPipeline

# Kernel counters that mean "a record of this stream was lost before user space saw it".
LOST_IN_KERNEL = {"spans": ("ring_full", "table_full"), "net": ("net_ring_full",)}


class AgentCollector(Collector):
    def __init__(self, pipeline: AgentPipeline) -> None:
        self._pipeline = pipeline

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        pipeline = self._pipeline
        kernel = pipeline.probes.counters()
        events = CounterMetricFamily(
            "ebpf_apm_agent_events",
            "Events of each stream by what happened to them (read from the rings, lost in "
            "the kernel, acked by Kafka, dropped or failed in the publisher)",
            labels=["stream", "outcome"],
        )
        buffered = GaugeMetricFamily(
            "ebpf_apm_agent_publisher_buffered_bytes",
            "Bytes handed to the publisher and not yet acknowledged by Kafka",
            labels=["stream"],
        )
        connected = GaugeMetricFamily(
            "ebpf_apm_agent_publisher_connected",
            "1 while the stream's publisher reaches Kafka",
            labels=["stream"],
        )
        for stream in pipeline.streams:
            stats = stream.publisher.stats
            lost = sum(kernel[name] for name in LOST_IN_KERNEL.get(stream.name, ()))
            for outcome, value in (
                ("read", stream.records_read),
                ("lost_kernel", lost),
                ("acked", stats.acked_events),
                ("dropped", stats.dropped_events),
                ("failed", stats.failed_events),
            ):
                events.add_metric([stream.name, outcome], value)
            buffered.add_metric([stream.name], stats.buffered_bytes)
            connected.add_metric([stream.name], 1 if stats.connected else 0)
        yield events
        raw = CounterMetricFamily(
            "ebpf_apm_agent_kernel_events",
            "The BPF programs' own counters (emitted, ring_full, table_full, "
            "return_without_entry, read_failed, net_emitted, net_ring_full)",
            labels=["counter"],
        )
        for name, value in sorted(kernel.items()):
            raw.add_metric([name], value)
        yield raw
        yield buffered
        yield connected
        yield GaugeMetricFamily(
            "ebpf_apm_agent_traced_processes",
            "Processes the agent has probes attached to",
            value=len(pipeline.targets),
        )
        yield GaugeMetricFamily(
            "ebpf_apm_agent_attached_uprobes",
            "Uprobe descriptors attached, all processes: uprobe_multi links (one per "
            "function and kind) or, before Linux 6.6, perf events (one per probe)",
            value=pipeline.probes.attached_uprobes,
        )
