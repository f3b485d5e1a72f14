"""Where Kafka is and how to reach it: one flag set and one settings object for every client.

Every command that talks to Kafka takes `--bootstrap-servers` (else $KAFKA_BOOTSTRAP_SERVERS,
else the local default) and the TLS/SASL flags of `ebpf_apm.kafka.security` through
`add_connection_arguments`, and turns them into a validated `KafkaConnection` with
`connection_from_args`. Clients are built from the connection by
`ebpf_apm.kafka.clients`, so a setting added here reaches every producer, consumer and admin.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ebpf_apm.kafka.errors import KafkaConfigError
from ebpf_apm.kafka.security import KafkaSecurity, add_security_arguments, security_from_args

log = logging.getLogger(__name__)

BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"
DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


def parse_bootstrap_servers(servers: str) -> list[tuple[str, int]]:
    """ "a:9092,[::1]:9093,b" -> [("a", 9092), ("::1", 9093), ("b", 9092)].

    Raises KafkaConfigError for a bad port or an empty list.
    """
    result: list[tuple[str, int]] = []
    for item in servers.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or (host.count(":") and not host.startswith("[")):
            host, port = item, "9092"  # no port, or a bare IPv6 address
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise KafkaConfigError(
                f"bad Kafka address {item!r} in {servers!r}: "
                "expected HOST:PORT, e.g. 127.0.0.1:9092"
            )
        result.append((host.strip("[]"), int(port)))
    if not result:
        raise KafkaConfigError(
            f"no Kafka address in {servers!r}: expected HOST:PORT[,HOST:PORT...]"
        )
    return result


@dataclass(frozen=True)
class KafkaConnection:
    """Validated connection settings shared by every client of one command."""

    bootstrap_servers: str
    security: KafkaSecurity = field(default_factory=KafkaSecurity)

    def __post_init__(self) -> None:
        parse_bootstrap_servers(self.bootstrap_servers)

    @property
    def servers(self) -> list[tuple[str, int]]:
        return parse_bootstrap_servers(self.bootstrap_servers)

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments every aiokafka client of this connection gets."""
        return {"bootstrap_servers": self.bootstrap_servers, **self.security.client_options()}

    def __str__(self) -> str:
        return self.bootstrap_servers


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """The Kafka flags, the same for every command that talks to Kafka."""
    parser.add_argument(
        "--bootstrap-servers",
        metavar="HOST:PORT",
        default=None,
        help=f"Kafka brokers (default: ${BOOTSTRAP_ENV}, else {DEFAULT_BOOTSTRAP})",
    )
    add_security_arguments(parser)


def connection_from_args(args: argparse.Namespace) -> KafkaConnection:
    """The flags' values, else the KAFKA_* environment, else the local defaults; validated
    (TLS files are loaded and passwords read here, so a bad one stops the command at start)."""
    servers = args.bootstrap_servers or os.environ.get(BOOTSTRAP_ENV) or DEFAULT_BOOTSTRAP
    connection = KafkaConnection(servers, security_from_args(args))
    if connection.security.protocol != "PLAINTEXT":
        log.info("Kafka at %s: %s", servers, connection.security.describe())
    return connection
