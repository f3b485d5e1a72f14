"""The built wheel, installed (not editable) into a fresh virtual environment, runs every
command: the agent against a real Go server, the join, the aggregator, `query` and `tail`.

Run from a folder outside the checkout, so nothing of the source tree is importable: the
BPF sources and the Avro schemas must come from the installed package. Debian's `bcc` is
made visible to the new environment the way `make setup` does it for .venv.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_harness import Agent, go_server, plan_requests, send_concurrently
from join_harness import LIVE, wait_for

from ebpf_apm.kafka.embedded_broker import EmbeddedBroker

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
DEBIAN_BCC = Path("/usr/lib/python3/dist-packages/bcc")


@dataclass(frozen=True)
class Installed:
    venv: Path
    workdir: Path  # outside the checkout

    @property
    def command(self) -> list[str]:
        return [str(self.venv / "bin" / "ebpf-apm")]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.command, *args], cwd=self.workdir, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip

    def popen(self, log: Path, *args: str) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(
                [*self.command, *args], cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT
            )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("wheel")
    dist, venv, workdir = root / "dist", root / "venv", root / "work"
    workdir.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dist), str(REPO)], check=True)
    (wheel,) = dist.glob("ebpf_apm-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run(
        [str(venv / "bin" / "python"), "-c", purelib], check=True, capture_output=True, text=True
    ).stdout.strip()
    (Path(site) / "bcc").symlink_to(DEBIAN_BCC)
    venv_pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*venv_pip, "install", str(wheel)], check=True, cwd=workdir)
    yield Installed(venv, workdir)


def test_the_distribution_installs_one_import_name(installed: Installed) -> None:
    script = (
        "import importlib.metadata as m, json, ebpf_apm, ebpf_apm.bpf as b, "
        "ebpf_apm.schemas.avro_codec as a\n"
        "files = m.distribution('ebpf-apm').files\n"
        "tops = sorted({f.parts[0] for f in files if not f.parts[0].endswith('.dist-info') "
        "and f.parts[0] not in ('..', 'bin')})\n"
        "print(json.dumps([tops, ebpf_apm.__file__, str(b.source_dir()), str(a.SCHEMA_DIR)]))"
    )
    out = subprocess.run(
        [str(installed.venv / "bin" / "python"), "-c", script],
        cwd=installed.workdir, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    tops, package, bpf_dir, schema_dir = json.loads(out)
    assert tops == ["ebpf_apm"]
    site = str(installed.venv)
    assert package.startswith(site) and bpf_dir.startswith(site) and schema_dir.startswith(site)
    assert {"uprobe_spans.bpf.c", "events.h", "probe_maps.h"} <= {
        p.name for p in Path(bpf_dir).iterdir()
    }
    assert installed.run("--help").returncode == 0


@pytest.mark.bpf
def test_every_command_runs_from_the_installed_wheel(
    installed: Installed, go_targets: dict[tuple[str, bool], Path], tmp_path: Path
) -> None:
    requests = plan_requests(60, seed=31)
    storage = f"sqlite:///{tmp_path / 'latency.sqlite'}"
    join_log, aggregate_log = tmp_path / "join.log", tmp_path / "aggregate.log"
    with EmbeddedBroker() as broker, go_server(go_targets[("1.27", True)]) as server:
        bootstrap = ["--bootstrap-servers", broker.bootstrap_servers]
        agent_args = ["--pid", str(server.pid), "--node-name", "wheel-node", *bootstrap]
        with Agent(agent_args, command=installed.command, cwd=installed.workdir) as agent:
            agent.wait_ready()
            join = installed.popen(join_log, "join", *bootstrap, *LIVE)
            aggregate = installed.popen(
                aggregate_log, "aggregate", *bootstrap, "--storage", storage, "--window", "1s",
                "--lateness", "2s", "--idle-timeout", "1s",
            )  # fmt: skip
            try:
                send_concurrently(server, requests, clients=8)

                def stored() -> list[dict]:
                    result = installed.run("query", "--storage", storage, "--since", "1h", "--json")
                    return json.loads(result.stdout) if result.returncode == 0 else []

                def all_stored() -> bool:
                    assert aggregate.poll() is None, aggregate_log.read_text()
                    return sum(row["count"] for row in stored()) >= len(requests)

                wait_for(all_stored, 60, "the aggregator to store every request")
                tail = installed.run(
                    "tail", "apm.spans", *bootstrap, "--from-beginning", "--json", "--max",
                    str(len(requests)), "--timeout", "10",
                )  # fmt: skip
            finally:
                for process in (aggregate, join):
                    process.terminate()
                    process.wait(30)
            assert agent.stop() == 0, agent.log
    assert (join.returncode, aggregate.returncode) == (0, 0), (
        join_log.read_text() + aggregate_log.read_text()
    )
    assert tail.returncode == 0, tail.stderr
    spans = [json.loads(line) for line in tail.stdout.splitlines()]
    assert sorted(s["http_path"] for s in spans) == sorted(r.path for r in requests)
    assert {s["pid"] for s in spans} == {server.pid}
    rows = stored()
    assert sum(row["count"] for row in rows) == len(requests)
    assert {row["workload"] for row in rows} == {Path(go_targets[("1.27", True)]).name}
