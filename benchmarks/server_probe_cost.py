"""Server spans: uprobe hits per request, and what the span program costs per hit against an
empty program on the same probe points, for HTTP/1, HTTP/2 and gRPC.

The target is tests/targets/grpcserver (Go 1.27): gRPC (unary calls, its own client), HTTP/2
over TLS (net/http's h2 server, its own client) and HTTP/1 (plain requests from here to its
h2c port, which net/http serves as HTTP/1); and "tree", tests/targets/goserver's /fanout
handler with its named functions probed (each request: 2 goroutines that call one and start
one more goroutine that calls it: 8 spans of one trace). Every kind includes the
runtime.newproc1 probes that carry the trace context to new goroutines. For each kind, two
conditions on the same points
(the agent's own plan, resolve_target): (e) an empty BPF program (`return 0`), (p) the
project's span program attached as the agent attaches it, its ring drained concurrently.
The kernel's BPF statistics give each program's mean run time; the agent's trap
calibration gives the uprobe trap itself. Per hit:

    ratio = (trap + project program) / (trap + empty program)

the same ratio benchmarks/probe_overhead.py measures by wall time for a function probe
(target <= 1.2). Hits per request come from the span program's own per-process counters.
Exit status 1 on a failure (build, attach, missing spans).
"""

from __future__ import annotations

import argparse
import http.client
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench_support import BenchmarkError, measure_probe_cost

from ebpf_apm.producer.bpf_loader import AgentProbes, ProbeOptions
from ebpf_apm.producer.bpf_run_stats import RunTimeStats
from ebpf_apm.producer.targets import FunctionNames, resolve_target
from ebpf_apm.producer.trap_calibration import calibrate_trap_cost

REPO = Path(__file__).resolve().parent.parent
TARGET_RATIO = 1.2
KINDS = ("http1", "http2", "grpc", "tree")
# "tree": tests/targets/goserver's /fanout handler (2 goroutines, each calling a named
# function and starting one more goroutine that calls it), with those functions probed.
TREE_FUNCS = ["main.(*server).handleFanout", "main.fanoutWorker", "main.leafWork"]
TREE_SPANS_PER_REQUEST = 1 + 1 + 2 + 4


def build_target(name: str = "grpcserver") -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    go_builds = importlib.import_module("go_builds")
    out = go_builds.default_cache_dir() / "bench" / f"{name}-go1.27"
    try:
        source = go_builds.TARGETS_DIR / name
        gopath = name == "grpcserver"
        return Path(go_builds.build_go(source, out, "1.27", False, gopath=gopath))
    except go_builds.BuildError as exc:
        raise BenchmarkError(f"building {name}: {exc}") from exc


def send(binary: Path, addrs: dict[str, str], kind: str, requests: int) -> None:
    """`requests` requests of one kind, 4 at a time."""
    if kind == "tree":
        host, port = addrs["tree"].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        for i in range(requests):
            conn.request("GET", f"/fanout/{i}?n=2&ms=0")
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise BenchmarkError(f"/fanout answered {response.status}")
        conn.close()
        return
    if kind == "http1":
        host, port = addrs["h2c"].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        for i in range(requests):
            conn.request("GET", f"/http1/{i}?ms=0")
            response = conn.getresponse()
            response.read()
            if response.status != 200 or response.version != 11:
                raise BenchmarkError(f"HTTP/1 request answered {response.status}")
        conn.close()
        return
    client, flag, addr, asks = {
        "http2": ("h2tls", "-h2tls", addrs["h2tls"], "/http2/x?ms=0"),
        "grpc": ("unary", "-grpc", addrs["grpc"], "0,0"),
    }[kind]
    result = subprocess.run(
        [str(binary), "-client", client, flag, addr, "-asks", asks, "-calls", str(requests),
         "-workers", "4"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if result.returncode != 0 or '"err"' in result.stdout:
        raise BenchmarkError(f"{kind} client failed: {result.stderr or result.stdout[:300]}")


def measure_kind(
    binary: Path, addrs: dict[str, str], pid: int, kind: str, requests: int, trap_ns: float
) -> dict[str, float]:
    target = resolve_target(pid, TREE_FUNCS if kind == "tree" else [], FunctionNames(), http=True)
    rings = ("http_reader", "span_reader")
    cost = measure_probe_cost(target, lambda: send(binary, addrs, kind, requests), rings, trap_ns)
    return cost.per(requests, "request")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="per kind and condition")
    args = parser.parse_args(argv)
    try:
        binary = build_target()
        stats = RunTimeStats().open()
        server = subprocess.Popen([str(binary)], stdout=subprocess.PIPE, text=True)
        tree_server: subprocess.Popen[str] | None = None
        try:
            assert server.stdout is not None
            addrs = json.loads(server.stdout.readline())
            tree_server = subprocess.Popen(
                [str(build_target("goserver"))], stdout=subprocess.PIPE, text=True
            )
            assert tree_server.stdout is not None
            addrs["tree"] = tree_server.stdout.readline().split()[1]
            pids = {kind: server.pid for kind in KINDS} | {"tree": tree_server.pid}
            probes = AgentProbes(ProbeOptions())
            try:
                trap = calibrate_trap_cost(probes)
            finally:
                probes.close()
            print(
                f"server probe cost, {time.strftime('%Y-%m-%d %H:%M')}, {os.uname().release}: "
                f"grpcserver (Go 1.27), {args.requests:,} requests per kind and condition, "
                f"load average {os.getloadavg()[0]:.2f}\ntrap: {trap.describe()}"
            )
            print(
                f"\n{'kind':<6} {'hits/req':>8} {'spans/req':>9} {'empty ns/hit':>12} "
                f"{'project ns/hit':>14} {'ratio':>6}"
            )
            worst = 0.0
            for kind in KINDS:
                m = measure_kind(binary, addrs, pids[kind], kind, args.requests, trap.ns_per_hit)
                worst = max(worst, m["ratio"])
                print(
                    f"{kind:<6} {m['hits_per_request']:>8.2f} {m['spans_per_request']:>9.2f} "
                    f"{m['empty_ns']:>12,.0f} {m['project_ns']:>14,.0f} {m['ratio']:>6.3f}"
                )
                if abs(m["hits_per_request"] - m["empty_runs_per_request"]) > 0.5:
                    raise BenchmarkError(
                        f"{kind}: the empty program ran {m['empty_runs_per_request']:.2f} times "
                        f"per request, the project's {m['hits_per_request']:.2f}: "
                        "not the same points"
                    )
                want = TREE_SPANS_PER_REQUEST if kind == "tree" else 1
                if m["spans_per_request"] < want - 0.01:
                    raise BenchmarkError(f"{kind}: fewer spans than {want} per request")
            verdict = "target met" if worst <= TARGET_RATIO else "target NOT met"
            print(
                f"\nratio = (trap + project program) / (trap + empty program), per hit; "
                f"baseline: an empty program = 1.000; target <= {TARGET_RATIO}: {verdict}"
            )
        finally:
            for process in (server, tree_server):
                if process is None:
                    continue
                process.send_signal(signal.SIGTERM)
                process.wait(10)
                if process.stdout:
                    process.stdout.close()
            stats.close()
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
