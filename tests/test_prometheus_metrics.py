"""A real Prometheus scrapes the real agent, join and aggregate while a Go server is traced.

Ground truth is what the test does: it sends REQUESTS requests, each sleeping SLEEP_MS in
its handler. Prometheus's query API must show exactly REQUESTS span events acknowledged by
Kafka for the agent, REQUESTS spans acknowledged on apm.spans for the join, and the route's
latency (p50/p99 of its latest window) at the sleep plus a little. Then the broker is frozen
(SIGSTOP): every service's /readyz turns 503 naming Kafka while /healthz stays 200, and all
are ready again after SIGCONT. BPF (root), a real broker (Tansu), Debian's Prometheus.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from agent_harness import Agent, go_server
from prometheus_harness import http_get, prometheus_server, wait_until

from ebpf_apm.kafka.embedded_broker import EmbeddedBroker, free_port

pytestmark = [pytest.mark.bpf, pytest.mark.integration]

REPO = Path(__file__).resolve().parent.parent
REQUESTS = 37  # odd, so an off-by-one or a double count shows
SLEEP_MS = 40
SERVICES = ("agent", "join", "aggregate")


@contextmanager
def consumer(command: str, log: Path, *flags: str) -> Iterator[subprocess.Popen[bytes]]:
    """`ebpf-apm COMMAND` in a child process, stopped by its pid."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ebpf_apm.cli", command, *flags],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=out,
            stderr=out,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def ready(address: str) -> tuple[int, str]:
    return http_get(f"http://{address}/readyz")


def test_prometheus_sees_acked_spans_and_route_latency_and_readiness_follows_the_broker(
    go_targets: dict[tuple[str, bool], Path], tmp_path: Path
) -> None:
    addresses = {name: f"127.0.0.1:{free_port()}" for name in SERVICES}
    with ExitStack() as stack:
        broker = stack.enter_context(EmbeddedBroker())
        kafka = ["--bootstrap-servers", broker.bootstrap_servers]
        server = stack.enter_context(go_server(go_targets[("1.27", False)]))
        agent = stack.enter_context(
            Agent(
                [
                    "--pid",
                    str(server.pid),
                    "--node-name",
                    "prom-node",
                    "--metrics-address",
                    addresses["agent"],
                    *kafka,
                ]
            )
        )
        stack.enter_context(
            consumer(
                "join",
                tmp_path / "join.log",
                *kafka,
                "--metrics-address",
                addresses["join"],
                "--session-timeout-ms",
                "6000",
                "--idle-advance-ms",
                "500",
                "--allowed-lateness-ms",
                "1000",
            )
        )
        stack.enter_context(
            consumer(
                "aggregate",
                tmp_path / "aggregate.log",
                *kafka,
                "--metrics-address",
                addresses["aggregate"],
                "--storage",
                f"sqlite:///{tmp_path / 'windows.sqlite'}",
                "--window",
                "2s",
                "--lateness",
                "1s",
                "--idle-timeout",
                "1s",
                "--session-timeout",
                "6s",
            )
        )
        prom = stack.enter_context(prometheus_server(tmp_path / "prometheus", addresses))
        agent.wait_ready()
        for name, address in addresses.items():
            wait_until(lambda a=address: ready(a)[0] == 200, 60, f"{name} ready: {ready(address)}")

        with ThreadPoolExecutor(4) as pool:
            statuses = list(
                pool.map(lambda _: server.get(f"/sleep?ms={SLEEP_MS}")[0], range(REQUESTS))
            )
        assert statuses == [200] * REQUESTS

        acked = 'ebpf_apm_agent_events_total{stream="spans",outcome="acked"}'
        wait_until(lambda: prom.scalar(acked) == REQUESTS, 60, f"{acked} == {REQUESTS}")
        assert prom.scalar('ebpf_apm_agent_events_total{stream="spans",outcome="read"}') == (
            REQUESTS
        )
        assert prom.scalar('ebpf_apm_agent_events_total{stream="spans",outcome="dropped"}') == 0
        assert prom.scalar("ebpf_apm_agent_traced_processes") == 1
        joined = 'ebpf_apm_consumer_records_total{service="join",topic="apm.spans",outcome="acked"}'
        wait_until(lambda: prom.scalar(joined) == REQUESTS, 60, f"{joined} == {REQUESTS}")
        aggregated = 'ebpf_apm_aggregate_spans_total{outcome="aggregated"}'
        wait_until(lambda: prom.scalar(aggregated) == REQUESTS, 60, f"{aggregated} == {REQUESTS}")
        batches = (
            'ebpf_apm_consumer_records_total{service="aggregate",topic="apm.span.batches",'
            'outcome="read"}'
        )
        assert 1 <= prom.scalar(batches) <= REQUESTS, "the spans come in batch messages"

        route = 'operation=~"GET /sleep.*"'
        spans = f"sum(ebpf_apm_latency_window_spans{{{route}}})"
        wait_until(lambda: prom.scalar(spans), 60, "a closed window of the route in Prometheus")
        # Spans of the route may split over two windows; the latest one holds some of them.
        assert 0 < (prom.scalar(spans) or 0) <= REQUESTS
        sleep_s = SLEEP_MS / 1000
        for quantile in ("0.5", "0.99"):
            found = prom.query(f'ebpf_apm_latency_window_seconds{{{route},quantile="{quantile}"}}')
            assert len(found) == 1, found
            # At least the sleep (less the sketch's 1% relative error), at most a loaded
            # machine's scheduling on top of it.
            assert sleep_s * 0.99 <= found[0][1] <= sleep_s + 0.060, (quantile, found)
            print(f"p{quantile} of the route in Prometheus: {found[0][1] * 1000:.2f} ms")
        written = prom.scalar("ebpf_apm_windows_written_total")
        assert written is not None and written >= 1
        assert all(prom.targets_up().values()), prom.targets_up()

        # The broker frozen: not ready (naming Kafka), still alive; back after SIGCONT.
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            for name, address in addresses.items():
                status, body = wait_until(
                    lambda a=address: (r := ready(a))[0] == 503 and "kafka: " in r[1] and r,
                    20,
                    f"{name} not ready while the broker is frozen",
                )
                assert "unreachable" in body or "no answer" in body, body
                assert http_get(f"http://{address}/healthz")[0] == 200, name
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        for name, address in addresses.items():
            wait_until(
                lambda a=address: ready(a)[0] == 200, 60, f"{name} ready again: {ready(address)}"
            )
        # Prometheus saw it too: each service reported Kafka down during the freeze, up now.
        seen = 'min by (service) (min_over_time(ebpf_apm_dependency_up{dependency="kafka"}[2m]))'
        assert {r[0]["service"]: r[1] for r in prom.query(seen)} == dict.fromkeys(SERVICES, 0.0)
        now = 'min by (service) (ebpf_apm_dependency_up{dependency="kafka"})'
        wait_until(
            lambda: (
                {r[0]["service"]: r[1] for r in prom.query(now)} == dict.fromkeys(SERVICES, 1.0)
            ),
            30,
            "Prometheus to scrape Kafka up again from every service",
        )
