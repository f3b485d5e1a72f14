"""`ebpf-apm export` end to end on this kernel: a Go server under the real agent, the join and
the exporter as processes, and a real OpenTelemetry collector (rotel, from PyPI) that
forwards what it receives to a sink the test reads (tests/otlp_collector.py).

Ground truth: the spans in apm.spans, read as an outside subscriber reads them (fastavro and
the schema file), and the requests the test sent. Every span must come out of the collector
once, over http/protobuf and over grpc, with the ids, times, kind, status, attributes and
resource attributes the mapping (schemas/otlp_export.md) promises. Then, with the collector
stopped for 30 s while traffic goes on, nothing is lost and the exporter holds no more than
about two batches in memory (its stats line reports what is pending).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from agent_harness import Agent, Request, go_server, send_concurrently
from join_harness import outside_decoder, start_join, stop_service, wait_for
from kafka_fixtures import read_topic
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from otlp_collector import Received, Rotel, TraceSink, collector

from ebpf_apm.kafka.embedded_broker import EmbeddedBroker

pytestmark = [pytest.mark.bpf, pytest.mark.integration]

REPO = Path(__file__).resolve().parent.parent
SERVE_HTTP = "net/http.serverHandler.ServeHTTP"
HANDLE_SLEEP = "main.(*server).handleSleep"
NODE = "export-node"


def plan(count: int, first: int = 0) -> list[Request]:
    """Sleep handler requests, every fifth a 503; unique paths name the request."""
    return [
        Request(
            rid,
            "GET",
            f"/sleep/{rid}",
            f"ms={1 + rid % 5}&status={503 if rid % 5 == 0 else 200}",
            1 + rid % 5,
            503 if rid % 5 == 0 else 200,
        )
        for rid in range(first, first + count)
    ]


def start_export(
    bootstrap: str, endpoint: str, protocol: str, log: Path, *extra: str
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "ebpf_apm.cli", "export", "--bootstrap-servers", bootstrap,
        "--otlp-endpoint", endpoint, "--protocol", protocol, "--group", f"export-{protocol}",
        "--max-batch-delay", "200ms", "--retry-max-backoff", "2s", "--stats-interval", "1s",
        "--session-timeout", "6s", *extra,
    ]  # fmt: skip
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)



def check_span(got: Received, record: dict[str, Any], server_pid: int) -> None:
    """One span out of the collector against its apm.spans record."""
    span = got.span
    # The kernel's ids (apm.spans version 3): the trace, the span's own 8 bytes, its parent.
    parent = bytes.fromhex(record["parent_span_id"] or "")
    assert span.trace_id == bytes.fromhex(record["trace_id"])
    assert span.span_id == bytes.fromhex(record["span_id"]) and len(span.span_id) == 8
    assert span.parent_span_id == parent
    assert (span.start_time_unix_nano, span.end_time_unix_nano) == (
        record["start_ns"],
        record["end_ns"],
    )
    attributes = got.attributes
    assert attributes["code.function.name"] == record["func"]
    assert attributes["thread.id"] == record["tid"]
    assert attributes["ebpf_apm.goroutine.id"] == record["goid"]
    assert attributes["ebpf_apm.bytes_sent"] == record["bytes_sent"]
    if record["func"] == SERVE_HTTP:
        assert span.kind == Span.SPAN_KIND_SERVER
        assert span.name == "GET /sleep/{id}"
        assert attributes["http.request.method"] == "GET"
        assert attributes["url.path"] == record["http_path"]
        assert attributes["http.response.status_code"] == record["http_status"]
        error = record["http_status"] >= 500
        assert span.status.code == (Status.STATUS_CODE_ERROR if error else Status.STATUS_CODE_UNSET)
    else:
        assert span.kind == Span.SPAN_KIND_INTERNAL
        assert span.name == HANDLE_SLEEP
        assert "http.request.method" not in attributes
        assert span.status.code == Status.STATUS_CODE_UNSET
    exe = record["exe"]
    assert got.resource == {
        "service.name": os.path.basename(exe),
        "host.name": NODE,
        "process.pid": server_pid,
        "process.executable.path": exe,
        "process.executable.name": os.path.basename(exe),
    }
    assert got.scope == "ebpf-apm"


def wait_for_spans(sink: TraceSink, ids: set[bytes], log: Path, timeout_s: float) -> None:
    def arrived() -> bool:
        return ids <= {r.span.span_id for r in list(sink.spans)}

    try:
        wait_for(arrived, timeout_s, "every span at the collector's sink")
    except AssertionError as exc:
        missing = len(ids - {r.span.span_id for r in sink.spans})
        raise AssertionError(f"{exc} ({missing} missing):\n{log.read_text()}") from None


def test_every_span_comes_out_of_the_collector_over_both_protocols(
    go_targets: dict[tuple[str, bool], Path], tmp_path: Path
) -> None:
    requests = plan(60)
    expected = len(requests) * 2  # ServeHTTP and the sleep handler
    logs = {name: tmp_path / f"{name}.log" for name in ("join", "http", "grpc")}
    (tmp_path / "http").mkdir()
    (tmp_path / "grpc").mkdir()
    with (
        EmbeddedBroker() as broker,
        go_server(go_targets[("1.27", False)]) as server,
        collector(tmp_path / "http") as (http_sink, http_collector),
        collector(tmp_path / "grpc") as (grpc_sink, grpc_collector),
    ):
        bootstrap = broker.bootstrap_servers
        agent_args = ["--pid", str(server.pid), "--func", HANDLE_SLEEP, "--node-name", NODE]
        with Agent([*agent_args, "--bootstrap-servers", bootstrap]) as agent:
            agent.wait_ready()
            join = start_join(bootstrap, logs["join"])
            exporters = {
                "http": start_export(
                    bootstrap, http_collector.http_endpoint, "http/protobuf", logs["http"]
                ),
                "grpc": start_export(bootstrap, grpc_collector.grpc_endpoint, "grpc", logs["grpc"]),
            }
            try:
                send_concurrently(server, requests, 8)
                for sink in (http_sink, grpc_sink):
                    wait_for(lambda: sink.count() >= expected, 40, "spans at the sink")  # noqa: B023
                records = asyncio.run(read_topic(bootstrap, "apm.spans", expected, 40))
                assert len(records) == expected, logs["join"].read_text()
                decode = outside_decoder()
                spans = [decode(r.value) for r in records]
                ids = {bytes.fromhex(s["span_id"])[:8] for s in spans}
                assert len(ids) == expected
                wait_for_spans(http_sink, ids, logs["http"], 40)
                wait_for_spans(grpc_sink, ids, logs["grpc"], 40)
                time.sleep(0.5)  # duplicates, if any, show up in the counts below
            finally:
                for name, process in exporters.items():
                    stop_service(process, f"export ({name})", logs[name])
                stop_service(join, "join", logs["join"])
            assert agent.stop() == 0, agent.log

    by_id = {bytes.fromhex(s["span_id"])[:8]: s for s in spans}
    assert Counter(s["http_path"] for s in spans if s["func"] == SERVE_HTTP) == Counter(
        r.path for r in requests
    )
    for sink in (http_sink, grpc_sink):
        assert Counter(r.span.span_id for r in sink.spans) == Counter(ids), "one per span"
        for got in sink.spans:
            check_span(got, by_id[got.span.span_id], server.pid)


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def test_a_collector_away_for_30_s_loses_nothing_and_memory_stays_bounded(
    go_targets: dict[tuple[str, bool], Path], tmp_path: Path
) -> None:
    batch = 100
    log, join_log = tmp_path / "export.log", tmp_path / "join.log"
    with (
        EmbeddedBroker() as broker,
        go_server(go_targets[("1.27", False)]) as server,
        TraceSink() as sink,
    ):
        rotel = Rotel(sink.url, tmp_path)
        rotel.start()
        bootstrap = broker.bootstrap_servers
        agent_args = ["--pid", str(server.pid), "--func", HANDLE_SLEEP, "--node-name", NODE]
        with Agent([*agent_args, "--bootstrap-servers", bootstrap]) as agent:
            agent.wait_ready()
            join = start_join(bootstrap, join_log)
            export = start_export(
                bootstrap,
                rotel.http_endpoint,
                "http/protobuf",
                log,
                "--max-batch-spans",
                str(batch),
            )
            sent = 0
            try:
                send_concurrently(server, plan(50), 8)
                sent += 50
                wait_for(lambda: sink.count() >= 2 * sent, 40, "the first spans at the sink")
                rss_before = rss_kib(export.pid)
                rotel.stop()  # the collector is away for 30 s while traffic goes on
                away_until = time.monotonic() + 30
                rss_away = []
                while time.monotonic() < away_until:
                    send_concurrently(server, plan(40, sent), 8)
                    sent += 40
                    rss_away.append(rss_kib(export.pid))
                    time.sleep(0.5)
                assert export.poll() is None, log.read_text()
                rotel.start()
                send_concurrently(server, plan(50, sent), 8)
                sent += 50
                expected = 2 * sent
                records = asyncio.run(read_topic(bootstrap, "apm.spans", expected, 60))
                assert len(records) == expected, join_log.read_text()
                decode = outside_decoder()
                ids = {bytes.fromhex(decode(r.value)["span_id"])[:8] for r in records}
                wait_for_spans(sink, ids, log, 60)
            finally:
                stop_service(export, "export", log)
                stop_service(join, "join", join_log)
                rotel.stop()
            assert agent.stop() == 0, agent.log

    text = log.read_text()
    # Spans held while the collector was away: one batch in flight, at most one more read
    # beside it (the partitions are paused), whatever the traffic.
    held = [int(a) + int(b) for a, b in re.findall(r"in flight (\d+), pending (\d+)", text)]
    assert len(held) >= 20, text  # a stats line a second, the outage included
    assert max(held) <= 2 * batch, text
    assert "retry 1 in" in text and "back after" in text, text
    away_spans = 2 * (sent - 100)
    assert away_spans > 10 * batch  # the outage produced far more than the exporter may hold
    # Memory: bounded by the batches, not by the outage (20 MiB of slack for the allocator).
    assert max(rss_away) - rss_before < 20 * 1024, (rss_before, rss_away)
    assert {r.span.span_id for r in sink.spans} >= ids
