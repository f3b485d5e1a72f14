"""`ebpf-apm join`: flags and environment -> one validated JoinConfig -> JoinService.

Exit statuses: 0 after SIGTERM/SIGINT with everything emitted acknowledged and committed; 2
for bad flags or input topics that are not co-partitioned; 1 when Kafka is unreachable or
refuses output.
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
from ebpf_apm.consumers.join_service import JoinConfig, JoinService
from ebpf_apm.consumers.span_joiner import MS, JoinSettings
from ebpf_apm.consumers.time_spec import add_time_bounds_arguments, time_bounds_from_args
from ebpf_apm.kafka import topics
from ebpf_apm.kafka.connection import add_connection_arguments, connection_from_args


def config_from_args(args: argparse.Namespace) -> JoinConfig:
    """The service's configuration; ConsumerConfigError names every bad value."""
    connection = connection_from_args(args)
    problems = []
    for flag, value, low in (
        ("--allowed-lateness-ms", args.allowed_lateness_ms, 0),
        ("--idle-advance-ms", args.idle_advance_ms, 1),
        ("--max-span-ms", args.max_span_ms, 1),
        ("--session-timeout-ms", args.session_timeout_ms, 1000),
        ("--partitions", args.partitions, 1),
    ):
        if value < low:
            problems.append(f"{flag} {value}: must be at least {low}")
    if not args.stats_interval_s > 0:
        problems.append(f"--stats-interval-s {args.stats_interval_s}: must be positive")
    if not args.group:
        problems.append("--group must not be empty")
    try:
        bounds = time_bounds_from_args(args)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise ConsumerConfigError("; ".join(problems))
    return JoinConfig(
        connection=connection,
        join=JoinSettings(
            allowed_lateness_ns=args.allowed_lateness_ms * MS,
            idle_advance_ns=args.idle_advance_ms * MS,
            max_span_ns=args.max_span_ms * MS,
            event_time_at_most_now=True,
        ),
        time_bounds=bounds,
        group=args.group,
        partitions=args.partitions,
        session_timeout_ms=args.session_timeout_ms,
        stats_interval_s=args.stats_interval_s,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    add_telemetry_arguments(parser)
    add_time_bounds_arguments(parser)
    parser.add_argument(
        "--group", default="ebpf-apm-join", help="consumer group (default: ebpf-apm-join)"
    )
    parser.add_argument(
        "--allowed-lateness-ms",
        type=int,
        default=2000,
        metavar="N",
        help="how far behind the newest event a span or network event may arrive and still "
        "be joined (default: 2000)",
    )
    parser.add_argument(
        "--idle-advance-ms",
        type=int,
        default=1000,
        metavar="N",
        help="after this long without input, event time moves on with the wall clock, so the "
        "last spans are emitted (default: 1000)",
    )
    parser.add_argument(
        "--max-span-ms",
        type=int,
        default=30_000,
        metavar="N",
        help="network events are kept this long for the span containing them to end; longer "
        "spans get only their last N ms of I/O and are counted as truncated (default: 30000)",
    )
    parser.add_argument(
        "--session-timeout-ms",
        type=int,
        default=10_000,
        metavar="N",
        help="consumer group session: a crashed member's partitions move after this "
        "(default: 10000)",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=topics.EVENT_PARTITIONS,
        help="partitions for input topics the join has to create (default: "
        f"{topics.EVENT_PARTITIONS}, as the agent)",
    )
    parser.add_argument(
        "--stats-interval-s",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between stats log lines (default: 10)",
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    telemetry_settings = telemetry_settings_from_args(args)

    async def serve(stop: asyncio.Event) -> int:
        async with served_telemetry("join", telemetry_settings, config.connection) as telemetry:
            return await JoinService(config, telemetry=telemetry).run(stop)

    return runner.run(serve)
