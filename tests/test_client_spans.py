"""Client spans (outgoing HTTP, gRPC and database/sql calls) against real Go programs,
kernel, broker and PostgreSQL.

tests/targets/goclient runs twice: once as the servers (HTTP/1 and gRPC), once as the
client the agent traces, which makes calls from 16 goroutines to those servers and to the
test's PostgreSQL and prints what every call asked for, what came back and when it started
and ended. That is the ground truth: exactly one client span per call, with the method,
host, path and status (HTTP), the full method and code (gRPC), the operation (SQL), inside
the caller's own timing; no SQL literal the program sent reaches the topic.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from agent_harness import Agent, end_process, read_spans
from go_builds import Toolchain, build_variants
from join_harness import outside_decoder, start_join, stop_service, wait_for
from kafka_fixtures import read_topic

from ebpf_apm.producer.client_probes import GO_TABLE, LIBRARY_TABLE
from ebpf_apm.producer.go_binary import dwarf_struct_offsets

pytestmark = [pytest.mark.bpf, pytest.mark.integration]

CLOCK_SLACK_NS = 2_000_000  # epoch timestamps are converted from the kernel clock
VARIANTS: list[tuple[Toolchain, bool]] = [
    ("1.27", False),
    ("1.27", True),
    ("1.19", False),
    ("1.19", True),
]
CALLS = 34  # calls of each kind; gRPC codes cycle through 0..16
HTTP_DO = "net/http.(*Client).do"
GRPC_INVOKE = "google.golang.org/grpc.invoke"
GRPC_STREAM = "google.golang.org/grpc.newClientStream"


@pytest.fixture(scope="session")
def client_targets(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    return build_variants("goclient", tmp_path_factory.mktemp("goclient"), VARIANTS, gopath=True)


@contextmanager
def started(command: list[str], **kwargs: object) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, **kwargs)  # type: ignore[call-overload]
    try:
        yield process
    finally:
        end_process(process)


def inside(span: dict, call: dict) -> bool:
    return (
        span["start_ns"] >= call["start_ns"] - CLOCK_SLACK_NS
        and span["end_ns"] <= call["end_ns"] + CLOCK_SLACK_NS
    )


@pytest.mark.parametrize(
    "toolchain,stripped", VARIANTS, ids=["go1.27", "go1.27-stripped", "go1.19", "go1.19-stripped"]
)
def test_http_grpc_and_sql_calls_yield_one_correct_client_span_each(
    client_targets: dict, kafka_broker, postgres_url: str, toolchain: str, stripped: bool
) -> None:
    binary = client_targets[(toolchain, stripped)]
    with started([str(binary), "-serve"]) as servers:
        assert servers.stdout is not None
        addrs = json.loads(servers.stdout.readline())
        command = [str(binary), "-http", addrs["http"], "-grpc", addrs["grpc"],
                   "-pg", postgres_url + "?sslmode=disable", "-calls", str(CALLS)]  # fmt: skip
        with started(command, stdin=subprocess.PIPE) as client:
            args = ["--pid", str(client.pid), "--bootstrap-servers",
                    kafka_broker.bootstrap_servers, "--node-name", "test-node"]  # fmt: skip
            with Agent(args) as agent:
                agent.wait_ready()
                assert client.stdin is not None and client.stdout is not None
                client.stdin.write("all\n")
                client.stdin.close()
                calls = [json.loads(line) for line in client.stdout]
                assert calls.pop() == {"kind": "round", "status": 0, "start_ns": 0, "end_ns": 0}
                assert client.wait(30) == 0
                # HTTP, gRPC unary and stream per call, 4 statements, one transport error
                expected = CALLS * 7 + 1
                assert len(calls) == expected
                try:
                    spans = read_spans(kafka_broker.bootstrap_servers, client.pid, expected)
                except AssertionError as exc:
                    raise AssertionError(f"{exc}\nagent log:\n{agent.log}") from None
                assert agent.stop() == 0, agent.log
    assert "lost in kernel (ring full) 0" in agent.log, agent.log
    assert "returns without entry 0, read failures 0" in agent.log, agent.log
    assert all(s["span_kind"] == "client" for s in spans), [s for s in spans][:3]

    # HTTP: one span per request, host as requested, path without the query, final status
    http_calls = {c["path"]: c for c in calls if c["kind"] == "http"}
    http = [s for s in spans if s["func"] == HTTP_DO and not s["error"]]
    assert Counter(s["http_path"] for s in http) == Counter(list(http_calls))
    for span in http:
        call = http_calls[span["http_path"]]
        assert (span["http_method"], span["http_host"]) == ("GET", call["host"]), span
        # the connection the request went out on, as net/http's GotConn saw it
        assert f"{span['peer_addr']}:{span['peer_port']}" == call["remote"], (span, call)
        assert span["http_status"] == call["status"], (span, call)
        assert inside(span, call), (span, call)
    [refused] = [c for c in calls if c["kind"] == "http_error"]
    assert refused["err"]
    [error_span] = [s for s in spans if s["func"] == HTTP_DO and s["error"]]
    assert (error_span["http_status"], error_span["http_host"]) == (0, "127.0.0.1:1")
    assert error_span["http_path"] == "/refused" and inside(error_span, refused)
    assert "peer_addr" not in error_span  # no connection was made
    assert not [s for s in spans if "QUERYSECRET" in json.dumps(s)]

    # gRPC: the full method and the code the server returned
    grpc_calls = [c for c in calls if c["kind"] == "grpc"]
    grpc = [s for s in spans if s["func"] == GRPC_INVOKE]
    assert Counter(s["rpc_status"] for s in grpc) == Counter(c["status"] for c in grpc_calls)
    assert sorted({c["status"] for c in grpc_calls}) == list(range(17))
    host, port = addrs["grpc"].rsplit(":", 1)
    assert {(s["peer_addr"], s["peer_port"]) for s in grpc} == {(host, int(port))}
    for span in grpc:
        assert span["rpc_method"] == "/apm.test.Echo/Unary"
        assert span["error"] == (span["rpc_status"] != 0)
        group = [c for c in grpc_calls if c["status"] == span["rpc_status"]]
        assert any(inside(span, c) for c in group), span

    # gRPC server streams: the method and the code the stream ended with
    stream_calls = [c for c in calls if c["kind"] == "grpc_stream"]
    streams = [s for s in spans if s["func"] == GRPC_STREAM]
    assert Counter(s["rpc_status"] for s in streams) == Counter(c["status"] for c in stream_calls)
    for span in streams:
        assert span["rpc_method"] == "/apm.test.Echo/Stream"
        assert span["error"] == (span["rpc_status"] != 0)
        group = [c for c in stream_calls if c["status"] == span["rpc_status"]]
        assert any(inside(span, c) for c in group), span

    # SQL: one span per statement (DB and Tx), operation, system, sanitized text, error
    sql_calls = [c for c in calls if c["kind"] == "sql"]
    sql = [s for s in spans if s.get("db_operation")]
    assert len(sql) == len(sql_calls) == CALLS * 4
    assert {s["db_system"] for s in sql} == {"postgresql"}
    assert Counter(s["db_operation"] for s in sql) == Counter(c["op"] for c in sql_calls)
    assert Counter(s["error"] for s in sql) == Counter(bool(c.get("err")) for c in sql_calls)
    shapes = Counter(s["db_statement"] for s in sql)
    assert shapes == {
        "INSERT INTO items (id, name) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET name = ?": CALLS,
        "SELECT name FROM items WHERE id = ? AND name <> ?": CALLS,
        "UPDATE items SET name = ? WHERE id = ?": CALLS,
        "SELECT * FROM no_such_table WHERE id = ?": CALLS,
    }, shapes
    sent_literals = {m for c in sql_calls for m in re.findall(r"SECRET-\d+|\d{6,}", c["sent"])}
    assert sent_literals
    text = json.dumps(spans)
    assert not [literal for literal in sent_literals if literal in text]
    for span in sql:
        assert any(inside(span, c) for c in sql_calls if c["op"] == span["db_operation"]), span


@pytest.mark.parametrize("toolchain", ["1.27", "1.19"])
def test_stripped_client_offset_tables_match_dwarf(client_targets: dict, toolchain: str) -> None:
    """The tables stripped binaries use are what DWARF says for the same build."""
    dwarf = dwarf_struct_offsets(client_targets[(toolchain, False)])
    assert dwarf is not None
    for (struct, member), offset in {**LIBRARY_TABLE, **GO_TABLE[toolchain]}.items():
        assert dwarf[struct][member] == offset, (struct, member)


def test_client_spans_reach_apm_spans_with_the_socket_they_used_as_their_peer(
    client_targets: dict, kafka_broker, postgres_url: str, tmp_path: Path
) -> None:
    """Through the join: a statement's peer is the socket lib/pq used (PostgreSQL's address
    and port), read from the network events of the calling goroutine; a gRPC call's is its
    connection's remote address, which the agent reads where the call opens its stream."""
    binary = client_targets[("1.27", False)]
    database = urlsplit(postgres_url)
    log = tmp_path / "join.log"
    bootstrap = kafka_broker.bootstrap_servers
    with started([str(binary), "-serve"]) as servers:
        assert servers.stdout is not None
        addrs = json.loads(servers.stdout.readline())
        command = [str(binary), "-http", addrs["http"], "-grpc", addrs["grpc"],
                   "-pg", postgres_url + "?sslmode=disable", "-calls", "8"]  # fmt: skip
        with started(command, stdin=subprocess.PIPE) as client:
            args = ["--pid", str(client.pid), "--bootstrap-servers", bootstrap,
                    "--node-name", "test-node"]  # fmt: skip
            with Agent(args) as agent:
                agent.wait_ready()
                join = start_join(bootstrap, log)
                try:
                    assert client.stdin is not None and client.stdout is not None
                    client.stdin.write("all\n")
                    client.stdin.close()
                    calls = [json.loads(line) for line in client.stdout][:-1]
                    spans: list[dict] = []
                    decode = outside_decoder()

                    def all_out() -> bool:
                        try:
                            found = asyncio.run(read_topic(bootstrap, "apm.spans", len(calls), 3))
                        except AssertionError:  # the join creates the topic with its output
                            return False
                        # (the session's broker holds other tests' spans too)
                        spans[:] = [s for r in found if (s := decode(r.value))["pid"] == client.pid]
                        return len(spans) >= len(calls)

                    wait_for(all_out, 60, "a span per call on apm.spans")
                finally:
                    stop_service(join, "join", log)
                assert agent.stop() == 0, agent.log
    assert len(spans) == len(calls) == 8 * 7 + 1
    sql = [s for s in spans if s["db_statement"] is not None]
    assert len(sql) == 32 and {s["span_kind"] for s in spans} == {"client"}
    assert {(s["peer_addr"], s["peer_port"]) for s in sql} == {(database.hostname, database.port)}
    assert all(s["bytes_sent"] > 0 and s["bytes_received"] > 0 for s in sql)
    # gRPC: the agent reads the call's connection (its I/O is on the transport's goroutines)
    grpc = [s for s in spans if s["rpc_method"] is not None]
    assert len(grpc) == 16
    remote = {c["remote"] for c in calls if c["kind"] == "grpc"}  # what grpc.Peer said
    assert remote == {addrs["grpc"]}
    assert {f"{s['peer_addr']}:{s['peer_port']}" for s in grpc} == remote
    # net/http: the connection the agent read where the request went out
    http = {s["http_path"]: s for s in spans if s["http_method"] is not None}
    for call in calls:
        if call["kind"] == "http":
            span = http[call["path"]]
            assert f"{span['peer_addr']}:{span['peer_port']}" == call["remote"]
    assert (http["/refused"]["peer_addr"], http["/refused"]["peer_port"]) == (None, None)
    http = [s for s in spans if s["http_host"] is not None]
    assert {s["http_host"] for s in http} == {addrs["http"], "127.0.0.1:1"}
    assert not [s for s in spans if "SECRET" in json.dumps(s)]
