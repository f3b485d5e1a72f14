"""`ebpf-apm agent`: flags and environment -> one validated configuration -> the pipeline."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producer.bpf_loader import NET_HOOKS, AgentProbes, ProbeOptions, require_privileges
from producer.discovered_targets import KubernetesSettings, serve_agent
from producer.errors import AgentError, TargetError
from producer.kafka_publisher import (
    KafkaPublisher,
    PublisherConfig,
    add_bootstrap_argument,
    bootstrap_servers,
)
from producer.pipeline import AgentPipeline, PipelineSettings, Stream
from producer.span_batcher import NetBatcher, SpanBatcher
from producer.target_rules import TargetRulesFile
from producer.targets import FunctionNames, TargetProcess, pids_of_executable, resolve_target

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
    bootstrap_servers: str
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

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AgentConfig:
        if not args.pid and not args.exe and not args.config:
            raise TargetError("name targets with --config FILE, or --pid PID / --exe PATH")
        if not 1 <= args.max_batch_delay_ms <= 60_000:
            raise TargetError(f"--max-batch-delay-ms {args.max_batch_delay_ms}: use 1..60000")
        if args.max_batch_events < 1:
            raise TargetError(f"--max-batch-events {args.max_batch_events}: must be positive")
        if not args.max_call_seconds > 0:
            raise TargetError(f"--max-call-seconds {args.max_call_seconds}: must be positive")
        if args.partitions < 1:
            raise TargetError(f"--partitions {args.partitions}: must be positive")
        node_name = args.node_name or os.environ.get("NODE_NAME") or socket.gethostname()
        in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        kubernetes = None
        if not args.no_kubernetes and (args.kube_api or in_cluster):
            kubernetes = KubernetesSettings(node_name, args.kube_api, args.resolve_owners)
        return cls(
            pids=tuple(args.pid or ()),
            exes=tuple(args.exe or ()),
            funcs=tuple(args.func or ()),
            http=not args.no_http,
            bootstrap_servers=bootstrap_servers(args.bootstrap_servers),
            node_name=node_name,
            span_topic=args.span_topic,
            net_topic=args.net_topic,
            net_hooks=args.net_hooks,
            partitions=args.partitions,
            compression=args.compression,
            idempotent=args.idempotent,
            event_transport=args.event_transport,
            max_batch_events=args.max_batch_events,
            max_batch_delay_ms=args.max_batch_delay_ms,
            max_call_seconds=args.max_call_seconds,
            buffer_mib=args.buffer_mib,
            config=args.config,
            kubernetes=kubernetes,
            health_file=args.health_file,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="targets file (deploy/README.md): processes are selected by rules and attached "
        "as they start, detached as they exit; reloaded when it changes",
    )
    parser.add_argument(
        "--kube-api",
        metavar="URL",
        help="Kubernetes API server for pod names (default: in-cluster service account)",
    )
    parser.add_argument(
        "--no-kubernetes", action="store_true", help="do not name pods even inside a cluster"
    )
    parser.add_argument(
        "--resolve-owners",
        action="store_true",
        help="GET ReplicaSets/Jobs whose names do not show their owner (needs RBAC for them)",
    )
    parser.add_argument(
        "--health-file", metavar="PATH", help="touched every second while the agent is healthy"
    )
    parser.add_argument(
        "--pid", type=int, action="append", metavar="PID", help="process to trace (repeatable)"
    )
    parser.add_argument(
        "--exe",
        action="append",
        metavar="PATH",
        help="trace every running process of this executable (repeatable)",
    )
    parser.add_argument(
        "--func",
        action="append",
        metavar="SYMBOL",
        help="function symbol to time, e.g. 'main.(*server).handleOrder' "
        "(repeatable); without it Go net/http servers are traced automatically",
    )
    parser.add_argument(
        "--no-http",
        action="store_true",
        help="do not trace Go net/http servers' requests automatically",
    )
    add_bootstrap_argument(parser)
    parser.add_argument(
        "--node-name", help="name of this node in events (default $NODE_NAME or the host name)"
    )
    parser.add_argument("--span-topic", default="apm.uprobe.events")
    parser.add_argument("--net-topic", default="apm.kprobe.events")
    parser.add_argument(
        "--partitions",
        type=int,
        default=6,
        help="partitions of both topics when the agent creates them (default 6)",
    )
    parser.add_argument(
        "--net-hooks",
        choices=NET_HOOKS,
        default="auto",
        help="socket I/O hooks: kprobes where the kernel has them, else the sock tracepoints "
        "(auto); off disables network events",
    )
    parser.add_argument("--compression", choices=COMPRESSIONS, default="lz4")
    parser.add_argument(
        "--max-call-seconds",
        type=float,
        default=3600.0,
        help="forget a call with no return after this long (a Go panic skips the return)",
    )
    parser.add_argument(
        "--idempotent",
        action="store_true",
        help="use Kafka's idempotent producer (not supported by `ebpf-apm broker`)",
    )
    parser.add_argument(
        "--event-transport",
        choices=("ringbuf", "perf"),
        default="ringbuf",
        help="how records leave the kernel: BPF ring buffer (Linux 5.8+) or "
        "perf buffer (older kernels)",
    )
    parser.add_argument("--max-batch-events", type=int, default=16384)
    parser.add_argument("--max-batch-delay-ms", type=int, default=200)
    parser.add_argument(
        "--buffer-mib",
        type=int,
        default=64,
        help="events held while Kafka is unreachable before dropping (MiB)",
    )


def _resolve_targets(config: AgentConfig, names: FunctionNames) -> list[TargetProcess]:
    pids = list(config.pids)
    for exe in config.exes:
        found = pids_of_executable(exe)
        if not found:
            raise TargetError(f"--exe {exe}: no running process of that executable")
        pids.extend(p for p in found if p not in pids)
    return [resolve_target(pid, list(config.funcs), names, config.http) for pid in pids]


def run(args: argparse.Namespace) -> int:
    try:
        config = AgentConfig.from_args(args)
        require_privileges()
        names = FunctionNames()
        rules_file = TargetRulesFile(Path(config.config)) if config.config else None
        rules = rules_file.load() if rules_file else None
        targets = _resolve_targets(config, names) if config.pids or config.exes else []
        options = ProbeOptions(
            use_perf_buffer=config.event_transport == "perf", net_hooks=config.net_hooks
        )
        probes = AgentProbes(options)
    except AgentError as exc:
        log.error("%s", exc)
        return exc.exit_code

    def publisher(topic: str) -> KafkaPublisher:
        return KafkaPublisher(
            PublisherConfig(
                bootstrap_servers=config.bootstrap_servers,
                topic=topic,
                compression=config.compression,
                idempotent=config.idempotent,
                buffer_max_bytes=config.buffer_mib << 20,
                client_id=f"ebpf-apm-agent-{config.node_name}",
            )
        )

    limits = {
        "max_events": config.max_batch_events,
        "max_delay_ns": config.max_batch_delay_ms * 1_000_000,
    }
    spans = Stream(
        config.span_topic,
        SpanBatcher(config.node_name, names.names, {}, **limits),
        publisher(config.span_topic),
    )
    net = None
    if probes.net_enabled:
        net = Stream(
            config.net_topic,
            NetBatcher(config.node_name, {}, **limits),
            publisher(config.net_topic),
        )
    pipeline = AgentPipeline(
        probes,
        spans,
        net,
        config.bootstrap_servers,
        PipelineSettings(
            span_topic=config.span_topic,
            net_topic=config.net_topic,
            partitions=config.partitions,
            max_call_s=config.max_call_seconds,
            exit_when_targets_gone=rules is None,
            health_file=config.health_file,
        ),
    )
    try:
        for target in targets:
            pipeline.attach(target)
            for fn in target.functions:
                log.info(
                    "pid %d (%s%s): probing %s at %#x, %d return site(s)%s",
                    target.pid,
                    target.exe_name,
                    f", {target.go_version}" if target.go_version else "",
                    fn.plan.symbol.name,
                    fn.plan.symbol.address,
                    len(fn.plan.return_offsets),
                    " [HTTP span end: response flushed]"
                    if fn.http_finish
                    else " [HTTP]"
                    if fn.http
                    else "",
                )
        log.info("network events: %s", NET_HOOK_NAMES[probes.options.net_hooks])
        log.info(
            "tracing %d process(es)%s; publishing to %s on %s",
            len(targets),
            f" and those the rules in {config.config} select" if config.config else "",
            ", ".join(stream.topic for stream in pipeline.streams),
            config.bootstrap_servers,
        )
        return _run_loop(
            serve_agent(pipeline, rules_file, rules, names, config.http, config.kubernetes)
        )
    except AgentError as exc:
        log.error("%s", exc)
        return exc.exit_code
    finally:
        probes.close()


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency; plain asyncio still works without it
        return asyncio.run(main)
    return uvloop.run(main)
