"""Percentiles end to end on this kernel: a Go server under the real agent, the join and the
aggregator as processes, and the stored windows checked against the spans in apm.spans.

Known traffic: 600 GET requests with known sleeps, in bursts spread over a few 2 s windows,
on two route shapes the goserver serves: /sleep/{i} (short sleeps with a slow tail, 200 or
503) and /deep/{i} (stack growth, then a longer sleep). The agent also times the sleep
handler (--func). Every request's path is unique, so each HTTP span is matched to the
request that caused it.

Ground truth, per series and window: the durations of the joined spans in apm.spans (read
as an outside subscriber reads them: fastavro and the schema file), windowed by end time as
the aggregator windows them. Stored rows must have the same count, sum, min and max, and
every quantile within 1% of the exact lower quantile (rank floor(q (n - 1)), the definition
consumers/latency_sketch.py guarantees). `ebpf-apm query --json` over the whole run must do
the same for all windows merged.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_harness import Agent, Request, go_server, send_concurrently
from dashboard_harness import check_rows_equal_query, dashboard, get_page, table_rows
from join_harness import outside_decoder, start_join, stop_service, wait_for
from kafka_fixtures import read_topic

from ebpf_apm.consumers.latency_store import LatencyRow, StorageError, open_store
from ebpf_apm.kafka.embedded_broker import EmbeddedBroker

pytestmark = [pytest.mark.bpf, pytest.mark.integration]

REPO = Path(__file__).resolve().parent.parent
SERVE_HTTP = "net/http.serverHandler.ServeHTTP"
HANDLE_SLEEP = "main.(*server).handleSleep"
NODE = "percentiles-node"
WINDOW_NS = 2_000_000_000
BURSTS = 5
PER_BURST = 120
CLIENTS = 16
QS = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99, "p999": 0.999}
RELATIVE_ERROR = 0.01


def plan(seed: int = 23) -> list[Request]:
    """Two route shapes with different sleep distributions; statuses 200 and 503."""
    rng = random.Random(seed)
    requests = []
    for rid in range(BURSTS * PER_BURST):
        if rng.random() < 0.3:
            ms = rng.randint(30, 90)
            requests.append(Request(rid, "GET", f"/deep/{rid}", f"depth=2000&ms={ms}", ms, 200))
        else:
            ms = rng.randint(40, 120) if rng.random() < 0.1 else rng.randint(1, 12)
            status = 503 if rng.random() < 0.25 else 200
            requests.append(
                Request(rid, "GET", f"/sleep/{rid}", f"ms={ms}&status={status}", ms, status)
            )
    return requests


def route(path: str) -> str:
    """The route templating restated: numeric segments become {id}."""
    return "/".join("{id}" if part.isdigit() else part for part in path.split("/"))


def series_of(span: dict[str, Any]) -> tuple[str, str, str | None]:
    workload = os.path.basename(span["exe"])
    if span["http_method"] is None:
        return (workload, span["func"], None)
    return (workload, f"{span['http_method']} {route(span['http_path'])}",
            f"{span['http_status'] // 100}xx")  # fmt: skip


def exact_quantile(ordered: np.ndarray, q: float) -> int:
    return int(ordered[math.floor(q * (len(ordered) - 1))])


def assert_figures(figures: dict[str, Any], durations: np.ndarray, what: str) -> None:
    ordered = np.sort(durations)
    assert figures["count"] == len(ordered), what
    assert figures["sum"] == int(ordered.sum()), what
    assert (figures["min"], figures["max"]) == (int(ordered[0]), int(ordered[-1])), what
    for name, q in QS.items():
        exact = exact_quantile(ordered, q)
        error = abs(figures[name] - exact) / exact
        assert error <= RELATIVE_ERROR, f"{what}: {name} {figures[name]} vs exact {exact}"


def stored_rows(storage: str) -> list[LatencyRow]:
    async def read() -> list[LatencyRow]:
        store = await open_store(storage, create=False)
        try:
            return await store.rows(0, 1 << 62)
        finally:
            await store.close()

    return asyncio.run(read())


def start_aggregate(bootstrap: str, storage: str, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "ebpf_apm.cli", "aggregate", "--bootstrap-servers", bootstrap,
        "--storage", storage, "--window", "2s", "--lateness", "3s", "--idle-timeout", "1s",
    ]  # fmt: skip
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)



def test_stored_percentiles_match_the_spans_of_each_window(
    go_targets: dict[tuple[str, bool], Path], tmp_path: Path
) -> None:
    requests = plan()
    storage = f"sqlite:///{tmp_path / 'latency.sqlite'}"
    join_log, aggregate_log = tmp_path / "join.log", tmp_path / "aggregate.log"
    expected_spans = len(requests) + sum(r.path.startswith("/sleep/") for r in requests)
    with EmbeddedBroker() as broker, go_server(go_targets[("1.27", False)]) as server:
        bootstrap = broker.bootstrap_servers
        agent_args = ["--pid", str(server.pid), "--func", HANDLE_SLEEP, "--node-name", NODE]
        with Agent([*agent_args, "--bootstrap-servers", bootstrap]) as agent:
            agent.wait_ready()
            join = start_join(bootstrap, join_log)
            aggregate = start_aggregate(bootstrap, storage, aggregate_log)
            try:
                for burst in range(BURSTS):  # a few windows' worth of traffic
                    if burst:
                        time.sleep(1.2)
                    send_concurrently(
                        server, requests[burst * PER_BURST : (burst + 1) * PER_BURST], CLIENTS
                    )
                records = asyncio.run(read_topic(bootstrap, "apm.spans", expected_spans, 40))
                assert len(records) == expected_spans, f"join:\n{join_log.read_text()}"

                def all_stored() -> bool:
                    assert aggregate.poll() is None, aggregate_log.read_text()
                    try:
                        rows = stored_rows(storage)
                    except StorageError:  # not created yet
                        return False
                    return sum(r.count for r in rows) >= expected_spans

                try:
                    wait_for(all_stored, 30, "the aggregator to store every span")
                except AssertionError as exc:
                    raise AssertionError(f"{exc}:\n{aggregate_log.read_text()}") from None
                query = subprocess.run(
                    [sys.executable, "-m", "ebpf_apm.cli", "query", "--storage", storage,
                     "--since", "1h", "--json"],
                    cwd=REPO, capture_output=True, text=True, timeout=60,
                )  # fmt: skip
            finally:
                stop_service(aggregate, "aggregate", aggregate_log)
                stop_service(join, "join", join_log)
            assert agent.stop() == 0, agent.log

    decode = outside_decoder()
    spans = [decode(r.value) for r in records]
    assert len({s["span_id"] for s in spans}) == len(spans), "a span was published twice"

    # The HTTP spans are the requests sent: one each, on its route, at least its sleep long.
    by_path = {r.path: r for r in requests}
    http = [s for s in spans if s["func"] == SERVE_HTTP]
    assert sorted(s["http_path"] for s in http) == sorted(by_path)
    sent = Counter((route(r.path), r.status) for r in requests)
    assert Counter((route(s["http_path"]), s["http_status"]) for s in http) == sent
    for span in http:
        request = by_path[span["http_path"]]
        assert span["node"] == NODE and span["pid"] == server.pid
        assert span["duration_ns"] >= request.sleep_ms * 1_000_000
        assert span["duration_ns"] <= request.end_ns - request.start_ns
    sleeps = sum(n for (path, _), n in sent.items() if path == "/sleep/{id}")
    assert sum(s["func"] == HANDLE_SLEEP for s in spans) == sleeps

    # Per series and window: the stored row against the exact figures of its spans.
    truth: dict[tuple[tuple[str, str, str | None], int], list[int]] = defaultdict(list)
    for span in spans:
        truth[(series_of(span), span["end_ns"] // WINDOW_NS * WINDOW_NS)].append(
            span["duration_ns"]
        )
    rows = {((r.workload, r.operation, r.status_class), r.window_start_ns): r
            for r in stored_rows(storage)}  # fmt: skip
    assert sorted(rows) == sorted(truth)
    assert len({start for _, start in truth}) >= 3, "the traffic should span several windows"
    for key, durations in truth.items():
        row = rows[key]
        assert row.window_end_ns == key[1] + WINDOW_NS
        assert_figures(row.as_dict(), np.array(durations, dtype=np.int64), f"{key}")

    # `ebpf-apm query --json` merges the windows' sketches: the same guarantee over the run.
    assert query.returncode == 0, query.stderr
    merged: dict[tuple[str, str], list[int]] = defaultdict(list)
    for span in spans:
        workload, operation, _ = series_of(span)
        merged[(workload, operation)].append(span["duration_ns"])
    results = json.loads(query.stdout)
    assert sorted((r["workload"], r["operation"]) for r in results) == sorted(merged)
    for result in results:
        run = np.array(merged[(result["workload"], result["operation"])], dtype=np.int64)
        assert_figures(result, run, f"query {result['operation']}")
        # Errors: the 5xx answers of the run (functions have no status).
        statuses = [s.get("http_status") for s in spans if series_of(s)[:2] == (
            result["workload"], result["operation"])]  # fmt: skip
        if statuses[0] is None:
            assert result["errors"] is None and result["error_share"] is None
        else:
            errors = sum(500 <= status <= 599 for status in statuses)
            assert result["errors"] == errors and result["error_share"] == errors / run.size
    assert any(r["errors"] for r in results), "the run should answer some 503s"

    # The dashboard shows what `query --json` printed: rates use the stored windows' time, so
    # a range that starts a little later but still holds every window gives the same figures.
    with dashboard(storage) as (base, _):
        status, html = get_page(f"{base}?since=1h")
    assert status == 200
    check_rows_equal_query(table_rows(html), results)
