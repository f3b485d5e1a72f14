"""Targets files: strict parsing with the line of every mistake, and matching processes."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from ebpf_apm.producer.target_rules import (
    ProbeRequest,
    ProcessFacts,
    TargetRulesError,
    TargetRulesFile,
    compile_glob,
    load_target_rules,
    parse_target_rules,
)

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
# targets for the shop
targets:
  - name: checkout-http
    select:
      namespaces: [shop, "team-*"]
      podSelector:
        matchLabels: {app: checkout}
        matchExpressions:
          - {key: tier, operator: In, values: [web, api]}
          - {key: canary, operator: DoesNotExist}
      containers: server
  - name: orders-handlers
    select:
      exeNames: ["orders*"]
      exePaths: ["/app/**"]
    http: false
    functions:
      - main.(*server).handleOrder
      - main.(*server).handleRefund
  - name: everything-in-payments
    select:
      namespaces: payments
    functions: [main.charge]
"""


def pod(
    exe: str = "/app/bin/checkout",
    namespace: str | None = "shop",
    container: str | None = "server",
    labels: dict[str, str] | None = None,
) -> ProcessFacts:
    if labels is None:
        labels = {"app": "checkout", "tier": "web"}
    return ProcessFacts.of(exe, namespace, container, labels)


def test_a_good_file_parses_with_defaults() -> None:
    rules = parse_target_rules(GOOD, "targets.yaml")
    assert [r.name for r in rules.rules] == [
        "checkout-http",
        "orders-handlers",
        "everything-in-payments",
    ]
    checkout, orders, payments = rules.rules
    assert checkout.http and checkout.functions == ()
    assert checkout.line == 3 and orders.line == 12
    assert not orders.http and orders.functions[1] == "main.(*server).handleRefund"
    assert checkout.uses_kubernetes and not orders.uses_kubernetes
    assert rules.uses_kubernetes
    assert payments.functions == ("main.charge",)


def test_kubernetes_selectors() -> None:
    rules = parse_target_rules(GOOD)
    assert [r.name for r in rules.match(pod())] == ["checkout-http"]
    assert [r.name for r in rules.match(pod(namespace="team-blue"))] == ["checkout-http"]
    assert rules.match(pod(namespace="other")) == []
    assert rules.match(pod(container="sidecar")) == []
    assert rules.match(pod(labels={"app": "checkout", "tier": "batch"})) == []
    assert rules.match(pod(labels={"app": "checkout", "tier": "web", "canary": "1"})) == []
    assert rules.match(pod(labels={"tier": "web"})) == []


def test_kubernetes_selectors_never_match_outside_kubernetes() -> None:
    rules = parse_target_rules(GOOD)
    outside = ProcessFacts.of("/app/bin/checkout")
    assert outside.pod_labels is None and outside.namespace is None
    assert rules.match(outside) == []


def test_executable_selectors_and_the_merged_plan() -> None:
    rules = parse_target_rules(GOOD)
    facts = ProcessFacts.of("/app/bin/orders-api", "payments", "api", {"app": "orders"})
    assert [r.name for r in rules.match(facts)] == ["orders-handlers", "everything-in-payments"]
    assert rules.plan(facts) == ProbeRequest(
        functions=("main.(*server).handleOrder", "main.(*server).handleRefund", "main.charge"),
        http=True,
        rules=("orders-handlers", "everything-in-payments"),
    )
    assert rules.plan(ProcessFacts.of("/usr/bin/orders")) is None  # exePaths wants /app/**
    assert rules.match(ProcessFacts.of("/app/orders (deleted)"))[0].name == "orders-handlers"


@pytest.mark.parametrize(
    ("glob", "path", "value", "matches"),
    [
        ("/app/*", True, "/app/server", True),
        ("/app/*", True, "/app/bin/server", False),
        ("/app/**", True, "/app/bin/server", True),
        ("**/server", True, "/srv/x/server", True),
        ("/usr/?in/go", True, "/usr/bin/go", True),
        ("/usr/?in/go", True, "/usr//in/go", False),
        ("srv-[0-9]", False, "srv-7", True),
        ("srv-[!0-9]", False, "srv-7", False),
        ("a.b", False, "axb", False),
        ("*", False, "anything", True),
        ("\\*", False, "*", True),
        ("\\*", False, "x", False),
    ],
)
def test_globs(glob: str, path: bool, value: str, matches: bool) -> None:
    assert compile_glob(glob, path).matches(value) is matches


def _error(text: str) -> str:
    with pytest.raises(TargetRulesError) as caught:
        parse_target_rules(textwrap.dedent(text), "/etc/ebpf-apm/targets.yaml")
    return str(caught.value)


