"""Spans per second through `ebpf-apm export`, per process, over both OTLP protocols.

The path measured is the service's own (ExportService: group consumer on apm.spans, span.avsc
decode, otlp_spans mapping, one request in flight, commit after acceptance) into a real
collector, rotel, whose receivers answer and discard (`--exporter blackhole`). Beside it, in
the same run: the baseline, the same consumer group reading and decoding the same messages
with nothing sent (what the exporter adds is the difference), and the stages on their own
(decode; mapping and serialization) without Kafka.

Input: HTTP and function spans of 4 workloads (half in Kubernetes pods), 8 routes, published
once to an embedded broker before the clock starts.

    .venv/bin/python benchmarks/export_throughput.py [--spans 100000] [--batch 2048]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rotel
import uvloop
from aiokafka import AIOKafkaProducer

from ebpf_apm.consumers.export_service import ExportConfig, ExportService
from ebpf_apm.consumers.kafka_io import GroupInput
from ebpf_apm.consumers.otlp_client import new_client
from ebpf_apm.consumers.otlp_settings import resolve
from ebpf_apm.consumers.otlp_spans import export_request
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.embedded_broker import EmbeddedBroker
from ebpf_apm.schemas.avro_codec import codec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from otlp_collector import free_port  # noqa: E402

ROUTES = ["/api/user/{}", "/api/order/{}", "/health", "/api/cart/{}/item/{}"]
WORKLOADS = [("shop", "deployment/api"), ("shop", "deployment/cart"), (None, None), (None, None)]
T0 = 1_750_000_000_000_000_000


def make_records(n: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        w = i % len(WORKLOADS)
        namespace, workload = WORKLOADS[w]
        start = T0 + i * 40_000
        duration = int(rng.lognormvariate(13, 1))
        http = i % 2 == 0
        route = ROUTES[i % len(ROUTES)]
        records.append(
            {
                "span_id": f"{rng.getrandbits(128):032x}", "node": f"node-{w % 2}",
                "pid": 1000 + w, "exe": f"/app/service{w}", "tid": 100 + i % 16,
                "goid": i % 500, "start_ns": start, "end_ns": start + duration,
                "duration_ns": duration,
                "func": "net/http.serverHandler.ServeHTTP" if http else f"main.handle{i % 12}",
                "http_method": "GET" if http else None,
                "http_path": route.format(i, i % 7) if http else None,
                "http_status": rng.choice([200, 200, 200, 404, 503]) if http else None,
                "k8s_namespace": namespace, "k8s_pod": f"{workload}-{w}" if workload else None,
                "k8s_container": "app" if workload else None, "k8s_workload": workload,
                "bytes_sent": rng.randint(100, 5000), "bytes_received": rng.randint(100, 900),
                "net_sends": 1, "net_recvs": 1,
            }
        )  # fmt: skip
    return records


async def publish(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    await producer.start()
    try:
        futures = [await producer.send(topic, v, key=b"node/1") for v in values]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def start_rotel(workdir: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    grpc_port, http_port = free_port(), free_port()
    agent = Path(rotel.__file__).parent / "rotel-agent"
    command = [
        str(agent), "start", "--exporter", "blackhole", "--disable-batching",
        "--otlp-grpc-endpoint", f"127.0.0.1:{grpc_port}",
        "--otlp-http-endpoint", f"127.0.0.1:{http_port}",
        "--otlp-grpc-max-recv-msg-size-mib", "64",
        "--pid-file", str(workdir / "rotel.pid"), "--log-file", str(workdir / "rotel-d.log"),
    ]  # fmt: skip
    with (workdir / "rotel.log").open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    time.sleep(1.0)
    assert process.poll() is None, (workdir / "rotel.log").read_text()
    return process, grpc_port, http_port


async def timed(
    run: Callable[[asyncio.Event], Any], started: Callable[[], bool], done: Callable[[], bool]
) -> tuple[float, float]:
    """(wall s, process CPU s) from the first span read (the group joined) until done()."""
    stop = asyncio.Event()
    task = asyncio.create_task(run(stop))
    while not started():
        if task.done():
            await task
            raise RuntimeError("stopped early")
        await asyncio.sleep(0.001)
    wall, cpu = time.perf_counter(), time.process_time()
    while not done():
        if task.done():
            await task
            raise RuntimeError("stopped early")
        await asyncio.sleep(0.01)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stop.set()
    await task
    return wall, cpu


async def decode_only(bootstrap: str, topic: str, n: int) -> tuple[float, float]:
    span_codec = codec("span.avsc")
    group = GroupInput(KafkaConnection(bootstrap), group="bench-decode", topics=(topic,),
                       client_id="bench")  # fmt: skip
    seen = 0

    async def run(stop: asyncio.Event) -> None:
        nonlocal seen
        await group.start()
        try:
            while not stop.is_set():
                for records in (await group.poll(200, max_records=2048)).values():
                    for record in records:
                        span_codec.decode(record.value or b"")
                    seen += len(records)
                    last = records[-1]
                    await group.commit({(last.topic, last.partition): last.offset + 1})
        finally:
            await group.stop()

    return await timed(run, lambda: seen > 0, lambda: seen >= n)


async def export(
    bootstrap: str, topic: str, n: int, protocol: str, endpoint: str, batch: int
) -> tuple[float, float, int]:
    settings = resolve(endpoint=endpoint, protocol=protocol, environ={})
    config = ExportConfig(
        connection=KafkaConnection(bootstrap), otlp=settings, group=f"bench-{protocol}",
        spans_topic=topic, max_batch_spans=batch, max_batch_delay_s=0.05,
        stats_interval_s=3600,
    )  # fmt: skip
    service = ExportService(config, new_client(settings))
    counts = service.counts
    wall, cpu = await timed(service.run, lambda: counts.read > 0, lambda: counts.exported >= n)
    return wall, cpu, service.counts.requests


def stages(records: list[dict[str, Any]], values: list[bytes], batch: int) -> tuple[float, float]:
    span_codec = codec("span.avsc")
    t = time.process_time()
    for v in values:
        span_codec.decode(v)
    decode = time.process_time() - t
    t = time.process_time()
    for first in range(0, len(records), batch):
        export_request(records[first : first + batch]).SerializeToString()
    return decode, time.process_time() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2048)
    args = parser.parse_args()
    n = args.spans
    records = make_records(n)
    span_codec = codec("span.avsc")
    values = [span_codec.encode(r) for r in records]
    decode_s, map_s = stages(records, values, args.batch)
    print(f"spans: {n}, batch {args.batch}; stages alone (CPU, no Kafka, no network):")
    print(f"  span.avsc decode          {n / decode_s:>10,.0f} spans/s")
    print(f"  OTLP mapping + serialize  {n / map_s:>10,.0f} spans/s")
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        bootstrap = broker.bootstrap_servers
        uvloop.run(publish(bootstrap, "bench.spans", values))
        collector, grpc_port, http_port = start_rotel(Path(tmp))
        try:
            results = {
                "baseline: Kafka + decode only": (
                    *uvloop.run(decode_only(bootstrap, "bench.spans", n)),
                    0,
                )
            }
            results["export http/protobuf"] = uvloop.run(
                export(bootstrap, "bench.spans", n, "http/protobuf",
                       f"http://127.0.0.1:{http_port}", args.batch)
            )  # fmt: skip
            results["export grpc"] = uvloop.run(
                export(bootstrap, "bench.spans", n, "grpc", f"http://127.0.0.1:{grpc_port}",
                       args.batch)
            )  # fmt: skip
        finally:
            collector.terminate()
            collector.wait(10)
    print(
        "end to end, one process (apm.spans on Tansu -> rotel, blackhole exporter), "
        "clocked from the first span read:"
    )
    base = n / results["baseline: Kafka + decode only"][0]
    for name, (wall, cpu, requests) in results.items():
        rate = n / wall
        extra = f", {requests} requests" if requests else ""
        print(
            f"  {name:<30} {rate:>10,.0f} spans/s (wall {wall:.2f} s, CPU {cpu:.2f} s, "
            f"{n / cpu:,.0f} spans per CPU-second{extra}); {rate / base:.2f}x the baseline"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
