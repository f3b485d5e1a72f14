"""The tree of a request that fans out: client spans made on goroutines the handler started
are the handler's server span's children, in its trace. Real kernel, Go programs, broker and
PostgreSQL.

tests/targets/fanout serves GET /fanout/N: three goroutines make an HTTP call (its own
/leaf/N), a gRPC call (its own apm.test.Fan/Get) and a SQL query, and the query's goroutine
starts a fourth that runs another statement. 16 clients ask for distinct N at once. Ground
truth: for each request, exactly those four client spans have the request's server span as
parent and its trace id, and run within it; the served /leaf/N and Fan/Get (nothing carries
a traceparent between them) start traces of their own; no SQL literal the program sent
reaches the topic.
"""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from agent_harness import Agent, read_spans
from go_builds import Toolchain, build_variants

pytestmark = [pytest.mark.bpf, pytest.mark.integration]

VARIANTS: list[tuple[Toolchain, bool]] = [("1.27", False), ("1.19", True)]
CLIENTS = 16
REQUESTS = 4  # per client
HTTP_DO = "net/http.(*Client).do"
GRPC_INVOKE = "google.golang.org/grpc.invoke"
SPANS_PER_REQUEST = 7  # /fanout, /leaf and Fan/Get served; HTTP, gRPC and 2 SQL calls made


@pytest.fixture(scope="module")
def fanout_targets(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    return build_variants("fanout", tmp_path_factory.mktemp("fanout"), VARIANTS, gopath=True)


def ask(address: str, numbers: list[int], failures: list[str]) -> None:
    for n in numbers:
        try:
            with urllib.request.urlopen(f"http://{address}/fanout/{n}", timeout=30) as answer:
                if answer.status != 200:
                    failures.append(f"{n}: {answer.status}")
        except OSError as exc:
            failures.append(f"{n}: {exc}")


@pytest.mark.parametrize("toolchain,stripped", VARIANTS, ids=["go1.27", "go1.19-stripped"])
def test_client_calls_on_started_goroutines_are_children_of_the_server_span(
    fanout_targets: dict, kafka_broker, postgres_url: str, toolchain: str, stripped: bool
) -> None:
    binary = fanout_targets[(toolchain, stripped)]
    url = postgres_url + "?sslmode=disable"
    server = subprocess.Popen([str(binary), "-pg", url], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        addresses = json.loads(server.stdout.readline())
        args = ["--pid", str(server.pid), "--node-name", "tree-node",
                "--bootstrap-servers", kafka_broker.bootstrap_servers]  # fmt: skip
        with Agent(args) as agent:
            agent.wait_ready()
            failures: list[str] = []
            threads = [
                threading.Thread(
                    target=ask,
                    args=(addresses["http"], list(range(c * 100, c * 100 + REQUESTS)), failures),
                )
                for c in range(CLIENTS)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not failures, failures
            expected = CLIENTS * REQUESTS * SPANS_PER_REQUEST
            spans = read_spans(kafka_broker.bootstrap_servers, server.pid, expected)
            assert agent.stop() == 0, agent.log
    finally:
        server.terminate()
        server.wait(10)
        if server.stdout is not None:
            server.stdout.close()
    assert "lost in kernel (ring full) 0" in agent.log, agent.log
    assert len(spans) == expected, Counter((s["span_kind"], s["func"]) for s in spans)
    assert "secret" not in json.dumps(spans)  # the agent sanitized every statement

    by_id = {s["span_id"]: s for s in spans}
    assert len(by_id) == len(spans), "span ids are unique"
    children: dict[str, list[dict]] = defaultdict(list)
    for span in spans:
        if span["parent_span_id"] is not None:
            children[span["parent_span_id"]].append(span)
    served = [s for s in spans if s["span_kind"] == "server"]
    fanouts = [s for s in served if (s.get("http_path") or "").startswith("/fanout/")]
    assert len(fanouts) == CLIENTS * REQUESTS
    assert len({s["trace_id"] for s in served}) == len(served), "each request its own trace"
    for request in fanouts:
        n = request["http_path"].rsplit("/", 1)[1]
        assert request["parent_span_id"] is None and request["http_status"] == 200
        made = children[request["span_id"]]
        calls = sorted(s["func"] for s in made if s["func"] in (HTTP_DO, GRPC_INVOKE))
        assert calls == sorted([HTTP_DO, GRPC_INVOKE]), made
        for span in made:
            assert span["span_kind"] == "client", span
            assert span["trace_id"] == request["trace_id"]
            assert request["start_ns"] <= span["start_ns"] <= span["end_ns"] <= request["end_ns"]
            assert not children[span["span_id"]], "a client span here has no children"
        [http] = [s for s in made if s["func"] == HTTP_DO]
        assert (http["http_method"], http["http_path"], http["http_status"]) == (
            "GET",
            f"/leaf/{n}",
            200,
        )
        assert http["http_host"] == addresses["http"]
        [grpc] = [s for s in made if s["func"] == GRPC_INVOKE]
        assert (grpc["rpc_method"], grpc["rpc_status"]) == ("/apm.test.Fan/Get", 0)
        sql = sorted((s for s in made if s.get("db_operation")), key=lambda s: s["db_statement"])
        assert [(s["db_system"], s["db_operation"], s["error"]) for s in sql] == [
            ("postgresql", "SELECT", 0),
            ("postgresql", "SELECT", 0),
        ], made
        assert [s["db_statement"] for s in sql] == [
            "SELECT ?, ?",
            "SELECT count(*) FROM pg_class WHERE relname = ? AND relpages > ?",
        ]
        assert len(made) == 4
    # The calls' servers start traces of their own (no traceparent crossed).
    leaves = [s for s in served if (s.get("http_path") or "").startswith("/leaf/")]
    fan = [s for s in served if s.get("rpc_method") == "/apm.test.Fan/Get"]
    assert len(leaves) == len(fan) == CLIENTS * REQUESTS
    assert all(s["parent_span_id"] is None for s in leaves + fan)
