"""Alert rules: the file format and its errors, transitions, and the service on a broker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from kafka_fixtures import read_topic, unique_topic
from prometheus_client.parser import text_string_to_metric_families

from ebpf_apm import cli
from ebpf_apm.consumers import tail_command as topic_tail
from ebpf_apm.consumers.alert_rules import AlertEngine, Rule, RulesError, Transition, parse_rules
from ebpf_apm.consumers.name_pattern import NamePattern
from ebpf_apm.consumers.route_template import SeriesKey
from ebpf_apm.consumers.series_resolver import GRPC_CODES
from ebpf_apm.kafka.admin import ensure_topics
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.embedded_broker import EmbeddedBroker, free_port
from ebpf_apm.schemas.avro_codec import codec

REPO = Path(__file__).resolve().parent.parent
S = 1_000_000_000
MS = 1_000_000
T0 = 1_700_000_000 * S
LATENCY = codec("latency.avsc")
ALERT = codec("alert.avsc")

RULES = """\
rules:
  - name: slow-user-lookups
    workload: prod/api
    operation: GET /api/user/{id}
    metric: p99
    above: 250ms
    for: 3
  - name: user-lookup-errors
    workload: prod/*
    operation: GET /api/user/{id}
    metric: error_rate
    above: 10%
    for: 2
    resolve_after: 2
    min_count: 10
"""


def window(
    start: int,
    status: str | None,
    count: int,
    p99_ms: float,
    operation: str = "GET /api/user/{id}",
    workload: str = "prod/api",
) -> dict[str, Any]:
    p99 = int(p99_ms * MS)
    key = SeriesKey(workload, operation, status)
    return {
        "series": key.series,
        "workload": workload,
        "operation": operation,
        "status_class": status,
        "window_start_ns": start,
        "window_end_ns": start + 10 * S,
        "count": count,
        "sum": count * p99 // 2,
        "min": 1,
        "max": p99 + 1,
        "p50": p99 // 2,
        "p90": p99 // 2,
        "p95": p99,
        "p99": p99,
        "p999": p99,
        "sketch": b"",
    }


# Scripted: the 2xx p99 steps from 100 ms up to 300 ms for windows 3-8, then back down; the
# error share steps from 5% to 20% for windows 10-13.
P99_MS = [100, 100, 100, 300, 300, 300, 300, 300, 300, 120, 110, 100, 100, 100, 100, 100]
ERRORS = [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 20, 20, 20, 20, 5, 5]


def scripted_windows() -> list[dict[str, Any]]:
    out = []
    for i, (p99, errors) in enumerate(zip(P99_MS, ERRORS, strict=True)):
        start = T0 + i * 10 * S
        out.append(window(start, "2xx", 100 - errors, p99))
        out.append(window(start, "5xx", errors, 5.0))
        out.append(window(start, None, 50, 900, operation="main.other"))  # matches no rule
    return out


def summary(transitions: list[Transition]) -> list[tuple[str, str, str, int, int]]:
    return [
        (t.rule.name, t.state, t.subject.series, (t.window_start_ns - T0) // (10 * S), t.windows)
        for t in transitions
    ]


EXPECTED = [
    ("slow-user-lookups", "firing", "prod/api|GET /api/user/{id}|2xx", 5, 3),
    ("slow-user-lookups", "resolved", "prod/api|GET /api/user/{id}|2xx", 9, 1),
    ("user-lookup-errors", "firing", "prod/api|GET /api/user/{id}|", 11, 2),
    ("user-lookup-errors", "resolved", "prod/api|GET /api/user/{id}|", 15, 2),
]


def test_a_latency_step_fires_and_resolves_once_per_transition() -> None:
    engine = AlertEngine(parse_rules(RULES))
    transitions = []
    for record in scripted_windows():
        engine.add(record)
        engine.add(record)  # delivered twice (at-least-once): no second transition
    transitions += engine.evaluate(T0 + 7 * 10 * S)
    transitions += engine.evaluate()
    for record in scripted_windows()[:9]:  # a replay of old windows changes nothing
        engine.add(record)
    transitions += engine.evaluate()
    assert summary(transitions) == EXPECTED
    firing = transitions[0].as_record()
    assert firing["value"] == 300 * MS and firing["threshold"] == 250 * MS
    assert firing["message"] == (
        "slow-user-lookups firing: p99 of prod/api|GET /api/user/{id}|2xx is 300.0 ms, above "
        "250.0 ms for 3 windows"
    )
    assert ALERT.decode(ALERT.encode(firing)) == firing


def test_a_gap_restarts_the_count() -> None:
    rule = Rule("r", "p99", "above", 250 * MS, for_windows=2)
    engine = AlertEngine([rule])
    for i in (0, 2, 4, 5):  # windows 1 and 3 missing: only 4, 5 are consecutive
        engine.add(window(T0 + i * 10 * S, "2xx", 10, 300))
    (fired,) = engine.evaluate()
    assert (fired.window_start_ns - T0) // (10 * S) == 5


def test_below_min_count_and_mean() -> None:
    rule = Rule("r", "mean", "below", 10 * MS, min_count=5, workload=NamePattern("prod/*"))
    engine = AlertEngine([rule])
    engine.add(window(T0, "2xx", 4, 1))  # too few spans: skipped
    engine.add(window(T0 + 10 * S, "2xx", 5, 1, workload="dev/api"))  # other workload
    assert engine.evaluate() == []
    engine.add(window(T0 + 20 * S, "2xx", 5, 1))
    (fired,) = engine.evaluate()
    assert fired.value == 500_000.0


@pytest.mark.parametrize(
    ("text", "problems"),
    [
        (
            "rules:\n  - name: a\n    metric: p99\n    above: 250\n",
            [
                "rules.yaml:4: rule 'a': bad threshold '250': p99 is a duration: give a unit, "
                "e.g. 250ms"
            ],
        ),
        (
            "rules:\n  - name: a\n    metric: p99\n    abov: 1s\n",
            [
                "rules.yaml:4: rule 'a': unknown key 'abov'; known: name, workload, operation, "
                "status_class, metric, above, below, for, resolve_after, min_count, error_classes",
                "rules.yaml:2: rule 'a' needs exactly one of above: or below:",
            ],
        ),
        (
            "rules:\n  - name: a\n    metric: p98\n    above: 1s\n",
            [
                "rules.yaml:3: rule 'a': unknown metric 'p98'; one of: count, min, max, mean, p50, "
                "p90, p95, p99, p999, error_rate"
            ],
        ),
        (
            "rules:\n  - name: a\n    metric: p99\n    above: 1s\n    for: 0\n",
            ["rules.yaml:5: rule 'a': for must be a whole number of at least 1, got '0'"],
        ),
        (
            "rules:\n  - name: a\n    metric: error_rate\n    above: 120%\n",
            [
                "rules.yaml:4: rule 'a': bad threshold '120%': an error rate is between 0 and 1 "
                "(or 0% and 100%)"
            ],
        ),
        (
            "rules:\n  - name: a\n    metric: p99\n    above: 1s\n"
            "  - name: a\n    metric: p50\n    below: 1s\n",
            ["rules.yaml:5: rule 'a' is defined twice (first at line 2)"],
        ),
        (
            "rules:\n  - name: a\n    metric: p99\n    above: 1s\n    above: 2s\n",
            ["rules.yaml:5: rule 'a': 'above' is given twice"],
        ),
        (
            "rules:\n  - name: a\n    metric: p99\n   above: 1s\n",
            [
                "rules.yaml:4: not valid YAML: expected <block end>, but found "
                "'<block mapping start>'"
            ],
        ),
        (
            "rules:\n  - name: [a, b]\n    metric: p99\n    above: 1s\n",
            ["rules.yaml:2: name must be a single value, not a list or mapping"],
        ),
        (
            "rule:\n  - name: a\n",
            [
                "rules.yaml:1: unknown key 'rule'; only `rules:` is read",
                "rules.yaml:1: no `rules:` list",
            ],
        ),
        ("", ["rules.yaml:1: the file is empty; it needs `rules:` and a list"]),
        ("rules: []\n", ["rules.yaml:1: `rules:` must be a non-empty list (items start with -)"]),
        (
            "rules:\n  - metric: p99\n    above: 1s\n    error_classes: [6xx]\n",
            [
                "rules.yaml:2: rule #1 has no name",
                "rules.yaml:4: rule #1: error class '6xx' is not one of 1xx, 2xx, 3xx, 4xx, 5xx, "
                "unknown, " + ", ".join(GRPC_CODES),
            ],
        ),
    ],
)
def test_bad_rules_files_name_the_line(text: str, problems: list[str]) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules(text, "rules.yaml")
    assert info.value.problems == problems


def test_the_command_reports_bad_rules_and_checks_good_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules:\n  - name: a\n    metric: p99\n    above: fast\n")
    assert cli.main(["alert", "--rules", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}:4: rule 'a': bad threshold 'fast'" in err
    assert f"fix {bad} and run again" in err
    assert cli.main(["alert", "--rules", str(tmp_path / "none")]) == 2
    assert "cannot read the rules file" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(RULES)
    assert cli.main(["alert", "--rules", str(good), "--check"]) == 0
    assert "2 rules, all valid" in capsys.readouterr().out


@pytest.mark.integration
def test_the_service_publishes_each_transition_once(
    kafka_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    latency, alerts = unique_topic("apm.latency"), unique_topic("apm.alerts")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    records = scripted_windows()
    metrics_address = f"127.0.0.1:{free_port()}"

    async def publish(batch: list[dict[str, Any]]) -> None:
        await ensure_topics(KafkaConnection(bootstrap), {latency: 6})
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        await producer.start()
        try:
            for record in batch:  # as the aggregator does: key = series
                await producer.send(latency, LATENCY.encode(record), key=record["series"].encode())
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(publish(records[: 3 * 7]))  # windows 0-6 before the service starts
    log = tmp_path / "alert.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ebpf_apm",
                "alert",
                "--rules",
                str(rules),
                "--bootstrap-servers",
                bootstrap,
                "--latency-topic",
                latency,
                "--alerts-topic",
                alerts,
                "--group",
                "alerts-test",
                "--from-beginning",
                "--settle",
                "500ms",
                "--metrics-address",
                metrics_address,
                "--max-event-age",  # the windows are from 2023 (T0)
                "100000d",
            ],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        time.sleep(1.0)
        for i in range(7, len(P99_MS)):  # then one window at a time, as they close live
            asyncio.run(publish(records[3 * i : 3 * i + 3]))
            time.sleep(0.2)
        asyncio.run(publish(records[: 3 * 4]))  # a replay of old windows
        published = asyncio.run(read_topic(bootstrap, alerts, len(EXPECTED), timeout_s=30))
        with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as response:
            metrics = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(response.read().decode())
                for s in family.samples
            }
    finally:
        process.terminate()
        code = process.wait(20)
    output = log.read_text()
    assert code == 0, output
    decoded = [ALERT.decode(r.value or b"") for r in published]
    got = sorted(
        (d["rule"], d["state"], d["series"], (d["window_start_ns"] - T0) // (10 * S), d["windows"])
        for d in decoded
    )
    assert got == sorted(EXPECTED), output
    keys = sorted(r.key.decode() for r in published if r.key)
    assert keys == sorted(f"{e[0]}/{e[2]}" for e in EXPECTED)
    assert "slow-user-lookups firing" in output
    for state in ("firing", "resolved"):  # one count per transition published
        expected = sum(1 for e in EXPECTED if e[1] == state)
        assert metrics[("ebpf_apm_alerts_total", (("state", state),))] == expected
    acked = (("outcome", "acked"), ("service", "alert"), ("topic", alerts))
    assert metrics[("ebpf_apm_consumer_records_total", acked)] == len(EXPECTED)
    (shown,) = topic_tail.TOPICS["apm.alerts"].decode(published[0].value or b"")
    assert shown == decoded[0]  # `ebpf-apm tail apm.alerts`


def test_the_shipped_configmap_alert_rules_parse() -> None:
    import yaml

    root = Path(__file__).resolve().parent.parent
    docs = yaml.safe_load_all((root / "deploy/base/config.yaml").read_text())
    data = next(d["data"] for d in docs if d and "alert-rules.yaml" in d.get("data", {}))
    rules = parse_rules(data["alert-rules.yaml"], "deploy/base/config.yaml")
    assert [r.name for r in rules] == ["checkout-p99-slow", "checkout-errors"]
