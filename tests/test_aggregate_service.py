"""`ebpf-apm aggregate` against a real broker (Tansu) and real databases, in a subprocess.

Spans are produced into a fresh apm.spans topic with the real codec; the ground truth is
computed here from the same spans.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from kafka_fixtures import read_topic, unique_topic
from postgres_fixture import PostgresServer

from ebpf_apm import cli
from ebpf_apm.consumers import query_command
from ebpf_apm.consumers import tail_command as topic_tail
from ebpf_apm.consumers.latency_sketch import LatencySketch
from ebpf_apm.consumers.latency_store import LatencyRow, open_store
from ebpf_apm.consumers.route_template import OVERFLOW_OPERATION, SeriesKey
from ebpf_apm.kafka.admin import ensure_topics
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.embedded_broker import EmbeddedBroker
from ebpf_apm.schemas.avro_codec import codec

pytestmark = pytest.mark.integration
# Shared fixtures, until tests/conftest.py provides them to every module.

REPO = Path(__file__).resolve().parent.parent
S = 1_000_000_000
SPAN = codec("span.avsc")
LATENCY = codec("latency.avsc")
QS = (0.5, 0.9, 0.95, 0.99, 0.999)
ROUTES = ["/api/user/{}", "/api/order/{}/items", "/health"]


# -- input and ground truth -------------------------------------------------------------


def make_spans(t0: int, windows: range, per_window: int, seed: int) -> list[dict[str, Any]]:
    """Spans whose end times fill the given 1 s windows, in time order."""
    rng = random.Random(seed)
    spans = []
    for w in windows:
        for i in range(per_window):
            end = t0 + w * S + (i * S) // per_window + rng.randrange(S // per_window)
            duration = max(1, int(rng.lognormvariate(math.log(3e6), 1.3)))
            pid = 100 + rng.randrange(6)
            http = rng.random() < 0.5
            k8s = pid % 2 == 0
            spans.append(
                {
                    "span_id": f"{rng.getrandbits(128):032x}",
                    "node": f"node-{pid % 3}",
                    "pid": pid,
                    "exe": f"/srv/bin/app{pid % 3}",
                    "tid": pid,
                    "goid": i,
                    "func": "net/http.serverHandler.ServeHTTP"
                    if http
                    else rng.choice(["main.load", "main.save", "main.(*db).Query"]),
                    "start_ns": end - duration,
                    "end_ns": end,
                    "duration_ns": duration,
                    "http_method": rng.choice(["GET", "POST"]) if http else None,
                    "http_path": rng.choice(ROUTES).format(rng.randrange(10**6)) if http else None,
                    "http_status": rng.choice([200, 200, 200, 404, 503, 0]) if http else None,
                    "k8s_namespace": "prod" if k8s else None,
                    "k8s_pod": f"api-{pid}" if k8s else None,
                    "k8s_container": "api" if k8s else None,
                    "k8s_workload": "api" if k8s else None,
                    "bytes_sent": 0,
                    "bytes_received": 0,
                    "net_sends": 0,
                    "net_recvs": 0,
                }
            )
    return spans


def key_of(span: dict[str, Any]) -> SeriesKey:
    """The series definition, restated independently of the service's code."""
    if span["k8s_workload"]:
        workload = f"{span['k8s_namespace']}/{span['k8s_workload']}"
    else:
        workload = os.path.basename(span["exe"])
    if span["http_method"] is None:
        return SeriesKey(workload, span["func"], None)
    route = "/".join("{id}" if p.isdigit() else p for p in span["http_path"].split("/"))
    status = span["http_status"]
    status_class = f"{status // 100}xx" if 100 <= status <= 599 else "unknown"
    return SeriesKey(workload, f"{span['http_method']} {route}", status_class)


