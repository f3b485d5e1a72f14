"""HTTP/2 and gRPC server spans against a real Go server, kernel and broker.

tests/targets/grpcserver serves gRPC (google.golang.org/grpc), HTTP/2 over TLS (net/http's
own h2 server) and HTTP/2 cleartext (golang.org/x/net/http2 through h2c), and is its own
client: it prints what every call asked for, what came back and when it started and ended.
That is the ground truth: exactly one server span per call, with the method or path and the
status or code the handler was told to return, inside the client's own timing.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_harness import Agent, end_process, process_alive, read_spans
from go_builds import Toolchain, build_variants

from ebpf_apm.producer.go_binary import dwarf_struct_offsets
from ebpf_apm.producer.server_probes import GO_TABLE, LIBRARY_TABLE

pytestmark = [pytest.mark.bpf, pytest.mark.integration]

HANDLE_STREAM = "google.golang.org/grpc.(*Server).handleStream"
CLOCK_SLACK_NS = 2_000_000  # epoch timestamps are converted from the kernel clock
VARIANTS: list[tuple[Toolchain, bool]] = [
    ("1.27", False),
    ("1.27", True),
    ("1.19", False),
    ("1.19", True),
]
# Every gRPC code, each with its own sleep: a span's group is (method, code).
GRPC_ASKS = [f"{5 + code},{code}" for code in range(17)]
HTTP_STATUSES = (200, 201, 404, 503)


@pytest.fixture(scope="session")
def grpc_targets(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    return build_variants(
        "grpcserver", tmp_path_factory.mktemp("grpcserver"), VARIANTS, gopath=True
    )


@dataclass
class Servers:
    process: subprocess.Popen[str]
    binary: Path
    addrs: dict[str, str]

    def client(self, kind: str, asks: list[str], calls: int, workers: int = 16) -> list[dict]:
        """Run the binary's client mode; one dict per call (ask, code, start_ns, end_ns)."""
        addr = self.addrs["grpc" if kind in ("unary", "stream") else kind]
        flag = "-grpc" if kind in ("unary", "stream") else f"-{kind}"
        result = subprocess.run(
            [str(self.binary), "-client", kind, flag, addr, "-asks", ";".join(asks),
             "-calls", str(calls), "-workers", str(workers)],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        calls_made = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(calls_made) == calls, result.stderr
        assert not [c for c in calls_made if c.get("err")], calls_made[:3]
        return calls_made


@contextmanager
def servers(binary: Path) -> Iterator[Servers]:
    process = subprocess.Popen([str(binary)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield Servers(process, binary, json.loads(process.stdout.readline()))
    finally:
        end_process(process)


def traceparent(seed: str) -> tuple[str, str]:
    """A W3C trace id and parent id for one request."""
    digest = hashlib.sha256(seed.encode()).hexdigest()
    return digest[:32], digest[32:48]


# The server's function returns after its last frame is written (runHandler after the final
# flush, handleStream after the status): on this loaded 2-core machine the client can read its
# answer and stop its clock first, by more than the clock slack.
RETURN_SLACK_NS = 50_000_000


def check_inside(span: dict, calls: list[dict], min_ns: int) -> None:
    """The span lasted at least `min_ns` and fits inside one of the client's calls."""
    assert span["duration_ns"] >= min_ns, span
    assert any(
        span["start_ns"] >= c["start_ns"] - CLOCK_SLACK_NS
        and span["end_ns"] <= c["end_ns"] + RETURN_SLACK_NS
        for c in calls
    ), (span, calls)


@pytest.mark.parametrize(
    "toolchain,stripped", VARIANTS, ids=["go1.27", "go1.27-stripped", "go1.19", "go1.19-stripped"]
)
def test_grpc_and_http2_calls_yield_one_correct_server_span_each(
    grpc_targets: dict, kafka_broker, toolchain: str, stripped: bool
) -> None:
    unary_calls, stream_calls = 68, 34
    # Every other request carries a W3C traceparent (after '#': the client sends it as the
    # header): its span continues that trace.
    http_asks = {
        kind: [
            f"/{kind}/{i}?ms=3&status={HTTP_STATUSES[i % 4]}"
            + ("#00-{}-{}-01".format(*traceparent(f"{kind}/{i}")) if i % 2 else "")
            for i in range(32)
        ]
        for kind in ("h2tls", "h2c")
    }
    with servers(grpc_targets[(toolchain, stripped)]) as srv:
        args = ["--pid", str(srv.process.pid), "--bootstrap-servers",
                kafka_broker.bootstrap_servers, "--node-name", "test-node"]  # fmt: skip
        with Agent(args) as agent:
            agent.wait_ready()
            calls = {
                "unary": srv.client("unary", GRPC_ASKS, unary_calls),
                "stream": srv.client("stream", [a + ",3" for a in GRPC_ASKS], stream_calls),
            }
            for kind, asks in http_asks.items():
                calls[kind] = srv.client(kind, asks, len(asks))
            expected = unary_calls + stream_calls + 64
            spans = read_spans(kafka_broker.bootstrap_servers, srv.process.pid, expected)
            assert agent.stop() == 0, agent.log
        assert process_alive(srv.process.pid)
    assert "lost in kernel (ring full) 0" in agent.log, agent.log
    # Every offset read worked, and ServeHTTP's returns of HTTP/2 streams (whose entries
    # leave the span to runHandler) are not counted as lost entries.
    assert "returns without entry 0, read failures 0" in agent.log, agent.log

    rpc = [s for s in spans if s.get("rpc_method")]
    assert all(s["func"] == HANDLE_STREAM and s["span_kind"] == "server" for s in rpc)
    for kind, method in (("unary", "/apm.test.Echo/Unary"), ("stream", "/apm.test.Echo/Stream")):
        mine = [s for s in rpc if s["rpc_method"] == method]
        asked = Counter(c["code"] for c in calls[kind])
        assert Counter(s["rpc_status"] for s in mine) == asked, (kind, mine[:3])
        assert sorted(asked) == list(range(17))  # every code, OK and each error
        for span in mine:
            group = [c for c in calls[kind] if c["code"] == span["rpc_status"]]
            check_inside(span, group, (5 + span["rpc_status"]) * 1_000_000)
    assert len(rpc) == unary_calls + stream_calls

    sent_paths = [a.split("?")[0][1:] for asks in http_asks.values() for a in asks]
    traces = {traceparent(path)[0] for path in sent_paths}
    for kind in http_asks:
        mine = [s for s in spans if s.get("http_path", "").startswith(f"/{kind}/")]
        by_path = {c["ask"].split("?")[0]: c for c in calls[kind]}
        assert Counter(s["http_path"] for s in mine) == Counter(list(by_path)), kind  # one each
        for span in mine:
            call = by_path[span["http_path"]]
            assert span["http_method"] == "GET", span
            assert span["http_status"] == call["code"], (span, call)
            assert span["span_kind"] == "server"
            check_inside(span, [call], 3_000_000)
            if "#" in call["ask"]:
                sent = traceparent(span["http_path"][1:])
                assert (span["trace_id"], span["parent_span_id"]) == sent, (span, call)
            else:
                assert span["parent_span_id"] is None and span["trace_id"] not in traces
        assert sum("#" in c["ask"] for c in calls[kind]) == 16


@pytest.mark.parametrize("toolchain", ["1.27", "1.19"])
def test_stripped_offset_tables_match_dwarf(grpc_targets: dict, toolchain: str) -> None:
    """The tables stripped binaries use are what DWARF says for the same build."""
    dwarf = dwarf_struct_offsets(grpc_targets[(toolchain, False)])
    assert dwarf is not None
    table = {**LIBRARY_TABLE, **GO_TABLE[toolchain]}
    for (struct, member), offset in table.items():
        assert dwarf[struct][member] == offset, (struct, member)
