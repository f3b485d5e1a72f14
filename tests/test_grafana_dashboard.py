"""deploy/grafana/ebpf-apm.json: valid dashboard JSON whose every query is valid PromQL
(checked by Debian's `promtool`, the Prometheus parser) and names only metrics that the
README's "Operating it" section documents as the contract."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "ebpf-apm.json"
METRIC = re.compile(r"\bebpf_apm_[a-z0-9_]+")
# Grafana's variables, as a query would see them once Grafana substituted them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$node": ".*", "$namespace": ".*", "$workload": ".*"}


def queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def documented_metrics() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Operating it", 1)[1].split("\n## ", 1)[0]
    return set(METRIC.findall(section))


def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool (Debian package prometheus) is missing: run `make setup`")
    rules: list[dict[str, Any]] = []
    for i, (title, expr) in enumerate(queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{title}: unknown Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_dashboard_uses_only_documented_metrics_and_shows_the_overhead() -> None:
    used = {name for _, expr in queries() for name in METRIC.findall(expr)}
    # Counters are documented with their _total suffix, as Prometheus shows them.
    assert used <= documented_metrics(), used - documented_metrics()
    exprs = " ".join(expr for _, expr in queries())
    for needed in (
        "ebpf_apm_probe_cpu_seconds_total",
        "ebpf_apm_probe_hits_total",
        "ebpf_apm_agent_events_total",
        "ebpf_apm_consumer_lag_records",
        "ebpf_apm_latency_window_seconds",
    ):
        assert needed in exprs, needed
    assert "by (namespace, pod)" in exprs  # the overhead per pod
