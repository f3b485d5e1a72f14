"""One OTLP traces request at a time over http/protobuf (aiohttp) or grpc (grpcio), and what
its answer means for the batch.

    export(body) -> Answer: accepted (maybe with partial-success rejections)
                          | retry (collector away, 429, 502-504, gRPC UNAVAILABLE, ...)
                          | rejected (400 and other answers that will never succeed: the
                            batch is dead-lettered)
                          | refused (401, 403, 404, 405, 415, gRPC UNAUTHENTICATED,
                            PERMISSION_DENIED, UNIMPLEMENTED, NOT_FOUND: the configuration
                            is wrong; the service stops without committing)

The classification follows the OTLP specification (Failures, Throttling): only 429, 502,
503 and 504 (HTTP) and the retryable gRPC codes are retried; `Retry-After` (HTTP) is passed
on. `Backoff` is the delay schedule: exponential, with jitter, capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gzip
import random
import time
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from ebpf_apm import __version__
from ebpf_apm.consumers.otlp_settings import GRPC, OtlpSettings

ACCEPTED, RETRY, REJECTED, REFUSED = "accepted", "retry", "rejected", "refused"
HTTP_RETRYABLE = frozenset({429, 502, 503, 504})
HTTP_REFUSED = frozenset({401, 403, 404, 405, 415})
GRPC_RETRYABLE = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
GRPC_REFUSED = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.NOT_FOUND,
    }
)
GRPC_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
MAX_RETRY_AFTER_S = 300.0


@dataclass(frozen=True)
class Answer:
    outcome: str  # ACCEPTED, RETRY, REJECTED or REFUSED
    detail: str = ""  # the status and the collector's message, for logs and dead letters
    rejected_spans: int = 0  # partial success: spans of an accepted request it dropped
    retry_after_s: float | None = None


class OtlpClient(Protocol):
    settings: OtlpSettings

    async def start(self) -> None: ...
    async def export(self, body: bytes) -> Answer: ...
    async def close(self) -> None: ...


def _partial(response: ExportTraceServiceResponse) -> Answer:
    partial = response.partial_success
    return Answer(ACCEPTED, partial.error_message, rejected_spans=partial.rejected_spans)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After: 7` or an HTTP date -> seconds from now (None if absent or unreadable)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class HttpClient:
    """OTLP/HTTP binary protobuf: POST to the traces URL."""

    def __init__(self, settings: OtlpSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._headers = {
            **dict(settings.headers),
            "Content-Type": "application/x-protobuf",
            "User-Agent": f"ebpf-apm-export/{__version__}",
        }
        if settings.compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
            connector=aiohttp.TCPConnector(ssl=self.settings.ssl_context() or False, limit=4),
        )

    async def export(self, body: bytes) -> Answer:
        assert self._session is not None, "HttpClient.start() was not called"
        if self.settings.compression == "gzip":
            body = gzip.compress(body, compresslevel=5)
        try:
            async with self._session.post(
                self.settings.url, data=body, headers=self._headers
            ) as response:
                payload = await response.read()
                status = response.status
                retry_after = response.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Answer(RETRY, f"no answer: {type(exc).__name__}: {exc}".rstrip(": "))
        if 200 <= status < 300:
            try:
                return _partial(ExportTraceServiceResponse.FromString(payload))
            except DecodeError:  # a 2xx that is not an OTLP answer: accepted all the same
                return Answer(ACCEPTED)
        text = payload[:300].decode("utf-8", "replace").strip()
        detail = f"HTTP {status}" + (f": {text}" if text else "")
        if status in HTTP_RETRYABLE:
            return Answer(RETRY, detail, retry_after_s=retry_after_seconds(retry_after))
        return Answer(REFUSED if status in HTTP_REFUSED else REJECTED, detail)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class GrpcClient:
    """OTLP/gRPC: TraceService/Export with the request already serialized."""

    def __init__(self, settings: OtlpSettings) -> None:
        self.settings = settings
        self._channel: grpc.aio.Channel | None = None
        self._export: grpc.aio.UnaryUnaryMultiCallable | None = None
        self._metadata = tuple(settings.headers)
        gzip_on = settings.compression == "gzip"
        self._compression = grpc.Compression.Gzip if gzip_on else grpc.Compression.NoCompression

    async def start(self) -> None:
        settings = self.settings
        options = [("grpc.max_send_message_length", 64 << 20)]
        if settings.tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(settings.certificate),
                private_key=_read(settings.client_key),
                certificate_chain=_read(settings.client_certificate),
            )
            self._channel = grpc.aio.secure_channel(settings.grpc_target, credentials, options)
        else:
            self._channel = grpc.aio.insecure_channel(settings.grpc_target, options)
        self._export = self._channel.unary_unary(
            GRPC_METHOD,
            request_serializer=None,  # bytes as they are
            response_deserializer=ExportTraceServiceResponse.FromString,
        )

    async def export(self, body: bytes) -> Answer:
        assert self._export is not None, "GrpcClient.start() was not called"
        try:
            response = await self._export(
                body,
                timeout=self.settings.timeout_s,
                metadata=self._metadata,
                compression=self._compression,
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            detail = f"gRPC {code.name}" + (f": {exc.details()}" if exc.details() else "")
            if code in GRPC_RETRYABLE:
                return Answer(RETRY, detail)
            return Answer(REFUSED if code in GRPC_REFUSED else REJECTED, detail)
        return _partial(response)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as file:
        return file.read()


def new_client(settings: OtlpSettings) -> OtlpClient:
    return GrpcClient(settings) if settings.protocol == GRPC else HttpClient(settings)


class Backoff:
    """Delays between attempts: min(max, initial * 2**n), scaled by a jitter in [0.5, 1];
    a collector's Retry-After, when given, is the delay instead."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.rng = rng or random.Random()

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (0 for the first)."""
        if retry_after_s is not None:
            return retry_after_s
        ceiling = min(self.max_s, self.initial_s * 2 ** min(attempt, 30))
        return ceiling * self.rng.uniform(0.5, 1.0)


async def sleep_or_stop(seconds: float, stop: asyncio.Event) -> None:
    """Sleep, but wake at once when `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
