"""The agent's probe CPU estimate beside the extra CPU a Go service really spent under it.

Each round runs tests/targets/goserver (Go 1.27) twice under the same fixed load
(`--requests` keep-alive GETs of `--path` from `--clients` threads of this process):

  (a) without the agent;
  (b) with `ebpf-apm agent --pid SERVER` (its defaults: HTTP spans, socket I/O hooks),
      publishing to an embedded broker.

The service's CPU is the sum of `sum_exec_runtime` (user + system, ns) over its threads in
/proc/PID/task/*/schedstat, read just before and just after the load. Measured extra CPU =
(b) - (a). The agent's estimate for (b) is the `probe cost: pid N hits H cpu C s` part of its
totals line: BPF run time (kernel statistics) plus hits x the trap cost it calibrated at
start. Target: the estimate within 25% of the measurement (medians over the rounds).

Exit status 1 only on a failure (build, agent, a failed request, no estimate printed).
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench_support import REPO, BenchmarkError, build_goserver, process_cpu_ns

from ebpf_apm.kafka.embedded_broker import EmbeddedBroker

TARGET = 0.25





class Server:
    def __init__(self, binary: Path) -> None:
        self.process = subprocess.Popen(
            [str(binary), "-addr", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        if line[:1] != ["LISTEN"]:
            self.stop()
            raise BenchmarkError(f"goserver printed {line!r}")
        self.host, port = line[1].rsplit(":", 1)
        self.port = int(port)
        self.pid = self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def load(server: Server, requests: int, clients: int, path: str) -> None:
    """`requests` GETs over `clients` keep-alive connections; every one must answer 200."""
    counts = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
    errors: list[str] = []

    def client(n: int) -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        try:
            for _ in range(n):
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    errors.append(f"GET {path}: {response.status}")
                    return
        except OSError as exc:
            errors.append(f"GET {path}: {exc}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in counts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchmarkError(errors[0])


def measured_load(server: Server, args: argparse.Namespace) -> int:
    before = process_cpu_ns(server.pid)
    load(server, args.requests, args.clients, args.path)
    return process_cpu_ns(server.pid) - before


@dataclass
class AgentRun:
    cpu_ns: int  # the service's CPU under the load
    estimate_s: float
    hits: int
    trap: str


def without_agent(binary: Path, args: argparse.Namespace) -> int:
    server = Server(binary)
    try:
        return measured_load(server, args)
    finally:
        server.stop()


def with_agent(binary: Path, args: argparse.Namespace, bootstrap: str) -> AgentRun:
    server = Server(binary)
    agent = None
    try:
        command = [sys.executable, "-m", "ebpf_apm.cli", "agent", "--pid", str(server.pid)]
        command += ["--bootstrap-servers", bootstrap, "--node-name", "bench"]
        agent = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert agent is not None and agent.stderr is not None
            for line in agent.stderr:
                lines.append(line)
                if "tracing " in line and "process(es)" in line:
                    ready.set()
            ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        if not ready.wait(120) or agent.poll() is not None:
            raise BenchmarkError("the agent did not start:\n" + "".join(lines))
        cpu = measured_load(server, args)
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(60)
        reader.join(10)
        log = "".join(lines)
        if code != 0:
            raise BenchmarkError(f"the agent exited {code}:\n{log}")
        totals = re.search(rf"probe cost: pid {server.pid} hits (\d+) cpu ([\d.]+) s", log)
        trap = re.search(r"uprobe trap cost on this node: ([\d.]+ us per hit)", log)
        if totals is None or trap is None:
            raise BenchmarkError(f"the agent printed no probe cost for pid {server.pid}:\n{log}")
        return AgentRun(cpu, float(totals.group(2)), int(totals.group(1)), trap.group(1))
    finally:
        if agent is not None:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
            if agent.stderr is not None:
                agent.stderr.close()
        server.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--path", default="/health")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        binary = build_goserver()
        print(
            f"probe cost accuracy, {time.strftime('%Y-%m-%d %H:%M')}, {os.uname().release}: "
            f"goserver (Go 1.27), {args.requests:,} x GET {args.path} from {args.clients} "
            f"clients, {args.rounds} rounds, load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        measured, estimated = [], []
        with EmbeddedBroker() as broker:
            for r in range(args.rounds):
                base = without_agent(binary, args)
                run = with_agent(binary, args, broker.bootstrap_servers)
                extra = (run.cpu_ns - base) / 1e9
                measured.append(extra)
                estimated.append(run.estimate_s)
                print(
                    f"  round {r + 1}: service CPU {base / 1e9:.3f} s without the agent, "
                    f"{run.cpu_ns / 1e9:.3f} s with it: measured extra {extra:.3f} s; "
                    f"agent's estimate {run.estimate_s:.3f} s ({run.hits:,} hits, trap "
                    f"{run.trap}); estimate/measured {run.estimate_s / extra:.2f}",
                    flush=True,
                )
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    m, e = statistics.median(measured), statistics.median(estimated)
    ratio = e / m
    print(f"\n{'(medians)':<34} {'CPU s':>8} {'us per request':>15}")
    for label, value in (("measured extra CPU of the service", m), ("agent's estimate", e)):
        print(f"{label:<34} {value:>8.3f} {value / args.requests * 1e6:>15.1f}")
    verdict = "met" if abs(ratio - 1) <= TARGET else "NOT met"
    print(f"estimate/measured = {ratio:.2f}; target within {TARGET:.0%}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
