"""ebpf_apm.telemetry and the consumers' telemetry: the HTTP endpoints, readiness reasons,
the broker probe against a real broker (Tansu), lag-based readiness of a real consumer group,
and the aggregator's latest-window gauges."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import yaml
from kafka_fixtures import unique_topic
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ebpf_apm import cli
from ebpf_apm.consumers.aggregate_metrics import STALE_WINDOWS, LatestWindows
from ebpf_apm.consumers.consumer_telemetry import ConsumerTelemetry
from ebpf_apm.consumers.kafka_io import AckedOutput, GroupInput
from ebpf_apm.consumers.latency_sketch import LatencySketch
from ebpf_apm.consumers.latency_store import LatencyRow
from ebpf_apm.consumers.route_template import SeriesKey
from ebpf_apm.consumers.window_aggregator import ClosedWindow
from ebpf_apm.kafka.admin import ensure_topics
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.embedded_broker import EmbeddedBroker, free_port
from ebpf_apm.kafka.reachability import broker_unreachable
from ebpf_apm.telemetry import (
    METRICS_ADDRESS_ENV,
    MetricsAddressError,
    MetricsServer,
    parse_metrics_address,
)

S = 1_000_000_000
REPO = Path(__file__).resolve().parent.parent


async def get(server: MetricsServer, path: str) -> tuple[int, str]:
    assert server.bound is not None
    host, port = server.bound
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{host}:{port}{path}") as response,
    ):
        return response.status, await response.text()


class _Fixed(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("ebpf_apm_test_answer", "a registered collector", value=41)


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:0", ("::1", 0)), (":9", ("0.0.0.0", 9))],
)
def test_metrics_addresses_parse(address: str, expected: tuple[str, int]) -> None:
    assert parse_metrics_address(address) == expected


@pytest.mark.parametrize("address", ["9464", "host:port", "host:70000", ""])
def test_bad_metrics_addresses_say_what_is_expected(address: str) -> None:
    with pytest.raises(MetricsAddressError, match="expected HOST:PORT"):
        parse_metrics_address(address)


def test_metrics_health_and_readiness_over_http() -> None:
    async def main() -> None:
        server = MetricsServer(
            "unit", "127.0.0.1:0", stall_after_s=0.5, probe_interval_s=0.05, probe_timeout_s=0.2
        )
        server.register(_Fixed())
        state = {"partitions": False, "broker": "down", "hang": False}
        server.require("partitions", lambda: None if state["partitions"] else "no partitions")

        async def broker() -> str | None:
            if state["hang"]:
                await asyncio.sleep(60)
            return None if state["broker"] == "up" else "refused"

        server.probe("kafka", broker)
        async with server:
            status, text = await get(server, "/readyz")
            assert status == 503
            assert "not ready: unit: starting" in text and "no partitions" in text
            assert (await get(server, "/healthz"))[0] == 200  # starting counts as alive
            server.turned()
            state["partitions"] = True
            await asyncio.sleep(0.2)
            status, text = await get(server, "/readyz")
            assert (status, text) == (503, "not ready: kafka: refused\n")
            state["broker"] = "up"
            await asyncio.sleep(0.2)
            server.turned()
            assert await get(server, "/readyz") == (200, "ready\n")
            metrics = (await get(server, "/metrics"))[1]
            assert "ebpf_apm_test_answer 41.0" in metrics
            assert 'ebpf_apm_dependency_up{dependency="kafka",service="unit"} 1.0' in metrics
            state["hang"] = True  # a probe that never answers is cut off and reported
            await asyncio.sleep(1.4)
            status, text = await get(server, "/readyz")
            assert status == 503 and "kafka: no answer within 1.2 s" in text, text
            # The loop has not turned for over 0.5 s: not alive, and so not ready either.
            status, text = await get(server, "/healthz")
            assert status == 503 and "loop has not turned" in text
            server.turned()
            assert (await get(server, "/healthz"))[0] == 200

    asyncio.run(main())


def test_a_taken_port_is_a_clear_error() -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(MetricsAddressError, match=f"cannot serve metrics on .*:{port}"):
                async with MetricsServer("unit", f"127.0.0.1:{port}"):
                    pass

    asyncio.run(main())


@pytest.mark.integration
def test_the_broker_probe_answers_only_while_a_broker_serves(kafka_broker: EmbeddedBroker) -> None:
    live = KafkaConnection(kafka_broker.bootstrap_servers)
    assert asyncio.run(broker_unreachable(live, 2.0)) is None
    closed = KafkaConnection(f"127.0.0.1:{free_port()}")
    reason = asyncio.run(broker_unreachable(closed, 2.0))
    assert reason is not None and "ConnectionRefusedError" in reason and str(closed) in reason
    # One live server of the bootstrap list is enough.
    both = KafkaConnection(f"{closed},{kafka_broker.bootstrap_servers}")
    assert asyncio.run(broker_unreachable(both, 2.0)) is None


@pytest.mark.integration
def test_a_consumer_is_ready_only_when_assigned_and_caught_up(
    kafka_broker: EmbeddedBroker,
) -> None:
    connection = KafkaConnection(kafka_broker.bootstrap_servers)
    topic = unique_topic("telemetry")

    async def until(condition: object, what: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():  # type: ignore[operator]
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.1)

    async def main() -> None:
        await ensure_topics(connection, {topic: 1})
        output = AckedOutput(connection, client_id="telemetry-test")
        await output.start()
        group = GroupInput(
            connection, group=unique_topic("g"), topics=(topic,), client_id="telemetry-test"
        )
        server = MetricsServer("unit", None, probe_interval_s=0.1)
        await server.start()  # nothing served, but the probes run
        telemetry = ConsumerTelemetry("unit", server, connection, ready_max_lag=10)
        try:
            assert "input: not connected yet" in server.not_ready()
            await group.start()
            telemetry.watch(group)
            server.turned()
            while not group.assignment():
                await group.poll(100)
            await output.deliver(topic, [(None, b"x")] * 3)
            read = 0
            while read < 3:
                read += sum(map(len, (await group.poll(200)).values()))
            await until(lambda: telemetry.lags() == {(topic, 0): 0}, "lag 0 after reading")
            await until(lambda: server.not_ready() == [], f"ready: {server.not_ready()}")
            # 23 records arrive that the service does not poll: the background fetch learns
            # the new high watermark, the position stays: 23 behind, more than 10.
            await output.deliver(topic, [(None, b"y")] * 23)
            await until(lambda: telemetry.lags().get((topic, 0)) == 23, "lag 23")
            (reason,) = server.not_ready()
            assert reason == (
                f"input: 1 partition(s) more than 10 records behind (worst {topic}/0: 23)"
            )
        finally:
            await telemetry.stop()
            await server.stop()
            await group.stop()
            await output.stop(5)

    asyncio.run(main())


def _row(operation: str, window: int, durations_ms: list[int]) -> LatencyRow:
    sketch = LatencySketch()
    sketch.add(np.array([d * 1_000_000 for d in durations_ms], dtype=np.int64))
    start = 1_700_000_000 * S + window * 10 * S
    return LatencyRow.of(
        SeriesKey("shop", operation, "2xx"), ClosedWindow(0, start, start + 10 * S, sketch)
    )


def test_latest_windows_show_each_series_newest_window_in_seconds_and_forget_stale_ones() -> None:
    latest = LatestWindows(10 * S)
    latest.update([_row("GET /a", 0, [100] * 9 + [900]), _row("GET /b", 0, [20])])
    latest.update([_row("GET /a", 1, [50, 50, 50])])
    latest.update([_row("GET /a", 0, [1])])  # an older window (a replay) does not win
    families = {f.name: f for f in latest.collect()}
    samples = {
        (s.labels["operation"], s.labels.get("quantile")): s.value
        for s in families["ebpf_apm_latency_window_seconds"].samples
    }
    assert samples[("GET /a", "0.5")] == pytest.approx(0.050, rel=0.01)
    assert samples[("GET /b", "0.99")] == pytest.approx(0.020, rel=0.01)
    spans = {
        s.labels["operation"]: s.value for s in families["ebpf_apm_latency_window_spans"].samples
    }
    assert spans == {"GET /a": 3, "GET /b": 1}
    sums = {
        s.labels["operation"]: s.value
        for s in families["ebpf_apm_latency_window_sum_seconds"].samples
    }
    assert sums["GET /a"] == pytest.approx(0.150)
    # GET /b's window ends STALE_WINDOWS windows before the newest: kept; one more: gone.
    latest.update([_row("GET /a", STALE_WINDOWS, [5])])
    assert len(latest) == 2
    latest.update([_row("GET /a", STALE_WINDOWS + 1, [5])])
    assert len(latest) == 1


@pytest.mark.parametrize("command", ["agent", "join", "aggregate", "alert"])
def test_every_long_running_command_refuses_a_bad_metrics_address(
    command: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """From the flag or, without it, from $EBPF_APM_METRICS_ADDRESS: exit 2 before starting."""
    config = yaml.safe_load_all((REPO / "deploy" / "base" / "config.yaml").read_text())
    rules = next(d["data"]["alert-rules.yaml"] for d in config if "alert-rules.yaml" in d["data"])
    (tmp_path / "rules.yaml").write_text(rules)
    extra = {"agent": ["--pid", "1"], "alert": ["--rules", str(tmp_path / "rules.yaml")]}
    argv = [command, *extra.get(command, [])]
    assert cli.main([*argv, "--metrics-address", "9464"]) == 2
    assert "error: bad metrics address '9464': expected HOST:PORT" in capsys.readouterr().err
    monkeypatch.setenv(METRICS_ADDRESS_ENV, "localhost")
    assert cli.main(argv) == 2
    assert "error: bad metrics address 'localhost'" in capsys.readouterr().err
