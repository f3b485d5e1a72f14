"""The tree of spans: trace ids, span ids and parents from the kernel, through goroutines.

tests/targets/goserver's /fanout/ID?n=K handler (main.(*server).handleFanout) starts K
goroutines; each runs main.fanoutWorker, which calls main.leafWork and starts one more
goroutine that calls main.leafWork. The test chooses K per request, so it knows each
request's whole tree: the HTTP server span (root), handleFanout under it on the same
goroutine, K fanoutWorker spans under that, two leafWork spans under each worker (one on the
worker's goroutine, one on the goroutine it started). 16 clients send concurrently, and the
sleeps let goroutines migrate between threads. Every id comes from the kernel; the test
checks the chain, the nesting in time, and that no two requests share a trace.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict

import numpy as np
import pytest
from agent_harness import Agent, Request, go_server, read_spans, send_concurrently

from ebpf_apm.producer import go_binary, server_probes
from ebpf_apm.producer.bpf_loader import AgentProbes, ProbeOptions
from ebpf_apm.producer.map_layout import HEADER_MAP_BUCKETS, HEADER_MAP_SWISS, SITE_FLAG_SPAWN
from ebpf_apm.producer.server_probes import CREATOR_TABLE, creator_offsets, traceparent_fields
from ebpf_apm.producer.targets import FunctionNames, attach_target, resolve_target

pytestmark = [pytest.mark.bpf, pytest.mark.integration]

SERVE_HTTP = "net/http.serverHandler.ServeHTTP"
FANOUT = "main.(*server).handleFanout"
WORKER = "main.fanoutWorker"
LEAF = "main.leafWork"
REQUESTS = 48


def traceparent(rid: int) -> tuple[str, str]:
    """A W3C trace id and parent id the test sends with request `rid`."""
    digest = hashlib.sha256(f"request {rid}".encode()).hexdigest()
    return digest[:32], digest[32:48]


def fanout_requests() -> list[Request]:
    """Request rid starts rid % 3 + 1 workers (2 ms sleeps in each leaf); every fourth one
    arrives with a traceparent header (and a few other header fields)."""
    requests = []
    for rid in range(REQUESTS):
        request = Request(rid, "GET", f"/fanout/{rid}", f"n={rid % 3 + 1}&ms=2", 2, 200)
        if rid % 4 == 0:
            trace, parent = traceparent(rid)
            request.headers = {"traceparent": f"00-{trace}-{parent}-01", "Accept": "*/*",
                               "X-Request-Id": str(rid)}  # fmt: skip
        requests.append(request)
    return requests


def spans_per_request(workers: int) -> int:
    return 2 + 3 * workers  # server, handleFanout, the workers and two leaves each


def check_tree(spans: list[dict], requests: list[Request]) -> None:
    by_id = {s["span_id"]: s for s in spans}
    assert len(by_id) == len(spans), "span ids are unique"
    assert all(len(s["span_id"]) == 16 and len(s["trace_id"]) == 32 for s in spans)
    by_trace: dict[str, list[dict]] = defaultdict(list)
    for span in spans:
        by_trace[span["trace_id"]].append(span)
    servers = [s for s in spans if s["func"] == SERVE_HTTP]
    assert sorted(s["http_path"] for s in servers) == sorted(r.path for r in requests)
    assert len({s["trace_id"] for s in servers}) == len(servers), "a trace per request"
    workers_of = {r.path: int(r.query.split("&")[0][2:]) for r in requests}
    sent = {r.path: traceparent(r.rid) for r in requests if r.headers}
    for server in servers:
        assert server["span_kind"] == "server"
        if server["http_path"] in sent:  # continues the caller's trace, under its span
            assert (server["trace_id"], server["parent_span_id"]) == sent[server["http_path"]]
        else:
            assert server["parent_span_id"] is None  # a new trace
        tree = by_trace[server["trace_id"]]
        k = workers_of[server["http_path"]]
        funcs = Counter(s["func"] for s in tree)
        assert funcs == {SERVE_HTTP: 1, FANOUT: 1, WORKER: k, LEAF: 2 * k}
        for span in tree:
            if span is server:
                continue
            parent = by_id[span["parent_span_id"]]
            # Nested by time: every child starts after its parent and ends before it (the
            # handler and the workers wait for the goroutines they start).
            assert parent["start_ns"] <= span["start_ns"] <= span["end_ns"] <= parent["end_ns"]
            expected_parent = {FANOUT: SERVE_HTTP, WORKER: FANOUT, LEAF: WORKER}[span["func"]]
            assert parent["func"] == expected_parent, (span, parent)
            assert span["span_kind"] == "internal"
        fanout = next(s for s in tree if s["func"] == FANOUT)
        assert fanout["goid"] == server["goid"]  # the same goroutine: nested calls
        for worker in (s for s in tree if s["func"] == WORKER):
            assert worker["goid"] != fanout["goid"]  # a goroutine the handler started
            leaves = [s for s in tree if s["parent_span_id"] == worker["span_id"]]
            # One leaf on the worker's goroutine, one on the goroutine the worker started.
            assert sorted(leaf["goid"] == worker["goid"] for leaf in leaves) == [False, True]
    assert len(spans) == sum(spans_per_request(workers_of[r.path]) for r in requests)


@pytest.mark.parametrize(
    "toolchain,stripped",
    [("1.27", False), ("1.27", True), ("1.19", False), ("1.19", True)],
    ids=["go1.27", "go1.27-stripped", "go1.19", "go1.19-stripped"],
)
def test_goroutines_a_request_starts_are_its_descendants(
    go_targets: dict, kafka_broker, toolchain: str, stripped: bool
) -> None:
    requests = fanout_requests()
    with go_server(go_targets[(toolchain, stripped)]) as server:
        args = ["--pid", str(server.pid), "--func", FANOUT, "--func", WORKER, "--func", LEAF]
        args += ["--bootstrap-servers", kafka_broker.bootstrap_servers, "--node-name", "tree"]
        with Agent(args) as agent:
            agent.wait_ready()
            send_concurrently(server, requests, clients=16)
            expected = sum(spans_per_request(rid % 3 + 1) for rid in range(REQUESTS))
            spans = read_spans(kafka_broker.bootstrap_servers, server.pid, expected)
            assert agent.stop() == 0, agent.log
    assert "returns without entry 0, read failures 0" in agent.log, agent.log
    assert all(r.got_status == 200 for r in requests)
    check_tree(spans, requests)
    migrated = sum(s["tid"] != s["end_tid"] for s in spans)
    print(f"{len(spans)} spans in {len(requests)} trees; {migrated} returned on another thread")


@pytest.mark.bpf
@pytest.mark.parametrize("creator", ["return-only", "entry-and-return"])
def test_trace_contexts_follow_goroutines_and_are_forgotten_when_the_process_goes(
    go_targets: dict, creator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways of following newproc1: its RETs alone (g0.m.curg known: DWARF or the
    table) and, for a Go release the table does not know, its entry and RETs."""
    if creator == "entry-and-return":
        monkeypatch.setattr(server_probes, "CREATOR_TABLE", {})
    probes = AgentProbes(ProbeOptions(net_hooks="off"))
    try:
        with go_server(go_targets[("1.27", True)]) as server:
            pid = server.pid
            names = FunctionNames()
            target = resolve_target(pid, [FANOUT, WORKER, LEAF], names)
            spawn = [fn for fn in target.functions if fn.server_flags == SITE_FLAG_SPAWN]
            assert [fn.returns_only for fn in spawn] == [creator == "return-only"]
            attach_target(probes, target)
            assert server.get("/fanout/1?n=3&ms=1")[0] == 200
            # The workers' goroutines keep the context they were given; a request still
            # running when the process goes would leave its goroutine's context behind.
            assert probes.kernel_entries(pid)["goroutine_contexts"] > 0
            records = probes.span_reader.drain()
            while len(records) < 1 + 3 + 6:  # handleFanout, 3 workers, 6 leaves
                more = probes.span_reader.drain()
                assert len(more), f"{len(records)} span records"
                records = np.concatenate([records, more])
        probes.detach_process(pid)
        left = probes.kernel_entries(pid)
        for table in ("goroutine_contexts", "spawning", "calls_in_flight"):
            assert left[table] == 0, table
    finally:
        probes.close()
    funcs = {names.id_of(name): name for name in (FANOUT, WORKER, LEAF)}
    by_func = {name: records[records["func_id"] == fid] for fid, name in funcs.items()}
    (fanout,) = by_func[FANOUT]
    assert set(by_func[WORKER]["parent_span_id"].tolist()) == {int(fanout["span_id"])}
    workers = Counter(by_func[LEAF]["parent_span_id"].tolist())
    assert workers == dict.fromkeys(by_func[WORKER]["span_id"].tolist(), 2)
    assert len({bytes(t) for t in records["trace_id"]}) == 1


