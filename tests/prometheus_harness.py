"""A real Prometheus server (Debian's `prometheus`) for tests, and small HTTP helpers.

    with prometheus_server(tmp_path, {"agent": "127.0.0.1:9464", ...}) as prom:
        prom.query('ebpf_apm_agent_events_total{outcome="acked"}')  # -> [(labels, value)]

The server scrapes each job every second, keeps its data in the test's directory and is
stopped by its pid.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ebpf_apm.kafka.embedded_broker import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body); a refused connection is status 0."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.25):  # type: ignore[no-untyped-def]
    """The condition's first truthy value; fails with `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        time.sleep(interval_s)


@dataclass
class Prometheus:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        status, body = http_get(
            f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        )
        assert status == 200, f"query {promql!r}: {status} {body}"
        data = json.loads(body)["data"]
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def scalar(self, promql: str) -> float | None:
        """The value of a query with one result, None with none."""
        found = self.query(promql)
        assert len(found) <= 1, f"{promql!r} has {len(found)} results: {found}"
        return found[0][1] if found else None

    def targets_up(self) -> dict[str, bool]:
        status, body = http_get(f"{self.url}/api/v1/targets")
        assert status == 200, body
        active = json.loads(body)["data"]["activeTargets"]
        return {t["labels"]["job"]: t["health"] == "up" for t in active}


@contextmanager
def prometheus_server(workdir: Path, jobs: dict[str, str]) -> Iterator[Prometheus]:
    """Prometheus scraping every `jobs` name -> HOST:PORT each second."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    lines = ["global:", "  scrape_interval: 1s", "  scrape_timeout: 1s", "scrape_configs:"]
    for job, address in jobs.items():
        lines += [f"  - job_name: {job}", "    static_configs:", f"      - targets: ['{address}']"]
    config.write_text("\n".join(lines) + "\n")
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=out,
        )
    prom = Prometheus(process, f"http://127.0.0.1:{port}", log)
    try:
        wait_until(
            lambda: http_get(f"{prom.url}/-/ready")[0] == 200 or process.poll() is not None,
            30,
            "Prometheus to start",
        )
        assert process.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
        yield prom
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
