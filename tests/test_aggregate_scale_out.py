"""Two `ebpf-apm aggregate` members, one SIGKILLed mid-run, against the real agent on two Go
servers and the real join: the windows stored are complete and exact, and a single member
reading the same apm.span.batches from the start stores identical rows.

Two copies of the Go server under different executable names are two workloads; the names
are chosen so that their apm.span.batches keys land in partitions 0 and 5 of 6, which the
group's assignor (range or round robin) gives to different members. The member started first
is SIGKILLed once it has written a window and while traffic is still coming: the survivor
takes its partition over from the committed offset and the stored watermark.

Ground truth: the spans in apm.spans (what an outside subscriber reads). Stored counts must
equal the requests sent (plus the handler spans the agent times), count, sum, min and max be
exact and every percentile within the sketch's 1% of the exact quantile, per series and
window (test_percentiles_end_to_end's checks).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from agent_harness import Agent, go_server, send_concurrently
from aiokafka.partitioner import murmur2
from join_harness import outside_decoder, start_join, wait_for
from kafka_fixtures import read_topic
from test_percentiles_end_to_end import (
    BURSTS,
    CLIENTS,
    HANDLE_SLEEP,
    PER_BURST,
    WINDOW_NS,
    assert_figures,
    plan,
    series_of,
    stored_rows,
)

from ebpf_apm.consumers.latency_store import LatencyRow, StorageError
from ebpf_apm.kafka import topics
from ebpf_apm.kafka.embedded_broker import EmbeddedBroker

pytestmark = [pytest.mark.bpf, pytest.mark.integration]

REPO = Path(__file__).resolve().parent.parent
NODE = "scale-out-node"
PARTITIONS = topics.EVENT_PARTITIONS  # the join gives apm.span.batches the same count


def name_in_partition(partition: int) -> str:
    """An executable name whose workload key lands in `partition` of apm.span.batches."""
    for i in range(1000):
        name = f"shop{i}"
        if (murmur2(name.encode()) & 0x7FFFFFFF) % PARTITIONS == partition:
            return name
    raise AssertionError(f"no name for partition {partition}")


def start_member(bootstrap: str, storage: str, group: str, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "ebpf_apm.cli", "aggregate", "--bootstrap-servers", bootstrap,
        "--storage", storage, "--group", group, "--window", "2s", "--lateness", "3s",
        "--idle-timeout", "1s", "--session-timeout", "3s",
    ]  # fmt: skip
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen[bytes], log: Path) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, f"aggregate exited {process.returncode}:\n{log.read_text()}"


def stored_count(storage: str) -> int:
    try:
        return sum(r.count for r in stored_rows(storage))
    except StorageError:  # not created yet
        return 0


def by_key(rows: list[LatencyRow]) -> dict[tuple[str, int], LatencyRow]:
    return {(r.series, r.window_start_ns): r for r in rows}


def test_two_members_one_killed_store_what_one_member_stores(
    go_targets: dict[tuple[str, bool], Path], tmp_path: Path
) -> None:
    binary = go_targets[("1.27", False)]
    names = [name_in_partition(0), name_in_partition(PARTITIONS - 1)]
    copies = []
    for name in names:
        copy = tmp_path / name
        shutil.copy2(binary, copy)
        copies.append(copy)
    requests = plan(seed=41)
    expected = len(requests) + sum(r.path.startswith("/sleep/") for r in requests)
    two = f"sqlite:///{tmp_path / 'two.sqlite'}"
    one = f"sqlite:///{tmp_path / 'one.sqlite'}"
    logs = [tmp_path / "member-a.log", tmp_path / "member-b.log", tmp_path / "single.log"]
    join_log = tmp_path / "join.log"
    with (
        EmbeddedBroker() as broker,
        go_server(copies[0]) as first,
        go_server(copies[1]) as second,
    ):
        bootstrap = broker.bootstrap_servers
        servers = (first, second)
        agent_args = ["--pid", str(first.pid), "--pid", str(second.pid), "--func", HANDLE_SLEEP]
        with Agent([*agent_args, "--node-name", NODE, "--bootstrap-servers", bootstrap]) as agent:
            agent.wait_ready()
            join = start_join(bootstrap, join_log)
            member_a = start_member(bootstrap, two, "scale", logs[0])
            time.sleep(2)
            member_b = start_member(bootstrap, two, "scale", logs[1])
            try:
                for burst in range(BURSTS):
                    if burst:
                        time.sleep(1.2)
                    if burst == 3:  # mid-run: once member A has written windows
                        try:
                            wait_for(lambda: "wrote" in logs[0].read_text(), 30, "A to write")
                        except AssertionError as exc:
                            raise AssertionError(
                                f"{exc}:\n{logs[0].read_text()}\n---\n{logs[1].read_text()}"
                            ) from None
                        member_a.send_signal(signal.SIGKILL)
                        member_a.wait(10)
                    chunk = requests[burst * PER_BURST : (burst + 1) * PER_BURST]
                    for i, server in enumerate(servers):
                        send_concurrently(server, chunk[i::2], CLIENTS // 2)
                records = asyncio.run(read_topic(bootstrap, "apm.spans", expected, 40))
                assert len(records) == expected, f"join:\n{join_log.read_text()}"

                def all_stored(storage: str, member: subprocess.Popen[bytes], log: Path) -> bool:
                    assert member.poll() is None, log.read_text()
                    return stored_count(storage) >= expected

                try:
                    wait_for(lambda: all_stored(two, member_b, logs[1]), 40, "B to store all")
                except AssertionError as exc:
                    raise AssertionError(
                        f"{exc}:\n{logs[0].read_text()}\n---\n{logs[1].read_text()}"
                    ) from None
                # One member of a new group over the same apm.span.batches, from the start.
                single = start_member(bootstrap, one, "single", logs[2])
                try:
                    wait_for(lambda: all_stored(one, single, logs[2]), 40, "one to store all")
                finally:
                    stop(single, logs[2])
            finally:
                if member_a.poll() is None:  # the run failed before killing it
                    member_a.kill()
                    member_a.wait()
                stop(member_b, logs[1])
                stop(join, join_log)
            assert agent.stop() == 0, agent.log
    assert member_a.returncode == -signal.SIGKILL
    assert "wrote" in logs[1].read_text(), "the survivor should have written windows too"

    decode = outside_decoder()
    spans = [decode(r.value) for r in records]
    assert len({s["span_id"] for s in spans}) == len(spans), "a span was published twice"
    assert {series_of(s)[0] for s in spans} == set(names)
    truth: dict[tuple[tuple[str, str, str | None], int], list[int]] = defaultdict(list)
    for span in spans:
        truth[(series_of(span), span["end_ns"] // WINDOW_NS * WINDOW_NS)].append(
            span["duration_ns"]
        )
    rows = stored_rows(two)
    assert sum(r.count for r in rows) == expected
    keyed = {((r.workload, r.operation, r.status_class), r.window_start_ns): r for r in rows}
    assert sorted(keyed) == sorted(truth)
    for key, durations in truth.items():
        assert_figures(keyed[key].as_dict(), np.array(durations, dtype=np.int64), f"{key}")
    # The single member's rows are the same rows, sketches and all.
    assert by_key(stored_rows(one)) == by_key(rows)
