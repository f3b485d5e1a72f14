"""Network events from the kernel against what the test's own sockets sent and received.

A Go server writes each response in flushed chunks with sleeps between them (the handler's
goroutine migrates between threads); raw-socket clients count every byte they send and
receive. Each socket event must carry the goroutine of the connection that made it, the
real byte count, and the connection's addresses and ports. BPF, root, no broker.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from agent_harness import CHUNKED_END, Connection, go_server, run_client

from ebpf_apm.producer.bpf_loader import AgentProbes, ProbeOptions
from ebpf_apm.producer.event_layout import NET_RECV, NET_SEND
from ebpf_apm.producer.targets import FunctionNames, attach_target, resolve_target

pytestmark = pytest.mark.bpf

HANDLE_CHUNKS = "main.(*server).handleChunks"


def trace(binary: Path, host: str, clients: int, per_client: int):
    """Serve `clients` raw connections under the agent's probes; returns the records."""
    with go_server(binary, addr=f"[{host}]:0" if ":" in host else f"{host}:0") as server:
        names = FunctionNames()
        target = resolve_target(server.pid, [HANDLE_CHUNKS], names)
        probes = AgentProbes(ProbeOptions(net_hooks="auto"))
        try:
            attach_target(probes, target)
            conns = [Connection() for _ in range(clients)]
            threads = [
                threading.Thread(
                    target=run_client, args=(server.host, server.port, c, per_client, i)
                )
                for i, c in enumerate(conns)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(0.1)
            assert probes.net_reader is not None
            net = probes.net_reader.drain()
            http = probes.http_reader.drain()
            spans = probes.span_reader.drain()
            counters = probes.counters()
        finally:
            probes.close()
        return server.port, conns, net, http, spans, counters, names


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def test_socket_events_match_the_bytes_on_the_wire(go_targets: dict, host: str) -> None:
    server_port, conns, net, http, spans, counters, names = trace(
        go_targets[("1.27", False)], host, clients=16, per_client=6
    )
    assert counters["net_ring_full"] == 0 and counters["ring_full"] == 0
    assert (net["goid"] > 0).all(), "every event of a Go process names its goroutine"
    by_port = {c.local_port: c for c in conns}
    events_by_port: dict[int, np.ndarray] = {}
    for port in by_port:
        events_by_port[port] = net[net["dport"] == port]
    assert sum(len(e) for e in events_by_port.values()) == len(net), "no stray events"
    family = 10 if ":" in host else 2
    local = socket.inet_pton(socket.AF_INET6 if family == 10 else socket.AF_INET, host)
    for port, conn in by_port.items():
        events = events_by_port[port]
        assert (events["family"] == family).all()
        assert (events["sport"] == server_port).all()
        assert all(bytes(a).ljust(16, b"\0")[: len(local)] == local for a in events["saddr"])
        sends = events[events["direction"] == NET_SEND]
        recvs = events[events["direction"] == NET_RECV]
        # One goroutine serves a keep-alive connection and writes every response. (Reads
        # may name another goroutine: net/http reads ahead on a background goroutine while
        # a handler runs, to notice a client hanging up.)
        assert len(set(sends["goid"].tolist())) == 1
        assert int(sends["bytes"].sum()) == sum(x.response_bytes for x in conn.exchanges)
        assert int(recvs["bytes"].sum()) == sum(len(x.request) for x in conn.exchanges)
        # Inside each request's HTTP span the goroutine sent all of the response but the
        # chunked trailer; net/http writes that in finishRequest after ServeHTTP returned,
        # and the record's flushed_ns says when that was done.
        goid = int(sends["goid"][0])
        mine = http[http["goid"] == goid]
        assert len(mine) == len(conn.exchanges)
        for span, exchange in zip(np.sort(mine, order="start_ns"), conn.exchanges, strict=True):
            start, end, flushed = span["start_ns"], span["ts_ns"], span["flushed_ns"]
            assert exchange.start_ns <= start and end <= exchange.end_ns and end <= flushed
            inside = sends[(sends["ts_ns"] >= start) & (sends["ts_ns"] <= end)]
            assert int(inside["bytes"].sum()) == exchange.response_bytes - CHUNKED_END
            through = sends[(sends["ts_ns"] >= start) & (sends["ts_ns"] <= flushed)]
            assert int(through["bytes"].sum()) == exchange.response_bytes
    assert len(spans) == 16 * 6
    assert set(names.names) >= {HANDLE_CHUNKS}


def test_migrating_goroutines_keep_their_events(go_targets: dict) -> None:
    """Events of one goroutine come from several threads: the key is the goroutine."""
    _, conns, net, http, spans, _, _ = trace(
        go_targets[("1.19", True)], "127.0.0.1", clients=16, per_client=4
    )
    threads_per_goroutine = defaultdict(set)
    for event in net[net["direction"] == NET_SEND]:
        threads_per_goroutine[int(event["goid"])].add(int(event["tid"]))
    assert len(threads_per_goroutine) == 16
    assert any(len(tids) > 1 for tids in threads_per_goroutine.values())
    assert len(spans) == 16 * 4 and len(http) == 16 * 4


def test_calls_that_never_return_are_swept(go_targets: dict) -> None:
    """A handler that panics leaves through no RET: its entry must not stay forever."""
    with go_server(go_targets[("1.27", True)]) as server:
        target = resolve_target(server.pid, ["main.(*server).handlePanic"], FunctionNames())
        probes = AgentProbes(ProbeOptions(net_hooks="off"))
        try:
            attach_target(probes, target)
            for _ in range(7):
                with pytest.raises(Exception):  # noqa: B017 - the server drops the connection
                    server.get("/panic")
            assert server.get("/health")[0] == 200
            assert probes.sweep_abandoned_calls(older_than_ns=3_600 * 10**9) == 0
            # handlePanic's 7 calls and ServeHTTP's 7 (the panic unwinds through it too)
            assert probes.sweep_abandoned_calls(older_than_ns=0) == 14
            assert probes.sweep_abandoned_calls(older_than_ns=0) == 0
        finally:
            probes.close()


def test_probes_of_an_exited_process_are_removed(go_targets: dict) -> None:
    """Detaching after the process exited must not leak its uprobes (by-path lookups fail
    then: /proc/PID/exe is gone)."""
    probes = AgentProbes(ProbeOptions(net_hooks="off"))
    try:
        for _ in range(3):
            with go_server(go_targets[("1.19", False)]) as server:
                target = resolve_target(server.pid, [], FunctionNames())
                attach_target(probes, target)
                assert probes.attached_uprobes > 0
                pid = server.pid
            probes.detach_process(pid)  # after the server has exited
            assert probes.attached_uprobes == 0
    finally:
        probes.close()
