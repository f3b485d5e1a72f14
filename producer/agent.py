"""The node agent, assembled in one place from its configuration.

    targets (--pid/--exe, or rules as processes start) -> AgentProbes (compiled by BCC in a
    helper process, handed over as fds; uprobes, sock tracepoints) -> RecordStreams: rings
    -> batchers -> publishers -> AgentPipeline (drain loop) ; pod names from the Kubernetes
    API when in a cluster ; MetricsServer (/metrics from AgentCollector, /healthz from the
    drain loop, /readyz: probes loaded, loop turning, broker answering)

`serve` builds every part with what it needs, in order, and runs the pipeline until asked
to stop. Nothing is patched after construction.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.reachability import broker_unreachable
from ebpf_apm.producer.agent_metrics import AgentCollector
from ebpf_apm.producer.binary_guard import BinaryLimits
from ebpf_apm.producer.bpf_loader import (
    AgentProbes,
    ProbeOptions,
    require_privileges,
    start_compiling,
)
from ebpf_apm.producer.errors import AgentError, TargetError
from ebpf_apm.producer.heap_trim import release_free_memory
from ebpf_apm.producer.kafka_publisher import KafkaPublisher, PublisherConfig
from ebpf_apm.producer.map_layout import SITE_FLAG_SPAWN
from ebpf_apm.producer.path_redaction import PathRedactor
from ebpf_apm.producer.pipeline import (
    AgentPipeline,
    PipelineSettings,
    RecordStream,
    boot_to_epoch_offset_ns,
)
from ebpf_apm.producer.probe_cost import ProbeCostCollector, ProbeCostMeter
from ebpf_apm.producer.rule_targets import (
    KubernetesSettings,
    RuleTargets,
    label_static_targets,
    start_pod_metadata,
)
from ebpf_apm.producer.span_batcher import NetBatcher, ProcessInfo, SpanBatcher
from ebpf_apm.producer.target_rules import TargetRulesFile
from ebpf_apm.producer.targets import (
    FunctionNames,
    TargetProcess,
    pids_of_executable,
    resolve_target,
)
from ebpf_apm.producer.trap_calibration import calibrate_trap_cost
from ebpf_apm.telemetry import MetricsServer

log = logging.getLogger(__name__)

COMPRESSIONS = ("none", "gzip", "lz4", "zstd")
NET_HOOK_NAMES = {
    "kprobes": "kprobes on tcp_sendmsg/tcp_recvmsg",
    "tracepoints": "tracepoints sock:sock_send_length/sock_recv_length",
    "off": "off",
}


@dataclass(frozen=True)
class AgentConfig:
    pids: tuple[int, ...]
    exes: tuple[str, ...]
    funcs: tuple[str, ...]
    http: bool
    connection: KafkaConnection
    node_name: str
    span_topic: str
    net_topic: str
    net_hooks: str
    partitions: int
    compression: str
    idempotent: bool
    event_transport: str
    max_batch_events: int
    max_batch_delay_ms: int
    max_call_seconds: float
    buffer_mib: int
    config: str | None
    kubernetes: KubernetesSettings | None
    health_file: str | None
    path_redactor: PathRedactor
    metrics_address: str | None = None
    binary_limits: BinaryLimits = BinaryLimits()
    bpf_loader: str = "helper"  # bpf_loader.LOADERS


async def serve(config: AgentConfig, stop: asyncio.Event) -> int:
    """Trace until `stop` is set (or, without rules, every target has exited)."""
    require_privileges()  # before any target is touched
    # Bound first: the address is checked before the probes compile. The compile blocks
    # the loop for seconds; the Kubernetes start-up probe (--health-file) covers it.
    async with MetricsServer("agent", config.metrics_address) as server:
        server.probe("kafka", lambda: broker_unreachable(config.connection, server.probe_timeout_s))
        return await _trace(config, stop, server)


async def _trace(config: AgentConfig, stop: asyncio.Event, server: MetricsServer) -> int:
    names = FunctionNames()
    rules_file = TargetRulesFile(Path(config.config)) if config.config else None
    rules = rules_file.load() if rules_file else None
    options = ProbeOptions(
        use_perf_buffer=config.event_transport == "perf",
        net_hooks=config.net_hooks,
        loader=config.bpf_loader,
    )
    # The helper compiles on the other core while this process reads the target binaries.
    compiling = start_compiling(options)
    try:
        targets = _static_targets(config, names)
    except BaseException:
        if compiling is not None:
            compiling.cancel()
        raise
    release_free_memory()  # the target binaries' parse is done: its heap goes back
    probes = AgentProbes(options, compiling)
    collector: AgentCollector | None = None
    try:
        # What the probes cost each process: hits x run time + trap cost measured here.
        # The metrics server exports it per process (ProbeCostCollector).
        cost_meter = ProbeCostMeter(probes, _trap_cost_ns(probes))
        process_info: dict[int, ProcessInfo] = {}
        streams = _record_streams(config, probes, names, process_info)
        pipeline = AgentPipeline(
            probes,
            streams,
            process_info,
            config.connection,
            PipelineSettings(
                partitions=config.partitions,
                max_call_s=config.max_call_seconds,
                exit_when_targets_gone=rules is None,
                health_file=config.health_file,
            ),
            cost_meter,
            on_turn=server.turned,
        )
        collector = AgentCollector(pipeline)
        server.register(collector)
        server.register(ProbeCostCollector(cost_meter, process_info))
        server.require(
            "probes", lambda: None if pipeline.running else "probes: not loaded or drain stopped"
        )
        for target in targets:
            pipeline.attach(target)
            _log_attached(target)
        log.info("network events: %s", NET_HOOK_NAMES[probes.options.net_hooks])
        log.info("URL paths: query strings cut, segments redacted: %s",
                 config.path_redactor.describe())  # fmt: skip
        metadata = None
        if config.kubernetes is not None:
            metadata = await start_pod_metadata(config.kubernetes)
            await label_static_targets(pipeline, metadata)
        selected = None
        if rules_file is not None and rules is not None:
            selected = RuleTargets(
                pipeline, rules_file, rules, names, config.http, metadata, config.binary_limits
            )
            await selected.start()
        # Logged once every process the agent will ever trace is covered: static targets
        # attached, and (with rules) exec/exit already watched.
        log.info(
            "tracing %d process(es)%s; publishing to %s on %s",
            len(targets),
            f" and those the rules in {config.config} select" if config.config else "",
            ", ".join(stream.topic for stream in streams),
            config.connection,
        )
        try:
            return await pipeline.run(stop)
        finally:
            if selected is not None:
                await selected.stop()
            if metadata is not None:
                await metadata.stop()
            pipeline.close()
    finally:
        if collector is not None:  # a scrape must not read the BPF maps once they are gone
            server.registry.unregister(collector)
        probes.close()


def _trap_cost_ns(probes: AgentProbes) -> float | None:
    """The uprobe trap cost on this node, calibrated now (None if that failed: the probe
    CPU estimate then holds the BPF run time only)."""
    try:
        cost = calibrate_trap_cost(probes)
    except AgentError as exc:
        log.warning("uprobe trap cost not measured: %s; the probe CPU estimate leaves it out", exc)
        return None
    log.info("uprobe trap cost on this node: %s", cost.describe())
    return cost.ns_per_hit


def _static_targets(config: AgentConfig, names: FunctionNames) -> list[TargetProcess]:
    pids = list(config.pids)
    for exe in config.exes:
        found = pids_of_executable(exe)
        if not found:
            raise TargetError(f"--exe {exe}: no running process of that executable")
        pids.extend(p for p in found if p not in pids)
    return [
        resolve_target(pid, list(config.funcs), names, config.http, config.binary_limits)
        for pid in pids
    ]


def _record_streams(
    config: AgentConfig,
    probes: AgentProbes,
    names: FunctionNames,
    process_info: dict[int, ProcessInfo],
) -> list[RecordStream]:
    """Spans (function and HTTP rings) -> span topic; socket I/O (net ring) -> net topic."""
    offset = boot_to_epoch_offset_ns()
    limits = {
        "max_events": config.max_batch_events,
        "max_delay_ns": config.max_batch_delay_ms * 1_000_000,
    }
    streams = [
        RecordStream(
            "spans",
            (probes.span_reader, probes.http_reader, probes.client_reader),
            SpanBatcher(
                config.node_name,
                names.names,
                process_info,
                offset,
                **limits,
                redactor=config.path_redactor,
            ),
            _publisher(config, config.span_topic),
        )
    ]
    if probes.net_reader is not None:
        streams.append(
            RecordStream(
                "net",
                (probes.net_reader,),
                NetBatcher(config.node_name, process_info, offset, **limits),
                _publisher(config, config.net_topic),
            )
        )
    return streams


def _publisher(config: AgentConfig, topic: str) -> KafkaPublisher:
    return KafkaPublisher(
        PublisherConfig(
            connection=config.connection,
            topic=topic,
            compression=config.compression,
            idempotent=config.idempotent,
            buffer_max_bytes=config.buffer_mib << 20,
            client_id=f"ebpf-apm-agent-{config.node_name}",
        )
    )


def _log_attached(target: TargetProcess) -> None:
    for fn in target.functions:
        kind = " [HTTP span end: response flushed]" if fn.http_finish else ""
        kind = kind or (" [HTTP]" if fn.http else "")
        if fn.server_flags & SITE_FLAG_SPAWN:
            ends = "returns only" if fn.returns_only else "entry and returns"
            kind = f" [goroutine creation: trace context to new goroutines; {ends}]"
        log.info(
            "pid %d (%s%s): probing %s at %#x, %d return site(s)%s",
            target.pid,
            target.exe_name,
            f", {target.go_version}" if target.go_version else "",
            fn.plan.symbol.name,
            fn.plan.symbol.address,
            len(fn.plan.return_offsets),
            kind,
        )