def test_unknown_key_names_the_file_and_line() -> None:
    message = _error(
        """\
        targets:
          - name: a
            select:
              exeNames: [server]
              exe_path: /app/server
        """
    )
    assert message.startswith("/etc/ebpf-apm/targets.yaml:5: ")
    assert "unknown key 'exe_path'" in message and "exePaths" in message


def test_unknown_key_in_a_rule_and_at_the_top() -> None:
    assert _error("targets:\n  - name: a\n    select: {exeNames: x}\n    funcs: [f]\n").startswith(
        "/etc/ebpf-apm/targets.yaml:4: unknown key 'funcs' in a target"
    )
    assert _error("target:\n  - name: a\n").startswith(
        "/etc/ebpf-apm/targets.yaml:1: unknown key 'target'"
    )


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ('"/app/[a-z"', "never closed"),
        ('"/app/[]x"', "empty character class"),
        ('"/app/[z-a]"', "reversed"),
        ('"app/server"', "must start with /"),
        ('"/app/***"', "***"),
        ('"/app/x]"', "closes nothing"),
    ],
)
def test_bad_glob_names_the_line(value: str, why: str) -> None:
    message = _error(
        f"""\
        targets:
          - name: a
            select:
              exeNames: [ok]
              exePaths:
                - /fine/**
                - {value}
        """
    )
    assert message.startswith("/etc/ebpf-apm/targets.yaml:7: bad glob in exePaths")
    assert why in message


@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        ("targets: []\n", 1, "non-empty list"),
        ("", 1, "empty"),
        ("targets:\n  - name: a\n", 2, "needs 'select'"),
        ("targets:\n  - name: a\n    select: {}\n", 3, "selects nothing"),
        ("targets:\n  - name: a\n    select: {exeNames: x}\n    http: maybe\n", 4, "true or false"),
        (
            "targets:\n  - name: a\n    select: {exeNames: x}\n    http: false\n",
            2,
            "traces nothing",
        ),
        (
            "targets:\n  - name: a\n    select: {exeNames: x}\n"
            "  - name: a\n    select: {exeNames: y}\n",
            4,
            "used twice",
        ),
        ("targets:\n  - name: a\n    select: {exeNames: [1]}\n", 3, "non-empty string"),
        ("targets:\n  - name: a\n    name: b\n", 3, "duplicate key"),
        ("targets:\n  - name: a\n    select: {exeNames: [x}\n", 3, "not valid YAML"),
        (
            "targets:\n  - name: a\n    select:\n      podSelector:\n        matchExpressions:\n"
            "          - {key: k, operator: Like, values: [v]}\n",
            6,
            "operator 'Like'",
        ),
        (
            "targets:\n  - name: a\n    select:\n      podSelector:\n        matchExpressions:\n"
            "          - {key: k, operator: Exists, values: [v]}\n",
            6,
            "takes no values",
        ),
        ("targets:\n  - name: a\n    select: {exeNames: 'a/b*'}\n", 3, "bad glob"),
    ],
)
def test_other_mistakes_name_their_line(text: str, line: int, why: str) -> None:
    message = _error(text)
    assert message.startswith(f"/etc/ebpf-apm/targets.yaml:{line}: "), message
    assert why in message


def test_exit_code_is_bad_input() -> None:
    assert TargetRulesError("x").exit_code == 2


def test_missing_file() -> None:
    with pytest.raises(TargetRulesError, match="cannot read the targets file"):
        load_target_rules("/nonexistent/targets.yaml")


def test_configmap_mount_reload(tmp_path: Path) -> None:
    """A ConfigMap volume: files are symlinks into ..data, which is swapped atomically."""
    first = tmp_path / "..2026_11_26_10_00_00.000000001"
    first.mkdir()
    (first / "targets.yaml").write_text(GOOD)
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "targets.yaml").symlink_to("..data/targets.yaml")
    watched = TargetRulesFile(tmp_path / "targets.yaml")
    assert len(watched.load().rules) == 3
    assert watched.reload_if_changed() is None
    second = tmp_path / "..2026_11_26_10_05_00.000000002"
    second.mkdir()
    (second / "targets.yaml").write_text("targets:\n  - name: only\n    select: {exeNames: x}\n")
    (tmp_path / "..data_tmp").symlink_to(second.name)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    reloaded = watched.reload_if_changed()
    assert reloaded is not None and [r.name for r in reloaded.rules] == ["only"]
    assert watched.reload_if_changed() is None


def test_the_shipped_configmap_targets_parse() -> None:
    """deploy/'s ConfigMap carries a targets file: it must load as the agent would."""
    import yaml

    docs = yaml.safe_load_all((ROOT / "deploy/base/config.yaml").read_text())
    (configmap,) = [d for d in docs if "targets.yaml" in d.get("data", {})]
    rules = parse_target_rules(configmap["data"]["targets.yaml"], "deploy/base/config.yaml")
    assert rules.rules
