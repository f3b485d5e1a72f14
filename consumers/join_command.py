"""`ebpf-apm join`: flags and environment -> one validated JoinConfig -> JoinService.

Exit codes: 0 after SIGTERM/SIGINT with everything emitted acknowledged and committed; 2 for
bad flags or input topics that are not co-partitioned; 1 when Kafka is unreachable or
refuses output.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop

from consumers.join_service import (
    DEADLETTER_TOPIC,
    NET_TOPIC,
    OUTPUT_TOPIC,
    SPAN_TOPIC,
    JoinConfig,
    JoinService,
)
from consumers.kafka_io import JoinKafkaError, KafkaSettings
from consumers.span_joiner import MS, JoinSettings
from producer.kafka_publisher import (
    PublisherError,
    add_bootstrap_argument,
    bootstrap_servers,
    parse_bootstrap_servers,
)


class JoinConfigError(ValueError):
    """A flag or environment value is invalid (exit code 2)."""

    exit_code = 2


def config_from_args(args: argparse.Namespace) -> JoinConfig:
    """The service's configuration; JoinConfigError names every bad value."""
    bootstrap = bootstrap_servers(args.bootstrap_servers)
    try:
        parse_bootstrap_servers(bootstrap)
    except PublisherError as exc:
        raise JoinConfigError(str(exc)) from exc
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
    if problems:
        raise JoinConfigError("; ".join(problems))
    return JoinConfig(
        kafka=KafkaSettings(
            bootstrap_servers=bootstrap,
            group_id=args.group,
            span_topic=SPAN_TOPIC,
            net_topic=NET_TOPIC,
            output_topic=OUTPUT_TOPIC,
            deadletter_topic=DEADLETTER_TOPIC,
            default_partitions=args.partitions,
            session_timeout_ms=args.session_timeout_ms,
        ),
        join=JoinSettings(
            allowed_lateness_ns=args.allowed_lateness_ms * MS,
            idle_advance_ns=args.idle_advance_ms * MS,
            max_span_ns=args.max_span_ms * MS,
        ),
        stats_interval_s=args.stats_interval_s,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_bootstrap_argument(parser)
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
        default=6,
        help="partitions for input topics the join has to create (default: 6, as the agent)",
    )
    parser.add_argument(
        "--stats-interval-s",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between stats log lines (default: 10)",
    )


def run(args: argparse.Namespace) -> int:
    """0 after SIGTERM/SIGINT with everything acknowledged and committed; 2 bad flags or
    topics that are not co-partitioned; 1 Kafka unreachable or output not acknowledged."""
    try:
        config = config_from_args(args)
    except JoinConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return uvloop.run(_serve(config))


async def _serve(config: JoinConfig) -> int:
    service = JoinService(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    try:
        return await service.run()
    except (JoinKafkaError, PublisherError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


if __name__ == "__main__":  # the same as `ebpf-apm join`
    from producer.cli import main

    sys.exit(main(["join", *sys.argv[1:]]))
