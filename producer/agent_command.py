"""`ebpf-apm agent`: flags and environment -> one validated AgentConfig -> the agent.

Exit statuses: 0 after SIGTERM/SIGINT (or once every traced process has exited) with every
event acknowledged; 2 bad input (unknown pid, missing symbol, unsupported binary, bad flag);
1 runtime failure (no privilege, no kernel support, events left unacknowledged).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket

from ebpf_apm import runner
from ebpf_apm.kafka import topics
from ebpf_apm.kafka.connection import add_connection_arguments, connection_from_args
from ebpf_apm.producer.agent import COMPRESSIONS, AgentConfig, serve
from ebpf_apm.producer.binary_guard import DEFAULT_MAX_BYTES, DEFAULT_TIME_LIMIT_S, BinaryLimits
from ebpf_apm.producer.bpf_loader import LOADERS, NET_HOOKS
from ebpf_apm.producer.errors import TargetError
from ebpf_apm.producer.path_redaction import PLACEHOLDER, PathRedactor
from ebpf_apm.producer.rule_targets import KubernetesSettings
from ebpf_apm.telemetry import add_metrics_arguments, metrics_address_from_args


def config_from_args(args: argparse.Namespace) -> AgentConfig:
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
    if args.max_binary_mib < 1:
        raise TargetError(f"--max-binary-mib {args.max_binary_mib}: must be positive")
    if not args.binary_parse_seconds > 0:
        raise TargetError(f"--binary-parse-seconds {args.binary_parse_seconds}: must be positive")
    node_name = args.node_name or os.environ.get("NODE_NAME") or socket.gethostname()
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    kubernetes = None
    if not args.no_kubernetes and (args.kube_api or in_cluster):
        kubernetes = KubernetesSettings(node_name, args.kube_api, args.resolve_owners)
    return AgentConfig(
        pids=tuple(args.pid or ()),
        exes=tuple(args.exe or ()),
        funcs=tuple(args.func or ()),
        http=not args.no_http,
        connection=connection_from_args(args),
        node_name=node_name,
        span_topic=args.span_topic,
        net_topic=args.net_topic,
        net_hooks=args.net_hooks,
        partitions=args.partitions,
        compression=args.compression,
        idempotent=args.idempotent,
        event_transport=args.event_transport,
        bpf_loader=args.bpf_loader,
        max_batch_events=args.max_batch_events,
        max_batch_delay_ms=args.max_batch_delay_ms,
        max_call_seconds=args.max_call_seconds,
        buffer_mib=args.buffer_mib,
        config=args.config,
        kubernetes=kubernetes,
        health_file=args.health_file,
        metrics_address=metrics_address_from_args(args),
        path_redactor=PathRedactor(args.redact_path or (), defaults=not args.no_default_redaction),
        binary_limits=BinaryLimits(args.max_binary_mib << 20, args.binary_parse_seconds),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redact-path",
        metavar="PATTERN",
        action="append",
        help="regular expression matched against each whole URL path segment; a match is "
        f"replaced by {PLACEHOLDER} before events leave the node (repeatable)",
    )
    parser.add_argument(
        "--no-default-redaction",
        action="store_true",
        help="do not redact e-mail addresses, UUIDs, hex keys, JWT-like and long tokens in "
        "URL paths by default (query strings are always cut)",
    )
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
    add_metrics_arguments(parser)
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
    add_connection_arguments(parser)
    parser.add_argument(
        "--node-name", help="name of this node in events (default $NODE_NAME or the host name)"
    )
    parser.add_argument("--span-topic", default=topics.SPAN_EVENTS)
    parser.add_argument("--net-topic", default=topics.NET_EVENTS)
    parser.add_argument(
        "--partitions",
        type=int,
        default=topics.EVENT_PARTITIONS,
        help="partitions of both topics when the agent creates them (default "
        f"{topics.EVENT_PARTITIONS})",
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
    parser.add_argument(
        "--bpf-loader",
        choices=LOADERS,
        default="helper",
        help="where BCC compiles the probes: a short-lived helper process that hands the "
        "loaded programs and maps over (the agent never maps LLVM), or in the agent itself "
        "(the old design, ~200 MB more resident; --event-transport perf always does this)",
    )
    parser.add_argument(
        "--max-binary-mib",
        type=int,
        default=DEFAULT_MAX_BYTES >> 20,
        help="target binaries larger than this are reported unsupported, not read (MiB)",
    )
    parser.add_argument(
        "--binary-parse-seconds",
        type=float,
        default=DEFAULT_TIME_LIMIT_S,
        help="a target binary whose symbols take longer to read is reported unsupported",
    )
    parser.add_argument("--max-batch-events", type=int, default=16384)
    parser.add_argument("--max-batch-delay-ms", type=int, default=200)
    parser.add_argument(
        "--buffer-mib",
        type=int,
        default=64,
        help="events held while Kafka is unreachable before dropping (MiB)",
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)

    async def serve_agent(stop: asyncio.Event) -> int:
        return await serve(config, stop)

    return runner.run(serve_agent)