@pytest.mark.parametrize("toolchain", ["1.27", "1.19"])
def test_fixed_runtime_offsets_are_what_dwarf_says(
    go_targets: dict, toolchain: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel reads Go's map internals at fixed offsets (bpf/probe_maps.h HEADER_MAP_*),
    and stripped binaries find newproc1's caller through CREATOR_TABLE."""
    maps = {"1.19": ("runtime.hmap", "B", 9, "buckets", 16),
            "1.27": ("internal/runtime/maps.Map", "dirLen", 24, "dirPtr", 16)}  # fmt: skip
    struct, a, a_at, b, b_at = maps[toolchain]
    monkeypatch.setitem(go_binary.WANTED_MEMBERS, struct, (a, b))
    dwarf = go_binary.dwarf_struct_offsets(go_targets[(toolchain, False)])
    assert dwarf is not None
    assert dwarf[struct] == {a: a_at, b: b_at}
    assert (dwarf["runtime.g"]["m"], dwarf["runtime.m"]["curg"]) == CREATOR_TABLE[toolchain]
    stripped = go_binary.go_layout(go_targets[(toolchain, True)])
    assert creator_offsets(stripped) == CREATOR_TABLE[toolchain]
    expected_map = HEADER_MAP_SWISS if toolchain == "1.27" else HEADER_MAP_BUCKETS
    assert traceparent_fields(stripped) == (dwarf["net/http.Request"]["Header"], expected_map)
