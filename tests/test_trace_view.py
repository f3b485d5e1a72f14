"""`ebpf-apm query --trace`: the tree from parent ids, and the command against a real broker."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from dashboard_harness import dashboard, get_page

from ebpf_apm.consumers.latency_store import open_store
from ebpf_apm.consumers.trace_tree import build_tree, parse_trace_id, render
from ebpf_apm.kafka.embedded_broker import EmbeddedBroker
from ebpf_apm.schemas.avro_codec import codec

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
OTHER = "00f067aa0ba902b700f067aa0ba902b7"


def span(span_id: str, parent: str | None, start_ms: float, ms: float, **extra: Any) -> dict:
    start = 1_800_000_000_000_000_000 + int(start_ms * 1e6)
    record = {
        "span_id": span_id,
        "node": "node-1",
        "pid": 4242,
        "exe": "/srv/shop",
        "tid": 7,
        "goid": 1,
        "func": "main.handler",
        "start_ns": start,
        "end_ns": start + int(ms * 1e6),
        "duration_ns": int(ms * 1e6),
        "trace_id": TRACE,
        "parent_span_id": parent,
        "span_kind": "internal",
        "http_method": None,
        "http_path": None,
        "http_status": None,
        **dict.fromkeys(("k8s_namespace", "k8s_pod", "k8s_container", "k8s_workload")),
        **dict.fromkeys(("bytes_sent", "bytes_received", "net_sends", "net_recvs"), 0),
    }
    record.update(extra)
    return record


def tree_spans() -> list[dict]:
    server = span("a" * 16, None, 0, 50, span_kind="server", http_method="GET",
                  http_path="/cart", http_status=200)  # fmt: skip
    return [
        span(
            "c" * 16,
            "a" * 16,
            30,
            5,
            span_kind="client",
            db_system="postgresql",
            db_operation="SELECT",
            db_statement="SELECT * FROM cart WHERE id = ?",
        ),  # fmt: skip
        server,
        span(
            "b" * 16,
            "a" * 16,
            10,
            12,
            span_kind="client",
            rpc_method="/shop.Stock/Get",
            rpc_status=0,
        ),  # fmt: skip
        span("d" * 16, "b" * 16, 11, 3, func="main.pack"),
        span("c" * 16, "a" * 16, 30, 5),  # a replay of c: shown once
        span("e" * 16, "f" * 16, 40, 1, func="main.lost"),  # its parent is not in the trace
    ]


def test_tree_nests_by_parent_orders_by_start_and_shows_a_replay_once() -> None:
    roots = build_tree(tree_spans())
    assert [r.span["span_id"] for r in roots] == ["a" * 16, "e" * 16]
    assert [r.orphan for r in roots] == [False, True]
    children = roots[0].children
    assert [c.span["span_id"] for c in children] == ["b" * 16, "c" * 16]
    assert [g.span["span_id"] for g in children[0].children] == ["d" * 16]
    text = render(roots).splitlines()
    assert len(text) == 1 + 5
    assert "server   GET /cart 200" in text[1] and text[1].lstrip().startswith("0.000 ms")
    assert "    client   gRPC /shop.Stock/Get 0" in text[2]
    assert "      internal main.pack" in text[3]
    assert "postgresql SELECT * FROM cart WHERE id = ?" in text[4]
    assert text[5].endswith("(parent not found)")


@pytest.mark.parametrize("bad", ["", "xyz", "0" * 32, TRACE[:-1], TRACE + "0"])
def test_a_malformed_trace_id_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a trace id"):
        parse_trace_id(bad)
    assert parse_trace_id(TRACE.upper()) == TRACE


@pytest.mark.integration
def test_query_trace_and_the_trace_page_read_the_trace_from_apm_spans(tmp_path: Any) -> None:
    encode = codec("span.avsc").encode
    spans = tree_spans()
    noise = [span(f"{i:016x}", None, 0, 1, trace_id=OTHER) for i in range(1, 200)]
    with EmbeddedBroker() as broker:

        async def publish() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
            await producer.start()
            try:
                for i, record in enumerate(noise[:100] + spans + noise[100:]):
                    await producer.send_and_wait("apm.spans", encode(record), key=b"%d" % (i % 5))
            finally:
                await producer.stop()

        asyncio.run(publish())
        base = [sys.executable, "-m", "ebpf_apm.cli", "query", "--trace", TRACE]
        base += ["--bootstrap-servers", broker.bootstrap_servers]
        out = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        roots = json.loads(out.stdout)
        assert [r["span_id"] for r in roots] == ["a" * 16, "e" * 16]
        assert [c["span_id"] for c in roots[0]["children"]] == ["b" * 16, "c" * 16]
        assert roots[0]["children"][0]["children"][0]["func"] == "main.pack"
        text = subprocess.run(base, capture_output=True, text=True, timeout=60)
        assert text.returncode == 0 and "gRPC /shop.Stock/Get" in text.stdout, text.stderr
        # A range before the spans were published finds nothing, and says so.
        until = str(int(time.time()) - 3600)
        empty = subprocess.run([*base, "--until", until, "--since", "2h"],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert empty.returncode == 0 and empty.stdout == ""
        assert f"no span of trace {TRACE}" in empty.stderr
        bad = subprocess.run([*base[:5], "nope"], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "not a trace id" in bad.stderr

        # The dashboard's trace page draws the same tree, one row per span, parents first.
        storage = f"sqlite:///{tmp_path / 'apm.sqlite'}"
        asyncio.run(create_store(storage))
        kafka = ("--bootstrap-servers", broker.bootstrap_servers)
        with dashboard(storage, *kafka) as (base_url, _):
            status, page = get_page(f"{base_url}trace?id={TRACE}&since=1h")
            assert status == 200, page
            rows = re.findall(r'<tr class="span (\w+)" data-span-id="(\w+)"', page)
            assert rows == [("server", "a" * 16), ("client", "b" * 16), ("internal", "d" * 16),
                            ("client", "c" * 16), ("internal", "e" * 16)]  # fmt: skip
            # Each bar spans the span's share of the trace (50 ms from the first start).
            widths = re.findall(r'margin-left:([\d.]+)%;width:([\d.]+)%', page)
            assert [(float(a), float(b)) for a, b in widths] == [
                (0.0, 100.0), (20.0, 24.0), (22.0, 6.0), (60.0, 10.0), (80.0, 2.0)
            ]  # fmt: skip
            assert "(parent not found)" in page and "gRPC /shop.Stock/Get 0" in page
            status, page = get_page(f"{base_url}trace?id=nope")
            assert status == 400 and "not a trace id" in page
        with dashboard(storage, "--bootstrap-servers", "127.0.0.1:1") as (base_url, _):
            status, page = get_page(f"{base_url}trace?id={TRACE}")
            assert status == 503 and "cannot read apm.spans" in page


async def create_store(url: str) -> None:
    store = await open_store(url)
    await store.close()
