"""Client spans: uprobe hits per call, and what the span program costs per hit against an
empty program on the same probe points, for outgoing HTTP requests, gRPC calls and SQL.

The target is tests/targets/goclient (Go 1.27) in client mode, calling its own servers
(goclient -serve: HTTP/1 and gRPC) and a PostgreSQL server started here
(tests/postgres_fixture.py). A round of one kind is asked on its stdin ("http", "grpc",
"grpc_stream", "sql"): `--calls` calls from 4 goroutines (SQL: 4 statements per call, 2 by
DB, 1 in a transaction, 1 failing). For each kind, two conditions on the same points (the
agent's own plan, resolve_target): (e) an empty BPF program (`return 0`), (p) the project's
span program attached as the agent attaches it, its client ring drained concurrently. Per
hit:

    ratio = (trap + project program) / (trap + empty program)

as benchmarks/server_probe_cost.py measures it for server spans (target <= 1.2). Hits per
call come from the span program's own per-process counters; spans per call from the client
ring. Exit status 1 on a failure (build, attach, database, missing spans).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_support import BenchmarkError, measure_probe_cost

from ebpf_apm.producer.bpf_loader import AgentProbes, ProbeOptions
from ebpf_apm.producer.bpf_run_stats import RunTimeStats
from ebpf_apm.producer.targets import FunctionNames, resolve_target
from ebpf_apm.producer.trap_calibration import calibrate_trap_cost

REPO = Path(__file__).resolve().parent.parent
TARGET_RATIO = 1.2
#: kind -> client records per call of a round
KINDS = {"http": 1, "grpc": 1, "grpc_stream": 1, "sql": 4}


def _tests_module(name: str) -> Any:
    sys.path.insert(0, str(REPO / "tests"))
    return importlib.import_module(name)


def build_target() -> Path:
    go_builds = _tests_module("go_builds")
    out = go_builds.default_cache_dir() / "bench" / "goclient-go1.27"
    try:
        source = go_builds.TARGETS_DIR / "goclient"
        return Path(go_builds.build_go(source, out, "1.27", False, gopath=True))
    except go_builds.BuildError as exc:
        raise BenchmarkError(f"building goclient: {exc}") from exc


class Client:
    """goclient in client mode: one round of calls per `run`."""

    def __init__(self, binary: Path, addrs: dict[str, str], dsn: str, calls: int) -> None:
        self.calls = calls
        self.process = subprocess.Popen(
            [str(binary), "-http", addrs["http"], "-grpc", addrs["grpc"], "-pg", dsn,
             "-calls", str(calls), "-workers", "4"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def run(self, kind: str) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(kind + "\n")
        self.process.stdin.flush()
        failed = 0
        for line in self.process.stdout:
            call = json.loads(line)
            if call["kind"] == "round":
                break
            failed += bool(call.get("err")) and "no_such_table" not in call["err"]
        else:
            raise BenchmarkError(f"goclient exited: {self.process.wait()}")
        if failed:
            raise BenchmarkError(f"{kind}: {failed} calls failed")

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()


def measure_kind(client: Client, kind: str, trap_ns: float) -> dict[str, float]:
    target = resolve_target(client.process.pid, [], FunctionNames(), http=True)
    cost = measure_probe_cost(target, lambda: client.run(kind), ("client_reader",), trap_ns)
    return cost.per(client.calls * KINDS[kind], "call")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="per kind and condition")
    args = parser.parse_args(argv)
    postgres = None
    try:
        binary = build_target()
        postgres = _tests_module("postgres_fixture").PostgresServer().start()
        dsn = postgres.create_database() + "?sslmode=disable"
        stats = RunTimeStats().open()
        server = subprocess.Popen([str(binary), "-serve"], stdout=subprocess.PIPE, text=True)
        client = None
        try:
            assert server.stdout is not None
            addrs = json.loads(server.stdout.readline())
            client = Client(binary, addrs, dsn, args.calls)
            probes = AgentProbes(ProbeOptions())
            try:
                trap = calibrate_trap_cost(probes)
            finally:
                probes.close()
            print(
                f"client probe cost, {time.strftime('%Y-%m-%d %H:%M')}, {os.uname().release}: "
                f"goclient (Go 1.27), {args.calls:,} calls per kind and condition "
                f"(SQL: 4 statements each), load average {os.getloadavg()[0]:.2f}\n"
                f"trap: {trap.describe()}"
            )
            print(
                f"\n{'kind':<5} {'hits/call':>9} {'spans/call':>10} {'empty ns/hit':>12} "
                f"{'project ns/hit':>14} {'ratio':>6}"
            )
            worst = 0.0
            for kind in KINDS:
                m = measure_kind(client, kind, trap.ns_per_hit)
                worst = max(worst, m["ratio"])
                print(
                    f"{kind:<11} {m['hits_per_call']:>9.2f} {m['spans_per_call']:>10.2f} "
                    f"{m['empty_ns']:>12,.0f} {m['project_ns']:>14,.0f} {m['ratio']:>6.3f}"
                )
                if abs(m["hits_per_call"] - m["empty_runs_per_call"]) > 0.5:
                    raise BenchmarkError(
                        f"{kind}: the empty program ran {m['empty_runs_per_call']:.2f} times "
                        f"per call, the project's {m['hits_per_call']:.2f}: not the same points"
                    )
                if m["spans_per_call"] < 0.99:
                    raise BenchmarkError(f"{kind}: fewer spans than calls")
            verdict = "target met" if worst <= TARGET_RATIO else "target NOT met"
            print(
                f"\nratio = (trap + project program) / (trap + empty program), per hit; "
                f"baseline: an empty program = 1.000; target <= {TARGET_RATIO}: {verdict}"
            )
        finally:
            if client is not None:
                client.close()
            server.send_signal(signal.SIGTERM)
            server.wait(10)
            if server.stdout:
                server.stdout.close()
            stats.close()
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if postgres is not None:
            postgres.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
