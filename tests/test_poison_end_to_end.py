"""Poison messages between two rounds of real traffic: nothing stops, nothing is lost.

A Go server under the real agent, the join and the aggregator as processes (embedded broker,
SQLite). A round of real requests; then crafted messages into both event topics, keyed as
the agent keys the server's batches (so they land on the partitions real traffic uses):
undecodable bytes, truncated batches, a wrong type in every map field, mismatched column
lengths, out-of-range pids, far-future and far-past times, huge counts. Then a second round.

Ground truth: the bytes each request took on the wire (counted by the test's own client)
and the poison the test sent. Every consumer must stay up and exit cleanly; every poison
message must be in apm.deadletter exactly once, unchanged, with a reason and its source;
every real request must be in apm.spans with its bytes, and every span counted in storage.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgpack
import numpy as np
import pytest
from agent_harness import Agent, Connection, go_server, run_client
from aiokafka import AIOKafkaProducer
from join_harness import assigned, outside_decoder, start_join, stop_service, wait_for
from kafka_fixtures import read_topic
from test_percentiles_end_to_end import start_aggregate, stored_rows

from ebpf_apm.consumers.latency_store import StorageError
from ebpf_apm.kafka import topics
from ebpf_apm.kafka.deadletter import REASON_HEADER, SOURCE_HEADER
from ebpf_apm.kafka.embedded_broker import EmbeddedBroker
from ebpf_apm.schemas.event_batch import NET_COLUMNS, SPAN_COLUMNS

pytestmark = [pytest.mark.bpf, pytest.mark.integration]

NODE = "poison-node"
SERVE_HTTP = "net/http.serverHandler.ServeHTTP"
REQUESTS_PER_ROUND = 25
S = 1_000_000_000
DAY = 24 * 3600 * S
# Wrong types for any field: every field expects one of str, int, bytes, list or map.
WRONG = [[1, 2], {"a": 1}, 1.5, "x", None, b"\x00" * 3, -1]


def _columns(spec: dict[str, Any], n: int, ts: int) -> dict[str, bytes]:
    cols = {name: np.zeros(n, dtype=dtype) for name, dtype in spec.items()}
    for name in ("start_ns", "end_ns", "ts_ns"):
        if name in cols:
            cols[name][:] = ts
    return {name: column.tobytes() for name, column in cols.items()}


def valid_templates(pid: int, now_ns: int) -> dict[str, dict[str, Any]]:
    """A decodable span batch and net batch of the server's process (as plain maps)."""
    span = {
        "v": 1, "kind": "span", "node": NODE, "pid": pid, "exe": "/srv/x", "n": 2,
        "cols": _columns(SPAN_COLUMNS, 2, now_ns), "funcs": ["main.f"],
        "http": {"row": np.array([0], "<u4").tobytes(), "method": ["GET"], "path": ["/p"],
                 "status": np.array([200], "<u2").tobytes(),
                 "flushed_ns": np.array([now_ns], "<i8").tobytes()},
        "k8s": {"k8s_namespace": "ns", "k8s_pod": "p", "k8s_container": "c",
                "k8s_workload": "w"},
    }  # fmt: skip
    net = {
        "v": 1, "kind": "net", "node": NODE, "pid": pid, "exe": "/srv/x", "n": 2,
        "cols": _columns(NET_COLUMNS, 2, now_ns),
        "k8s": {"k8s_namespace": "ns"},
    }  # fmt: skip
    return {topics.SPAN_EVENTS: span, topics.NET_EVENTS: net}


def _set(message: dict[str, Any], path: tuple[str, ...], value: Any) -> bytes:
    copy = msgpack.unpackb(msgpack.packb(message, use_bin_type=True))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return bytes(msgpack.packb(copy, use_bin_type=True))


def _times(message: dict[str, Any], names: tuple[str, ...], ts: int) -> bytes:
    cols = dict(message["cols"])
    for name in names:
        cols[name] = np.full(message["n"], ts, dtype="<i8").tobytes()
    return _set(message, ("cols",), cols)


