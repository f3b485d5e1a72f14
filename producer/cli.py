"""The `ebpf-apm` console command: one subcommand per service.

Each subcommand lives in the module that owns it, which provides `add_arguments(parser)` and
`run(args) -> exit code`. Exit codes: 0 success, 2 bad usage or input, 1 runtime failure.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module with add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "agent": ("producer.agent_command", "node agent: probes -> ring buffer -> Kafka"),
    "broker": ("producer.embedded_broker", "embedded Kafka-compatible broker (Tansu)"),
    "join": (
        "consumers.join_command",
        "consumer: apm.uprobe.events + apm.kprobe.events -> apm.spans",
    ),
    "aggregate": (
        "consumers.aggregate_service",
        "consumer: apm.spans -> percentile windows in storage and apm.latency",
    ),
    "alert": ("consumers.alert_service", "consumer: rules over closed windows -> apm.alerts"),
    "query": ("consumers.query_command", "percentiles for any time range, from storage"),
    "tail": ("consumers.topic_tail", "print a topic's events as JSON lines"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ebpf-apm", description="Latency percentiles for Go services, from eBPF."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        modules[name] = importlib.import_module(module_name)
        modules[name].add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:  # aiokafka logs every metadata update at INFO
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
    try:
        return int(modules[args.command].run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
