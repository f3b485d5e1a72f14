"""The `ebpf-apm` console command: one subcommand per service.

Each subcommand lives in the module that owns it, which provides `add_arguments(parser)` and
`run(args) -> exit status`. Only the chosen subcommand's module is imported: `ebpf-apm tail`
loads neither the agent's binary analysis nor the storage drivers.

Exit statuses: 0 success, 2 bad usage or input, 1 runtime failure. Every command raises
`ebpf_apm.errors.ApmError` (or a subclass) for what it cannot do; it is mapped here, once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ebpf_apm.errors import ApmError

# subcommand -> (module with add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "agent": ("ebpf_apm.producer.agent_command", "node agent: probes -> ring buffer -> Kafka"),
    "broker": ("ebpf_apm.kafka.embedded_broker", "embedded Kafka-compatible broker (Tansu)"),
    "join": (
        "ebpf_apm.consumers.join_command",
        "consumer: apm.uprobe.events + apm.kprobe.events -> apm.spans",
    ),
    "aggregate": (
        "ebpf_apm.consumers.aggregate_command",
        "consumer: apm.spans -> percentile windows in storage and apm.latency",
    ),
    "alert": (
        "ebpf_apm.consumers.alert_command",
        "consumer: rules over closed windows -> apm.alerts",
    ),
    "export": (
        "ebpf_apm.consumers.export_command",
        "consumer: apm.spans -> OpenTelemetry traces over OTLP (http/protobuf or grpc)",
    ),
    "query": ("ebpf_apm.consumers.query_command", "percentiles for any time range, from storage"),
    "tail": ("ebpf_apm.consumers.tail_command", "print a topic's events as JSON lines"),
    "dashboard": (
        "ebpf_apm.consumers.dashboard_command",
        "web page of the stored windows: operations, percentile charts, heatmaps",
    ),
}


def _chosen_command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the only global option takes no value)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="ebpf-apm", description="Latency percentiles for Go services, from eBPF."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parsers = {
        name: sub.add_parser(name, help=help_text, description=help_text)
        for name, (_, help_text) in COMMANDS.items()
    }
    command = _chosen_command(argv)
    module = None
    if command is not None:
        module = importlib.import_module(COMMANDS[command][0])
        module.add_arguments(parsers[command])
    args = parser.parse_args(argv)
    assert module is not None  # parse_args exits on a missing or unknown command
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:  # aiokafka logs every metadata update at INFO
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
    try:
        return int(module.run(args))
    except ApmError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:  # a line per problem
            print(f"error: {line}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
