"""Is the broker there? One ApiVersions request to the bootstrap servers, for readiness.

    broker_unreachable(connection, timeout_s) -> None (a broker answered) | why not

ApiVersions (key 18) version 0 is the one request every Kafka broker answers before
anything else, without authentication or metadata: the cheapest proof that a broker is up
and serving, not merely that its port accepts connections (a frozen broker's kernel still
completes the TCP handshake). The request is built here by hand, a few bytes, so the probe
costs no client, no metadata refresh and no background connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct

from ebpf_apm.kafka.connection import KafkaConnection

_API_VERSIONS = 18
_CLIENT_ID = b"ebpf-apm-probe"
_correlation = itertools.count(1)


def _api_versions_request(correlation_id: int) -> bytes:
    # Request header v1: api_key, api_version, correlation_id, client_id (int16-length string);
    # ApiVersions v0 has no body.
    body = struct.pack(">hhih", _API_VERSIONS, 0, correlation_id, len(_CLIENT_ID)) + _CLIENT_ID
    return struct.pack(">i", len(body)) + body


async def _ask(host: str, port: int, timeout_s: float) -> str | None:
    correlation_id = next(_correlation) & 0x7FFFFFFF
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(_api_versions_request(correlation_id))
            await writer.drain()
            size, answered_id, error_code = struct.unpack(">iih", await reader.readexactly(10))
    except TimeoutError:
        return f"{host}:{port} did not answer ApiVersions within {timeout_s:g} s"
    except (OSError, asyncio.IncompleteReadError) as exc:
        return f"{host}:{port}: {type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    if answered_id != correlation_id or size < 6:
        return f"{host}:{port} answered ApiVersions with a malformed response"
    if error_code:
        return f"{host}:{port} answered ApiVersions with error code {error_code}"
    return None


async def broker_unreachable(connection: KafkaConnection, timeout_s: float = 2.0) -> str | None:
    """None when a bootstrap server answered ApiVersions in time, else why none did."""
    answers = await asyncio.gather(
        *(_ask(host, port, timeout_s) for host, port in connection.servers)
    )
    if any(answer is None for answer in answers):
        return None
    return f"Kafka at {connection} unreachable: " + "; ".join(a for a in answers if a)
