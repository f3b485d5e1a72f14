"""What the metrics endpoint costs the agent: its CPU with /metrics scraped every second,
beside the same agent, in the same run, not scraped.

    Go server (tests/targets/goserver) <- steady HTTP load (keep-alive, --rate requests/s)
      traced by `ebpf-apm agent --metrics-address` -> embedded broker (Tansu)
    phases of --seconds each, alternating "scraped every 1 s" and "not scraped" (the order
    rotates every round): the agent's CPU time per second of each phase, summed over all its
    threads from /proc/PID/task/*/schedstat (nanoseconds, not 10 ms ticks)

The scraper fetches /metrics the way Prometheus does: one GET a second, on a kept-alive
connection. Every phase checks that the agent acknowledged the spans the load made (none
lost), so both conditions carry the same work. Exit status 1 only on a failure.
"""

from __future__ import annotations

import argparse
import http.client
import signal
import statistics
import subprocess
import sys
import threading
import time

from bench_support import REPO, BenchmarkError, build_goserver, process_cpu_ns
from prometheus_client.parser import text_string_to_metric_families

from ebpf_apm.kafka.embedded_broker import EmbeddedBroker, free_port


class Load(threading.Thread):
    """GET /health at a steady rate on one kept-alive connection."""

    def __init__(self, port: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.port, self.interval = port, 1.0 / rate
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        next_at = time.monotonic()
        while not self.stop.is_set():
            conn.request("GET", "/health")
            conn.getresponse().read()
            self.sent += 1
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        conn.close()


class Scraper(threading.Thread):
    """GET /metrics once a second while `on` is set, as Prometheus would."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        host, port = address.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=5)
        self.on = threading.Event()
        self.stop = threading.Event()
        self.scrapes = 0
        self.bytes = 0
        self.seconds: list[float] = []

    def get(self, path: str) -> tuple[int, bytes]:
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        return response.status, response.read()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.on.is_set():
                started = time.perf_counter()
                status, body = self.get("/metrics")
                self.seconds.append(time.perf_counter() - started)
                if status != 200:
                    raise BenchmarkError(f"/metrics answered {status}")
                self.scrapes += 1
                self.bytes = len(body)
            time.sleep(1.0)


def acked_spans(body: bytes) -> int:
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "ebpf_apm_agent_events_total" and sample.labels == {
                "stream": "spans",
                "outcome": "acked",
            }:
                return int(sample.value)
    raise BenchmarkError("the agent's /metrics has no acked span count")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of one phase")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of phases")
    parser.add_argument("--rate", type=float, default=200.0, help="HTTP requests per second")
    args = parser.parse_args()
    binary = build_goserver()
    address = f"127.0.0.1:{free_port()}"
    with EmbeddedBroker() as broker:
        server = subprocess.Popen(
            [str(binary), "-addr", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True
        )
        agent = None
        try:
            assert server.stdout is not None
            listen = server.stdout.readline().split()
            if listen[:1] != ["LISTEN"]:
                raise BenchmarkError(f"goserver printed {listen!r}")
            port = int(listen[1].rsplit(":", 1)[1])
            agent = subprocess.Popen(
                [
                    sys.executable, "-m", "ebpf_apm.cli", "agent", "--pid", str(server.pid),
                    "--bootstrap-servers", broker.bootstrap_servers,
                    "--metrics-address", address,
                ],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            scraper = Scraper(address)
            deadline = time.monotonic() + 120
            while True:
                try:
                    if scraper.get("/readyz")[0] == 200:
                        break
                except OSError:
                    scraper.conn.close()
                if time.monotonic() > deadline or agent.poll() is not None:
                    raise BenchmarkError("the agent did not become ready within 120 s")
                time.sleep(0.5)
            load = Load(port, args.rate)
            load.start()
            scraper.start()
            time.sleep(2.0)  # the load settles
            per_condition: dict[str, list[float]] = {"scraped": [], "not scraped": []}
            for round_ in range(args.rounds):
                order = ["scraped", "not scraped"]
                if round_ % 2:
                    order.reverse()
                for condition in order:
                    if condition == "scraped":
                        scraper.on.set()
                    else:
                        scraper.on.clear()
                    time.sleep(0.5)  # a scrape under way ends inside its own phase
                    before, started = process_cpu_ns(agent.pid), time.monotonic()
                    time.sleep(args.seconds)
                    used = process_cpu_ns(agent.pid) - before
                    per_condition[condition].append(used / (time.monotonic() - started) / 1e6)
            scraper.on.clear()
            load.stop.set()
            load.join(15)
            time.sleep(1.0)  # the last batch leaves within the agent's 200 ms flush delay
            acked = acked_spans(scraper.get("/metrics")[1])
            if acked != load.sent:
                raise BenchmarkError(f"the load sent {load.sent} requests, agent acked {acked}")
            scraper.stop.set()
        finally:
            for process in (agent, server):
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    try:
                        process.wait(30)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()
    scraped = statistics.median(per_condition["scraped"])
    quiet = statistics.median(per_condition["not scraped"])
    print(f"agent tracing a Go server at {args.rate:g} requests/s; {args.rounds} rounds of "
          f"{args.seconds:g} s per condition; {load.sent} spans, all acknowledged")  # fmt: skip
    print(f"{'condition':<28}{'agent CPU ms/s (median)':>26}{'rounds':>40}")
    for name, key in (("not scraped (baseline)", "not scraped"), ("scraped every 1 s", "scraped")):
        rounds = ", ".join(f"{v:.1f}" for v in per_condition[key])
        print(f"{name:<28}{statistics.median(per_condition[key]):>26.2f}{rounds:>40}")
    extra = scraped - quiet
    print(
        f"cost of scraping: {extra:+.2f} ms CPU per second ({extra / quiet * 100:+.1f}% of the "
        f"baseline) = {extra:.2f} ms per scrape; /metrics is {scraper.bytes} bytes, answered "
        f"in {statistics.median(scraper.seconds) * 1000:.1f} ms (median of {scraper.scrapes})"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
