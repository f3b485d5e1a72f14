"""Tables keyed by input values stay bounded, and what they refuse or evict is counted.

Anyone who can write to a topic chooses the node/pid keys, workloads and series names the
consumers see; each table here is filled past its cap with such values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from join_data import Net, Span, net_batch, span_batch

from ebpf_apm.consumers.alert_rules import (
    MAX_RULES_FILE_CHARS,
    AlertEngine,
    RulesError,
    load_rules,
    parse_rules,
)
from ebpf_apm.consumers.kafka_io import PARTITION_CACHE_LIMIT, AckedOutput
from ebpf_apm.consumers.route_template import (
    OVERFLOW_OPERATION,
    OVERFLOW_WORKLOAD,
    SeriesKey,
    SeriesRegistry,
)
from ebpf_apm.consumers.span_joiner import JoinSettings, PartitionJoiner
from ebpf_apm.kafka.connection import KafkaConnection

S = 1_000_000_000
T0 = 1_750_000_000 * S


def test_the_registry_caps_workloads_and_series_in_all() -> None:
    registry = SeriesRegistry(max_series_per_workload=10, max_workloads=3, max_series=5)
    ids = [registry.resolve(SeriesKey(f"w{i}", "f")) for i in range(6)]
    assert ids[:3] == [0, 1, 2]
    overflow = SeriesKey(OVERFLOW_WORKLOAD, OVERFLOW_OPERATION, None)
    assert {registry.keys[i] for i in ids[3:]} == {overflow}
    assert registry.refused_workloads == 3
    more = [registry.resolve(SeriesKey("w0", f"g{i}")) for i in range(4)]
    # Two fit under max_series (5, the global overflow series counts), then w0's overflow.
    assert [registry.keys[i] for i in more[:1]] == [SeriesKey("w0", "g0")]
    assert {registry.keys[i] for i in more[1:]} == {SeriesKey("w0", OVERFLOW_OPERATION, None)}
    assert registry.refused_global == 3
    assert len(registry) <= 5 + registry.max_workloads  # + one overflow series per workload


def test_refused_keys_are_remembered_up_to_a_cap_and_still_counted() -> None:
    registry = SeriesRegistry(max_series_per_workload=1, max_refused_keys=100)
    for i in range(1000):
        registry.resolve(SeriesKey("w", f"op{i}"))
    assert len(registry._refused_keys) == 100
    assert registry.refused == {"w": 999}
    assert len(registry) == 2  # the series and the overflow series


def test_alert_rule_states_are_capped_and_firing_ones_kept() -> None:
    rules = parse_rules("rules:\n  - {name: slow, metric: p99, above: 1ms}\n")
    engine = AlertEngine(rules, max_states=10)
    for i in range(50):
        engine.add(
            {
                "series": f"w|op{i}|", "workload": "w", "operation": f"op{i}",
                "status_class": None, "window_start_ns": T0, "window_end_ns": T0 + 10 * S,
                "count": 1, "sum": 5 * S, "min": 5 * S, "max": 5 * S, "p50": 5 * S,
                "p90": 5 * S, "p95": 5 * S, "p99": 5 * S, "p999": 5 * S, "sketch": b"",
            }
        )  # fmt: skip
    fired = engine.evaluate()
    # All states fire at once (for: 1): the first ten are kept, the rest refused, counted.
    assert len(fired) == 10 and engine.refused_states == 40
    assert len(engine._states) == 10


def test_the_output_forgets_key_partitions_past_its_cap() -> None:
    output = AckedOutput(KafkaConnection("127.0.0.1:1"), client_id="t")
    output._partitions["t"] = 6
    for pid in range(PARTITION_CACHE_LIMIT + 10):
        assert 0 <= output.partition_of("t", f"n/{pid}".encode()) < 6
    assert len(output._partition_of_key) == 10
    assert output.partition_cache_resets == 1


def test_the_join_keeps_no_table_per_process() -> None:
    """Processes are numbered by a hash of node/pid, not by a table that only grows; the
    join of many processes still keeps each process's I/O apart."""
    joiner = PartitionJoiner(JoinSettings(), T0)
    for pid in range(1, 200):
        spans = [Span("f", T0 + 10, T0 + 20, tid=1)]
        joiner.add_spans(span_batch("n", pid, spans), pid, T0)
        joiner.add_net(net_batch("n", pid, [Net(T0 + 15, pid, True, tid=1)]), T0)
    assert not hasattr(joiner, "_procs")
    out = joiner.advance(T0 + 3600 * S)
    sent = {part.token: int(np.sum(part.io.bytes_sent)) for part in out}
    assert sent == {pid: pid for pid in range(1, 200)}


def test_a_rules_file_too_large_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n" + "#" * MAX_RULES_FILE_CHARS)
    with pytest.raises(RulesError, match="larger than"):
        load_rules(str(path))
