"""`ebpf-apm dashboard`: flags -> a Dashboard on an aiohttp server, until SIGINT/SIGTERM.

Checks at start that the storage can be read (exit 1 if not, 2 for a bad URL or --listen),
then prints `dashboard: http://HOST:PORT/ (storage)` on stdout, the storage URL without its
password. The trace page (/trace?id=...) reads apm.spans from the Kafka the connection flags
name. `--listen 127.0.0.1:0` takes a free port (the printed line says which).
"""

from __future__ import annotations

import argparse
import asyncio

from ebpf_apm import runner
from ebpf_apm.consumers.errors import ConsumerConfigError, ConsumerError
from ebpf_apm.consumers.latency_store import (
    DEFAULT_STORAGE,
    STORAGE_ENV,
    open_store,
    redact_url,
    storage_url,
)
from ebpf_apm.kafka.connection import (
    KafkaConnection,
    add_connection_arguments,
    connection_from_args,
)

DEFAULT_LISTEN = "127.0.0.1:8080"


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT` -> (host, port); ConsumerConfigError if bad."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConsumerConfigError(
            f"bad --listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080 "
            "(port 0 takes a free one)"
        )
    return host, int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage",
        metavar="URL",
        default=None,
        help=f"where the aggregator writes (default: ${STORAGE_ENV}, else {DEFAULT_STORAGE})",
    )
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default=DEFAULT_LISTEN,
        help=f"address of the web page (default: {DEFAULT_LISTEN}; port 0: a free one)",
    )
    add_connection_arguments(parser)  # the trace page reads apm.spans there


async def serve(url: str, kafka: KafkaConnection, host: str, port: int, stop: asyncio.Event) -> int:
    from aiohttp import web  # only this command needs the web server

    from ebpf_apm.consumers.dashboard_service import Dashboard

    store = await open_store(url, create=False)  # readable now, or a clear error
    await store.close()
    site_runner = web.AppRunner(Dashboard(url, kafka).app(), access_log=None)
    await site_runner.setup()
    try:
        site = web.TCPSite(site_runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConsumerError(
                f"cannot listen on {host}:{port}: {exc}; choose another --listen"
            ) from exc
        bound_host, bound_port = site_runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(f"dashboard: http://{shown}:{bound_port}/ ({redact_url(url)})", flush=True)
        await stop.wait()
    finally:
        await site_runner.cleanup()
    return 0


def run(args: argparse.Namespace) -> int:
    """0 after SIGINT/SIGTERM; 2 bad flags; 1 storage unreadable or the address taken."""
    host, port = parse_listen(args.listen)
    url = storage_url(args.storage)
    kafka = connection_from_args(args)
    return runner.run(lambda stop: serve(url, kafka, host, port, stop))