def poison(pid: int, now_ns: int) -> list[tuple[str, str, bytes]]:
    """(topic, what, value) for every crafted message."""
    out: list[tuple[str, str, bytes]] = []
    for topic, message in valid_templates(pid, now_ns).items():
        valid = msgpack.packb(message, use_bin_type=True)
        times = ("start_ns", "end_ns") if topic == topics.SPAN_EVENTS else ("ts_ns",)
        cases: list[tuple[str, bytes]] = [
            ("undecodable", b"\xc1 not msgpack: " + topic.encode()),
            ("not a map", msgpack.packb([topic])),
            ("truncated", valid[: len(valid) // 2]),
            ("truncated by one", valid[:-1]),
            ("pid 2**64-1", _set(message, ("pid",), (1 << 64) - 1)),
            ("n huge", _set(message, ("n",), 1 << 40)),
            ("n inf", _set(message, ("n",), float("inf"))),
            ("columns one short", _set(message, ("cols", "tid"), bytes(4))),
            ("far future", _times(message, times, now_ns + 365 * DAY)),
            ("near 2**62", _times(message, times, 1 << 62)),
            ("far past", _times(message, times, now_ns - 30 * DAY)),
        ]
        for path in _field_paths(message):
            for i, wrong in enumerate(WRONG):
                if _valid_for(path, wrong):
                    continue
                cases.append((f"{'.'.join(path)} = wrong type #{i}", _set(message, path, wrong)))
        if topic == topics.SPAN_EVENTS:
            cases += [
                ("http.method integers (the issue)", _set(message, ("http", "method"), [1])),
                ("k8s a list (the issue)", _set(message, ("k8s",), ["a"])),
                ("flushed far future", _set(message, ("http", "flushed_ns"),
                                            np.array([now_ns + DAY], "<i8").tobytes())),
                ("status 1000", _set(message, ("http", "status"),
                                     np.array([1000], "<u2").tobytes())),
            ]  # fmt: skip
        else:
            cases.append(("negative bytes", _set(message, ("cols", "bytes"),
                                                 np.array([-5, 1], "<i8").tobytes())))  # fmt: skip
        out.extend((topic, what, value) for what, value in cases)
    return out


def _field_paths(message: dict[str, Any]) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for key, value in message.items():
        paths.append((key,))
        if isinstance(value, dict):
            paths.extend((key, inner) for inner in value)
    return paths


def _valid_for(path: tuple[str, ...], value: Any) -> bool:
    """Whether one of WRONG is in fact a valid value of the field."""
    k8s_value = path[0] == "k8s" and len(path) == 2
    if isinstance(value, str):
        return path in {("node",), ("exe",)} or k8s_value
    if value is None:  # optional parts
        return path in {("k8s",), ("http",), ("http", "flushed_ns")} or k8s_value
    return False


async def publish(bootstrap: str, key: bytes, messages: list[tuple[str, str, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for topic, _, value in messages:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


def round_of_requests(host: str, port: int, seed: int) -> Connection:
    conn = Connection()
    run_client(host, port, conn, REQUESTS_PER_ROUND, seed)
    return conn


def test_poison_messages_are_dead_lettered_and_real_traffic_goes_on(
    go_targets: dict[tuple[str, bool], Path], tmp_path: Path
) -> None:
    storage = f"sqlite:///{tmp_path / 'latency.sqlite'}"
    join_log, aggregate_log = tmp_path / "join.log", tmp_path / "aggregate.log"
    with EmbeddedBroker() as broker, go_server(go_targets[("1.27", False)]) as server:
        bootstrap = broker.bootstrap_servers
        crafted = poison(server.pid, time.time_ns())
        with Agent(["--pid", str(server.pid), "--node-name", NODE,
                    "--bootstrap-servers", bootstrap]) as agent:  # fmt: skip
            agent.wait_ready()
            join = start_join(bootstrap, join_log)
            aggregate = start_aggregate(bootstrap, storage, aggregate_log)
            try:
                wait_for(lambda: assigned(join_log), 60, "the join to get its partitions")
                first = round_of_requests(server.host, server.port, seed=1)
                done = asyncio.run(read_topic(bootstrap, "apm.spans", len(first.exchanges), 60))
                assert len(done) == len(first.exchanges), join_log.read_text()
                asyncio.run(publish(bootstrap, f"{NODE}/{server.pid}".encode(), crafted))
                second = round_of_requests(server.host, server.port, seed=2)
                calls = len(first.exchanges) + len(second.exchanges)
                spans = asyncio.run(read_topic(bootstrap, "apm.spans", calls, 60))
                letters = asyncio.run(read_topic(bootstrap, "apm.deadletter", len(crafted), 60))

                def all_stored() -> bool:
                    assert aggregate.poll() is None, aggregate_log.read_text()
                    try:
                        return sum(r.count for r in stored_rows(storage)) >= len(spans)
                    except StorageError:  # not created yet
                        return False

                wait_for(all_stored, 60, "the aggregator to store every span")
                survived = join.poll() is None and aggregate.poll() is None
            finally:
                stop_service(aggregate, "aggregate", aggregate_log)
                stop_service(join, "join", join_log)
            assert agent.stop() == 0, agent.log

    # Every consumer stayed up through the poison and exited cleanly (checked by stop()).
    assert survived
    # Every poison message is dead-lettered once, unchanged, with its reason and source.
    sent = {value: (topic, what) for topic, what, value in crafted}
    assert len(sent) == len(crafted), "two crafted messages are the same bytes"
    lettered: dict[bytes, str] = {}
    for record in letters:
        headers = dict(record.headers)
        assert record.value in sent, f"a dead letter the test did not send: {headers}"
        topic, what = sent[record.value]
        assert record.value not in lettered, f"{what} dead-lettered twice"
        assert headers[SOURCE_HEADER].decode().startswith(f"{topic}/"), what
        assert headers[REASON_HEADER], what
        lettered[record.value] = headers[REASON_HEADER].decode()
    missing = [what for value, (_, what) in sent.items() if value not in lettered]
    assert not missing, f"not dead-lettered: {missing}"

    # Every real request, before and after the poison, is joined with its bytes.
    decode = outside_decoder()
    by_path = {}
    for record in spans:
        span = decode(record.value)
        assert span["node"] == NODE and span["pid"] == server.pid
        if span["func"] == SERVE_HTTP:
            by_path[span["http_path"]] = span
    for conn in (first, second):
        for exchange in conn.exchanges:
            path = urlsplit(exchange.request.split(b" ")[1].decode()).path
            assert by_path[path]["bytes_sent"] == exchange.response_bytes, path
    assert len(by_path) == calls
    # And every span published is counted in storage, none twice.
    assert sum(r.count for r in stored_rows(storage)) == len(spans)
    print(
        f"\npoison: {len(crafted)} messages tried, consumers survived: {survived}, "
        f"{len(lettered)} dead-lettered with a reason; {calls} real requests joined with "
        f"their bytes and stored ({len(spans)} spans)"
    )
