"""`ebpf-apm export`: flags and the OTEL_EXPORTER_OTLP_* environment -> one ExportConfig ->
ExportService.

Runs until SIGINT/SIGTERM (exit status 0); 2 for bad flags or environment; 1 when Kafka fails
or the collector refuses the exporter (401, 403, 404, ...).
"""

from __future__ import annotations

import argparse
import asyncio

from ebpf_apm import runner
from ebpf_apm.consumers.consumer_telemetry import (
    add_telemetry_arguments,
    served_telemetry,
    telemetry_settings_from_args,
)
from ebpf_apm.consumers.errors import ConsumerConfigError
from ebpf_apm.consumers.export_service import ExportConfig, ExportService
from ebpf_apm.consumers.otlp_client import new_client
from ebpf_apm.consumers.otlp_settings import COMPRESSIONS, PROTOCOLS, resolve
from ebpf_apm.consumers.time_spec import parse_duration_ns
from ebpf_apm.kafka import topics
from ebpf_apm.kafka.connection import add_connection_arguments, connection_from_args


def _seconds(flag: str, text: str) -> float:
    try:
        value = parse_duration_ns(text) / 1e9
    except ValueError as exc:
        raise ConsumerConfigError(f"{flag} {text}: {exc}") from exc
    if value <= 0:
        raise ConsumerConfigError(f"{flag} {text}: must be longer than 0, e.g. 1s or 500ms")
    return value


def config_from_args(args: argparse.Namespace) -> ExportConfig:
    connection = connection_from_args(args)
    otlp = resolve(
        endpoint=args.otlp_endpoint,
        protocol=args.protocol,
        headers=args.otlp_header or (),
        timeout_ms=(
            int(_seconds("--otlp-timeout", args.otlp_timeout) * 1000) if args.otlp_timeout else None
        ),
        compression=args.otlp_compression,
        insecure=args.otlp_insecure,
    )
    if args.max_batch_spans < 1:
        raise ConsumerConfigError(f"--max-batch-spans {args.max_batch_spans}: must be at least 1")
    retry_initial = _seconds("--retry-initial-backoff", args.retry_initial_backoff)
    retry_max = _seconds("--retry-max-backoff", args.retry_max_backoff)
    if retry_max < retry_initial:
        raise ConsumerConfigError(
            f"--retry-max-backoff {args.retry_max_backoff} is shorter than "
            f"--retry-initial-backoff {args.retry_initial_backoff}"
        )
    return ExportConfig(
        connection=connection,
        otlp=otlp,
        group=args.group,
        spans_topic=args.spans_topic,
        deadletter_topic=args.deadletter_topic,
        max_batch_spans=args.max_batch_spans,
        max_batch_delay_s=_seconds("--max-batch-delay", args.max_batch_delay),
        retry_initial_s=retry_initial,
        retry_max_s=retry_max,
        session_timeout_ms=int(_seconds("--session-timeout", args.session_timeout) * 1000),
        stats_interval_s=_seconds("--stats-interval", args.stats_interval),
        from_beginning=not args.from_end,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_telemetry_arguments(parser)
    parser.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        default=None,
        help="collector: a base URL (http/protobuf appends /v1/traces) or the full traces "
        "URL; grpc: http(s)://HOST:PORT (default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "
        "$OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4318 or :4317)",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=None,
        help="OTLP transport (default: $OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL, else http/protobuf)",
    )
    parser.add_argument(
        "--otlp-header",
        action="append",
        metavar="KEY=VALUE",
        help="request header or gRPC metadata, repeatable; added to "
        "$OTEL_EXPORTER_OTLP_[TRACES_]HEADERS",
    )
    parser.add_argument(
        "--otlp-timeout",
        default=None,
        help="per request (default: $OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT ms, else 10s)",
    )
    parser.add_argument(
        "--otlp-compression",
        choices=COMPRESSIONS,
        default=None,
        help="(default: $OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION, else none)",
    )
    parser.add_argument(
        "--otlp-insecure",
        action="store_true",
        help="grpc: plain text to a HOST:PORT endpoint without a scheme "
        "(or $OTEL_EXPORTER_OTLP_INSECURE=true)",
    )
    parser.add_argument(
        "--max-batch-spans", type=int, default=2048, metavar="N", help="spans per request"
    )
    parser.add_argument(
        "--max-batch-delay",
        default="1s",
        help="longest a span waits for its batch to fill (default: 1s)",
    )
    parser.add_argument(
        "--retry-initial-backoff",
        default="500ms",
        help="first wait after a retryable answer; doubles each time (default: 500ms)",
    )
    parser.add_argument(
        "--retry-max-backoff",
        default="5s",
        help="longest wait between attempts; spans are retried until accepted (default: 5s)",
    )
    add_connection_arguments(parser)
    parser.add_argument("--group", default="ebpf-apm-export", help="Kafka consumer group")
    parser.add_argument(
        "--spans-topic", default=topics.SPANS, help=f"input (default: {topics.SPANS})"
    )
    parser.add_argument(
        "--deadletter-topic",
        default=topics.DEADLETTER,
        help=f"undecodable spans and batches the collector rejected (default: {topics.DEADLETTER})",
    )
    parser.add_argument(
        "--from-end",
        action="store_true",
        help="a new group starts at the newest span instead of the oldest",
    )
    parser.add_argument(
        "--session-timeout",
        default="10s",
        help="Kafka group session timeout (default: 10s)",
    )
    parser.add_argument(
        "--stats-interval", default="10s", help="between stats log lines (default: 10s)"
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)

    telemetry_settings = telemetry_settings_from_args(args)

    async def serve(stop: asyncio.Event) -> None:
        async with served_telemetry("export", telemetry_settings, config.connection) as tm:
            await ExportService(config, new_client(config.otlp), tm).run(stop)

    return runner.run(serve)