def truth(spans: list[dict[str, Any]]) -> dict[tuple[str, int], np.ndarray]:
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for span in spans:
        groups[(key_of(span).series, span["end_ns"] // S * S)].append(span["duration_ns"])
    return {k: np.sort(np.array(v, dtype=np.int64)) for k, v in groups.items()}


async def produce(bootstrap: str, topic: str, values: list[tuple[bytes, bytes]]) -> None:
    await ensure_topics(KafkaConnection(bootstrap), {topic: 4})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=10, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in values]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def messages(spans: list[dict[str, Any]]) -> list[tuple[bytes, bytes]]:
    return [(f"{s['node']}/{s['pid']}".encode(), SPAN.encode(s)) for s in spans]


# -- the service in a subprocess --------------------------------------------------------


class Aggregator:
    """`ebpf-apm aggregate` with its own topics, group and storage."""

    def __init__(
        self,
        tmp: Path,
        bootstrap: str,
        topics: dict[str, str],
        storage: str,
        group: str,
        *extra: str,
    ) -> None:
        self.storage = storage
        self.log = tmp / f"aggregate-{group}-{time.monotonic_ns()}.log"
        command = [
            sys.executable,
            "-m",
            "ebpf_apm",
            "aggregate",
            "--bootstrap-servers",
            bootstrap,
            "--storage",
            storage,
            "--group",
            group,
            "--spans-topic",
            topics["spans"],
            "--latency-topic",
            topics["latency"],
            "--deadletter-topic",
            topics["deadletter"],
            "--window",
            "1s",
            "--lateness",
            "2s",
            "--idle-timeout",
            "3s",
            "--session-timeout",
            "2s",
            *extra,
        ]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(
        self,
        condition: Callable[[list[LatencyRow]], bool],
        timeout_s: float = 60,
        *,
        alive: bool = True,
    ) -> list[LatencyRow]:
        deadline = time.monotonic() + timeout_s
        while True:
            rows = stored_rows(self.storage) if storage_exists(self.storage) else []
            if condition(rows):
                return rows
            if alive and self.process.poll() is not None:
                pytest.fail(f"aggregator exited {self.process.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"no matching rows within {timeout_s} s:\n{self.output()}")
            time.sleep(0.2)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def storage_exists(url: str) -> bool:
    return not url.startswith("sqlite:///") or Path(url[len("sqlite:///") :]).exists()


def stored_rows(url: str) -> list[LatencyRow]:
    async def read() -> list[LatencyRow]:
        store = await open_store(url)
        try:
            return await store.rows(0, 2**62)
        finally:
            await store.close()

    return asyncio.run(read())


def windows_of(rows: list[LatencyRow]) -> set[int]:
    return {r.window_start_ns for r in rows}


def new_topics() -> dict[str, str]:
    return {name: unique_topic(f"apm.{name}") for name in ("spans", "latency", "deadletter")}


def epoch_second_now() -> int:
    return time.time_ns() // S * S


# -- tests --------------------------------------------------------------------------------


def test_spans_become_stored_and_published_windows(
    kafka_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    bootstrap, topics = kafka_broker.bootstrap_servers, new_topics()
    t0 = epoch_second_now() - 60 * S
    spans = make_spans(t0, range(6), 300, seed=1)
    # One workload over the cap of 30 series (the others have at most 27): all in one
    # partition, so which series come first is known: f0..f29 get series, f30..f39 go to
    # the overflow series.
    capped = [
        dict(
            spans[0],
            exe="/bin/capped",
            k8s_workload=None,
            http_method=None,
            http_path=None,
            http_status=None,
            func=f"f{i}",
            end_ns=t0 + 2 * S + i,
            pid=999,
            node="n9",
            duration_ns=1000 + i,
        )
        for i in range(40)
    ]
    garbage = [(b"n1/1", b"not avro"), (b"n1/2", SPAN.header + b"\x01")]
    asyncio.run(produce(bootstrap, topics["spans"], messages(spans) + garbage + messages(capped)))
    db = f"sqlite:///{tmp_path / 'latency.sqlite'}"
    aggregator = Aggregator(
        tmp_path, bootstrap, topics, db, "g1", "--max-series-per-workload", "30"
    )
    expected = truth(spans)
    rows = aggregator.wait_for(lambda rows: windows_of(rows) >= {t0 + w * S for w in range(6)})
    assert aggregator.stop() == 0, aggregator.output()

    by_key = {(r.series, r.window_start_ns): r for r in rows}
    for (series, start), durations in expected.items():
        row = by_key[(series, start)]
        assert (row.count, row.sum, row.min, row.max) == (
            durations.size,
            int(durations.sum()),
            int(durations[0]),
            int(durations[-1]),
        )
        assert row.window_end_ns == start + S
        for q, estimate in zip(QS, (row.p50, row.p90, row.p95, row.p99, row.p999), strict=True):
            exact = int(durations[math.floor(q * (durations.size - 1))])
            assert abs(estimate - exact) <= 0.01 * exact, (series, q, estimate, exact)
        assert LatencySketch.from_bytes(row.sketch).count == row.count
    capped_rows = {r.operation: r.count for r in rows if r.workload == "capped"}
    assert capped_rows == {**{f"f{i}": 1 for i in range(30)}, OVERFLOW_OPERATION: 10}
    assert len(rows) == len(expected) + len(capped_rows)
    assert "series refused by the cap 10" in aggregator.output()

    # apm.latency carries the same windows, Avro with the contract's schema.
    published = asyncio.run(read_topic(bootstrap, topics["latency"], len(rows)))
    records = [LATENCY.decode(r.value or b"") for r in published]
    assert sorted(records, key=lambda r: (r["series"], r["window_start_ns"])) == [
        row.as_dict() for row in rows
    ]
    assert {r.key.decode() for r in published if r.key} == {row.series for row in rows}
    (shown,) = topic_tail.TOPICS["apm.latency"].decode(published[0].value or b"")
    assert shown["sketch"] == records[0]["sketch"].hex()  # `ebpf-apm tail apm.latency`
    # The two undecodable messages went to the dead-letter topic with a reason.
    dead = asyncio.run(read_topic(bootstrap, topics["deadletter"], 2))
    assert sorted(r.value for r in dead) == sorted(v for _, v in garbage)
    headers = [dict(r.headers) for r in dead]
    assert all("Avro" in h["reason"].decode() for h in headers), headers
    assert all(h["source"].decode().startswith(f"{topics['spans']}/") for h in headers)


@pytest.mark.parametrize("crash", ["sigkill-mid-stream", "sigkill-between-write-and-commit"])
def test_a_crash_and_restart_store_the_rows_of_an_uninterrupted_run(
    crash: str, kafka_broker: EmbeddedBroker, tmp_path: Path, postgres_url: str
) -> None:
    """SQLite for the run that crashes, PostgreSQL for the reference, or the other way."""
    bootstrap, topics = kafka_broker.bootstrap_servers, new_topics()
    sqlite = f"sqlite:///{tmp_path / 'latency.sqlite'}"
    crashing, reference = (
        (sqlite, postgres_url) if crash.startswith("sigkill-mid") else (postgres_url, sqlite)
    )
    t0 = epoch_second_now() - 120 * S
    first, second = make_spans(t0, range(10), 400, 7), make_spans(t0, range(10, 20), 400, 8)
    asyncio.run(produce(bootstrap, topics["spans"], messages(first)))

    if crash == "sigkill-mid-stream":
        run = Aggregator(tmp_path, bootstrap, topics, crashing, "crashing")
        run.wait_for(lambda rows: len(rows) > 0)  # written windows, open ones behind them
        run.kill()
    else:
        run = Aggregator(
            tmp_path, bootstrap, topics, crashing, "crashing", "--crash-after-writes", "1"
        )
        run.wait_for(lambda rows: len(rows) > 0, alive=False)
        run.process.wait(30)
        assert run.process.returncode == -signal.SIGKILL, run.output()
    written_before = windows_of(stored_rows(crashing))
    assert written_before and max(written_before) < t0 + 9 * S  # windows were still open
    asyncio.run(produce(bootstrap, topics["spans"], messages(second)))
    all_windows = {t0 + w * S for w in range(20)}
    restarted = Aggregator(tmp_path, bootstrap, topics, crashing, "crashing")
    after_crash = restarted.wait_for(lambda rows: windows_of(rows) >= all_windows)
    assert restarted.stop() == 0
    if crash == "sigkill-between-write-and-commit":
        # The restart re-read the spans of the windows written before the crash and left
        # them out as late: they were in storage already.
        late = [int(m) for m in re.findall(r"late (\d+)", restarted.output())]
        assert late and late[-1] > 0, restarted.output()

    uninterrupted = Aggregator(tmp_path, bootstrap, topics, reference, "reference")
    expected = uninterrupted.wait_for(lambda rows: windows_of(rows) >= all_windows)
    assert uninterrupted.stop() == 0
    assert len(after_crash) == len(truth(first + second))
    assert after_crash == expected  # every column, the sketch bytes included


def test_query_merges_stored_windows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t0 = epoch_second_now() - 600 * S
    spans = make_spans(t0, range(30), 200, seed=3)
    expected = truth(spans)
    rows = []
    for (series, start), durations in expected.items():
        sketch = LatencySketch()
        sketch.add(durations)
        workload, operation, status = series.split("|")
        from ebpf_apm.consumers.window_aggregator import ClosedWindow

        key = SeriesKey(workload, operation, status or None)
        rows.append(LatencyRow.of(key, ClosedWindow(0, start, start + S, sketch)))
    db = f"sqlite:///{tmp_path / 'q.sqlite'}"

    async def write() -> None:
        store = await open_store(db)
        await store.write(rows, consumer="x", window_ns=S, watermark_ns=0)
        await store.close()

    asyncio.run(write())
    parser = argparse.ArgumentParser()
    query_command.add_arguments(parser)
    since, until = str((t0 + 5 * S) / S), str((t0 + 25 * S) / S)
    args = parser.parse_args(
        [
            "--storage",
            db,
            "--since",
            since,
            "--until",
            until,
            "--json",
            "--workload",
            "prod/*",
            "--operation",
            "GET /api/user/{id}",
        ]
    )
    assert query_command.run(args) == 0
    import json

    (result,) = json.loads(capsys.readouterr().out)
    chosen = np.sort(
        np.concatenate(
            [
                np.array([s["duration_ns"]])
                for s in spans
                if key_of(s).workload == "prod/api"
                and key_of(s).operation == "GET /api/user/{id}"
                and t0 + 5 * S <= s["end_ns"] // S * S < t0 + 25 * S
            ]
        )
    )
    assert result["workload"] == "prod/api" and result["count"] == chosen.size
    assert (result["sum"], result["min"], result["max"]) == (
        int(chosen.sum()),
        int(chosen[0]),
        int(chosen[-1]),
    )
    for q, name in zip(QS, ("p50", "p90", "p95", "p99", "p999"), strict=True):
        exact = int(chosen[math.floor(q * (chosen.size - 1))])
        assert abs(result[name] - exact) <= 0.01 * exact
    # Table output, and the errors.
    assert (
        query_command.run(parser.parse_args(["--storage", db, "--since", since, "--until", until]))
        == 0
    )
    table = capsys.readouterr().out
    assert "GET /api/user/{id}" in table and "p99 ms" in table
    assert cli.main(["query", "--storage", db, "--since", "yesterday"]) == 2
    assert "bad time" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'none.sqlite'}"
    assert cli.main(["query", "--storage", missing]) == 1


def test_bad_settings_exit_2_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["aggregate", "--window", "10x"]) == 2
    assert "bad duration '10x'" in capsys.readouterr().err
    db = f"sqlite:///{tmp_path / 'w.sqlite'}"

    async def seed() -> None:
        store = await open_store(db)
        await store.write([], consumer="ebpf-apm-aggregate", window_ns=S, watermark_ns=0)
        await store.close()

    asyncio.run(seed())
    args = ["--storage", db, "--window", "10s", "--bootstrap-servers", "127.0.0.1:1"]
    assert cli.main(["aggregate", *args]) == 2
    assert "use the same --window" in capsys.readouterr().err


def test_a_database_outage_is_waited_out_and_every_window_written(
    kafka_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """PostgreSQL stops mid-run and starts again: the aggregator waits (no exit), says what
    it waits for once, then writes every window; the counts equal the spans sent."""
    bootstrap, topics = kafka_broker.bootstrap_servers, new_topics()
    t0 = epoch_second_now() - 120 * S
    first, second = make_spans(t0, range(6), 300, 11), make_spans(t0, range(6, 12), 300, 12)
    server = PostgresServer().start()
    try:
        storage = server.create_database()
        asyncio.run(produce(bootstrap, topics["spans"], messages(first)))
        aggregator = Aggregator(tmp_path, bootstrap, topics, storage, "db-outage")
        aggregator.wait_for(lambda rows: len(rows) > 0)
        server.pause()
        asyncio.run(produce(bootstrap, topics["spans"], messages(second)))
        deadline = time.monotonic() + 60
        while "waiting for storage" not in aggregator.output():
            assert aggregator.process.poll() is None, aggregator.output()
            assert time.monotonic() < deadline, aggregator.output()
            time.sleep(0.2)
        time.sleep(2)  # a few retries while the server is away
        assert aggregator.process.poll() is None, aggregator.output()
        server.resume()
        all_windows = {t0 + w * S for w in range(12)}
        rows = aggregator.wait_for(lambda rows: windows_of(rows) >= all_windows)
        assert aggregator.stop() == 0, aggregator.output()
    finally:
        server.stop()
    expected = truth(first + second)
    stored = {(r.series, r.window_start_ns): r.count for r in rows}
    assert stored == {key: durations.size for key, durations in expected.items()}
    log = aggregator.output()
    assert log.count("waiting for storage postgresql://") == 1, log
    assert log.count("is back after") == 1, log
