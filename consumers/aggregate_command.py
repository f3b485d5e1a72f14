"""`ebpf-apm aggregate`: flags and environment -> one AggregateConfig -> AggregateService.

Runs until SIGINT/SIGTERM (exit status 0); 2 for bad flags or storage that holds windows of
another length; 1 when Kafka or storage fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from ebpf_apm import runner
from ebpf_apm.consumers.aggregate_service import AggregateConfig, AggregateService
from ebpf_apm.consumers.consumer_telemetry import (
    add_telemetry_arguments,
    served_telemetry,
    telemetry_settings_from_args,
)
from ebpf_apm.consumers.errors import ConsumerConfigError
from ebpf_apm.consumers.latency_store import DEFAULT_STORAGE, STORAGE_ENV, open_store, storage_url
from ebpf_apm.consumers.route_template import DEFAULT_MAX_SERIES, DEFAULT_MAX_WORKLOADS
from ebpf_apm.consumers.time_spec import (
    add_time_bounds_arguments,
    parse_duration_ns,
    time_bounds_from_args,
)
from ebpf_apm.kafka import topics
from ebpf_apm.kafka.connection import add_connection_arguments, connection_from_args

MAX_WORKLOADS_ENV = "EBPF_APM_MAX_WORKLOADS"
MAX_SERIES_ENV = "EBPF_APM_MAX_SERIES"


def config_from_args(args: argparse.Namespace) -> AggregateConfig:
    connection = connection_from_args(args)
    try:
        durations = {
            name: parse_duration_ns(getattr(args, name))
            for name in ("window", "lateness", "idle_timeout", "session_timeout")
        }
        bounds = time_bounds_from_args(args)
    except ValueError as exc:
        raise ConsumerConfigError(str(exc)) from exc
    if durations["window"] < 1_000_000:
        raise ConsumerConfigError(
            f"--window {args.window} is shorter than 1ms; use e.g. --window 10s"
        )
    for flag, value in (
        ("--max-series-per-workload", args.max_series_per_workload),
        ("--max-workloads", args.max_workloads),
        ("--max-series", args.max_series),
    ):
        if value < 1:
            raise ConsumerConfigError(f"{flag} {value} must be at least 1")
    return AggregateConfig(
        connection=connection,
        storage=storage_url(args.storage),
        group=args.group,
        spans_topic=args.spans_topic,
        latency_topic=args.latency_topic,
        deadletter_topic=args.deadletter_topic,
        window_ns=durations["window"],
        lateness_ns=durations["lateness"],
        idle_timeout_ns=durations["idle_timeout"],
        max_series_per_workload=args.max_series_per_workload,
        max_workloads=args.max_workloads,
        max_series=args.max_series,
        session_timeout_ms=max(1, durations["session_timeout"] // 1_000_000),
        crash_after_writes=args.crash_after_writes,
        time_bounds=bounds,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", default="10s", help="window length (default: 10s)")
    parser.add_argument(
        "--lateness",
        default="5s",
        help="how far behind the newest span a span may be and still count (default: 5s)",
    )
    parser.add_argument(
        "--idle-timeout",
        default="2s",
        help="after this long without input the watermark follows the wall clock, so the "
        "last windows close (default: 2s)",
    )
    parser.add_argument(
        "--storage",
        metavar="URL",
        default=None,
        help=f"sqlite:///path or postgresql://user@host/db (default: ${STORAGE_ENV}, else "
        f"{DEFAULT_STORAGE})",
    )
    add_connection_arguments(parser)
    add_telemetry_arguments(parser)
    add_time_bounds_arguments(parser)
    parser.add_argument("--group", default="ebpf-apm-aggregate", help="Kafka consumer group")
    parser.add_argument(
        "--spans-topic",
        default=topics.SPAN_BATCHES,
        help=f"input (default: {topics.SPAN_BATCHES}, the join's span batches keyed by "
        f"workload; {topics.SPANS} also works, with one member per group only)",
    )
    parser.add_argument(
        "--latency-topic",
        default=topics.LATENCY,
        help=f"closed windows (default: {topics.LATENCY})",
    )
    parser.add_argument(
        "--deadletter-topic",
        default=topics.DEADLETTER,
        help=f"undecodable input (default: {topics.DEADLETTER})",
    )
    parser.add_argument(
        "--max-series-per-workload",
        type=int,
        default=500,
        metavar="N",
        help="series beyond N in a workload go to its {overflow} series (default: 500)",
    )
    parser.add_argument(
        "--max-workloads",
        type=int,
        default=int(os.environ.get(MAX_WORKLOADS_ENV) or DEFAULT_MAX_WORKLOADS),
        metavar="N",
        help="series of workloads beyond N go to the {overflow}|{overflow}| series (default: "
        f"${MAX_WORKLOADS_ENV}, else {DEFAULT_MAX_WORKLOADS})",
    )
    parser.add_argument(
        "--max-series",
        type=int,
        default=int(os.environ.get(MAX_SERIES_ENV) or DEFAULT_MAX_SERIES),
        metavar="N",
        help="past N series in all, new series go to their workload's {overflow} series "
        f"(default: ${MAX_SERIES_ENV}, else {DEFAULT_MAX_SERIES})",
    )
    parser.add_argument(
        "--session-timeout",
        default="10s",
        help="Kafka group session timeout: how soon a crashed aggregator's partitions are "
        "handed to its restart (default: 10s)",
    )
    parser.add_argument("--crash-after-writes", type=int, default=0, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    telemetry_settings = telemetry_settings_from_args(args)

    async def serve(stop: asyncio.Event) -> None:
        async with served_telemetry("aggregate", telemetry_settings, config.connection) as tm:
            store = await open_store(config.storage)
            try:
                service = await AggregateService.resume(config, store, tm)
                await service.run(stop)
            finally:
                await store.close()

    return runner.run(serve)
