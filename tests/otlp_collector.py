"""What the export tests send traces to: a real collector (rotel, from PyPI) and the sink it
forwards to, where the test reads back every span.

    ebpf-apm export --(http/protobuf or grpc)--> Rotel (OTLP receivers on 127.0.0.1)
      --(OTLP http/protobuf)--> TraceSink (aiohttp in a thread: records every span)

TraceSink can also stand in for a collector with scripted answers (503 with Retry-After, 400,
401, partial success), to test what the exporter does with each. Rotel runs as a child
process started and stopped by pid.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import rotel
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

ROTEL_AGENT = Path(rotel.__file__).parent / "rotel-agent"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def attributes(pairs: list[KeyValue]) -> dict[str, object]:
    """KeyValue list -> {key: python value}."""
    out: dict[str, object] = {}
    for kv in pairs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


@dataclass
class Received:
    """One span as the sink got it, with its resource's attributes."""

    span: Span
    resource: dict[str, object]
    scope: str

    @property
    def attributes(self) -> dict[str, object]:
        return attributes(list(self.span.attributes))


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None  # None: an ExportTraceServiceResponse


class TraceSink:
    """An OTLP/HTTP traces endpoint in a thread; answers from `script`, then 200."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/traces"
        self.spans: list[Received] = []
        self.requests = 0
        self.headers: list[dict[str, str]] = []
        self.script: list[Answer] = []
        self.partial_rejected = 0  # reported in every 200 answer when set
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._runner: web.AppRunner | None = None

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=256 << 20)
        app.router.add_post("/v1/traces", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp undoes Content-Encoding: gzip
        with self._lock:
            self.requests += 1
            self.headers.append(dict(request.headers))
            answer = self.script.pop(0) if self.script else Answer()
            if answer.status == 200:
                message = ExportTraceServiceRequest.FromString(body)
                for rs in message.resource_spans:
                    resource = attributes(list(rs.resource.attributes))
                    for ss in rs.scope_spans:
                        self.spans.extend(Received(s, resource, ss.scope.name) for s in ss.spans)
        payload = answer.body
        if payload is None:
            response = ExportTraceServiceResponse()
            if self.partial_rejected:
                response.partial_success.CopyFrom(
                    ExportTracePartialSuccess(
                        rejected_spans=self.partial_rejected, error_message="span too old"
                    )
                )
            payload = response.SerializeToString()
        return web.Response(
            status=answer.status,
            body=payload,
            headers={"Content-Type": "application/x-protobuf", **answer.headers},
        )

    def count(self) -> int:
        with self._lock:
            return len(self.spans)

    def __enter__(self) -> TraceSink:
        self._thread.start()
        assert self._ready.wait(10), "the trace sink did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            assert self._runner is not None
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class Rotel:
    """The rotel collector: OTLP gRPC and HTTP receivers on 127.0.0.1, traces forwarded over
    OTLP/HTTP to `forward_to`. stop() and start() keep the same ports."""

    def __init__(self, forward_to: str, workdir: Path) -> None:
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.forward_to = forward_to.removesuffix("/v1/traces")
        self.workdir = workdir
        self.log = workdir / "rotel.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    def start(self) -> None:
        command = [
            str(ROTEL_AGENT), "start",
            "--otlp-grpc-endpoint", f"127.0.0.1:{self.grpc_port}",
            "--otlp-http-endpoint", f"127.0.0.1:{self.http_port}",
            "--exporter", "otlp",
            "--otlp-exporter-endpoint", self.forward_to,
            "--otlp-exporter-protocol", "http",
            "--batch-timeout", "100ms",
            "--pid-file", str(self.workdir / "rotel.pid"),
            "--log-file", str(self.workdir / "rotel-daemon.log"),
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not self._listening():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"rotel did not listen:\n{self.log.read_text()}"
            time.sleep(0.05)

    def _listening(self) -> bool:
        for port in (self.grpc_port, self.http_port):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                return False
        return True

    def stop(self) -> None:
        """SIGTERM (rotel forwards what it holds), then wait; by pid."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def collector(workdir: Path) -> Iterator[tuple[TraceSink, Rotel]]:
    with TraceSink() as sink:
        collector = Rotel(sink.url, workdir)
        collector.start()
        try:
            yield sink, collector
        finally:
            collector.stop()
