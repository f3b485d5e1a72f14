"""`ebpf-apm alert --rules rules.yaml`: flags and a checked rules file -> AlertService.

Runs until SIGINT/SIGTERM (exit status 0); 2 for a bad rules file or flags (every problem
named with its line); 1 when Kafka fails. `--check` only checks the rules file.
"""

from __future__ import annotations

import argparse
import asyncio

from ebpf_apm import runner
from ebpf_apm.consumers.alert_rules import load_rules
from ebpf_apm.consumers.alert_service import AlertConfig, AlertService
from ebpf_apm.consumers.consumer_telemetry import (
    add_telemetry_arguments,
    served_telemetry,
    telemetry_settings_from_args,
)
from ebpf_apm.consumers.errors import ConsumerConfigError
from ebpf_apm.consumers.time_spec import (
    add_time_bounds_arguments,
    parse_duration_ns,
    time_bounds_from_args,
)
from ebpf_apm.kafka import topics
from ebpf_apm.kafka.connection import add_connection_arguments, connection_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rules", required=True, metavar="FILE", help="rules file (YAML)")
    parser.add_argument("--check", action="store_true", help="only check the rules file, then exit")
    add_connection_arguments(parser)
    add_telemetry_arguments(parser)
    add_time_bounds_arguments(parser)
    parser.add_argument("--group", default="ebpf-apm-alert", help="Kafka consumer group")
    parser.add_argument("--latency-topic", default=topics.LATENCY, help="input windows")
    parser.add_argument("--alerts-topic", default=topics.ALERTS, help="output transitions")
    parser.add_argument(
        "--settle",
        default="1s",
        help="evaluate pending windows after this long without input (default: 1s)",
    )
    parser.add_argument(
        "--from-beginning",
        action="store_true",
        help="a new group starts at the oldest window kept (default: at new windows)",
    )


def config_from_args(args: argparse.Namespace) -> AlertConfig:
    rules = load_rules(args.rules)  # RulesError (exit status 2) names each problem
    connection = connection_from_args(args)
    try:
        settle_ns = parse_duration_ns(args.settle)
        bounds = time_bounds_from_args(args)
    except ValueError as exc:
        raise ConsumerConfigError(str(exc)) from exc
    return AlertConfig(
        connection=connection,
        rules=rules,
        rules_path=args.rules,
        group=args.group,
        latency_topic=args.latency_topic,
        alerts_topic=args.alerts_topic,
        settle_ns=settle_ns,
        from_beginning=args.from_beginning,
        time_bounds=bounds,
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    telemetry_settings = telemetry_settings_from_args(args)
    if args.check:
        print(f"{args.rules}: {len(config.rules)} rules, all valid")
        return 0

    async def serve(stop: asyncio.Event) -> None:
        async with served_telemetry("alert", telemetry_settings, config.connection) as tm:
            await AlertService(config, tm).run(stop)

    return runner.run(serve)
