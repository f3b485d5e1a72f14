"""The real agent under process churn, and what it keeps in memory.

Thousands of short-lived processes of a traced Go executable (exec, a few calls of the
probed function or none, exit), selected by a rules file as they start: afterwards the
agent's resident size is within 10 MB of where it was, no perf event (probe) is left open,
and the per-process BPF maps are empty. The compiler is not mapped in the agent at all.

EBPF_APM_CHURN sets the number of processes (default 1,000, so `make test` stays short);
benchmarks/agent_memory.py runs 10,000.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from agent_footprint import compiler_mappings, map_entries, probe_fds, rss_kib, wait_settled
from agent_harness import Agent
from churn import rules_text, run_churn
from go_builds import TARGETS_DIR, build_go

from ebpf_apm.producer import bpf_loader

CHURN = int(os.environ.get("EBPF_APM_CHURN", "1000"))
WARMUP = 200  # first allocations (caches, arenas, the publisher's buffers) come before
# The kernel keeps the first 15 bytes of a map's name.
PER_PROCESS_MAPS = tuple(name[:15] for name in bpf_loader.PER_PROCESS_MAPS)
RSS_SLACK_KIB = 10 * 1024


@pytest.fixture(scope="module")
def gocalls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("churn")
    built = build_go(TARGETS_DIR / "gocalls", out / "gocalls-build", "1.27", False)
    binary = out / "churnjob"  # a name no other process on the machine has
    shutil.copy2(built, binary)
    return binary


def test_churn_leaves_memory_flat_and_the_kernel_maps_empty(
    gocalls: Path, kafka_broker, tmp_path: Path
) -> None:
    rules = tmp_path / "targets.yaml"
    rules.write_text(rules_text(gocalls))
    args = ["--config", str(rules), "--no-kubernetes", "--node-name", "churn-node",
            "--bootstrap-servers", kafka_broker.bootstrap_servers]  # fmt: skip
    with Agent(args) as agent:
        agent.wait_ready()
        pid = agent.process.pid
        assert compiler_mappings(pid) == [], "BCC/LLVM mapped in the agent"
        at_rest = probe_fds(pid)  # the network and exec/exit tracepoints
        run_churn(gocalls, WARMUP)
        wait_settled(pid, at_rest, PER_PROCESS_MAPS)
        before = rss_kib(pid)
        seconds = run_churn(gocalls, CHURN)
        settled = wait_settled(pid, at_rest, PER_PROCESS_MAPS)
        after = rss_kib(pid)
        attached = agent.log.count("selected by churn")
        print(f"\n{CHURN} processes in {seconds:.1f} s, {attached} attached (with warm-up), "
              f"settled {settled:.1f} s later; agent RSS {before / 1024:.1f} -> "
              f"{after / 1024:.1f} MiB")  # fmt: skip
        assert agent.process.poll() is None, agent.log
        assert attached > CHURN // 20, f"attached {attached}:\n{agent.log[-3000:]}"
        assert probe_fds(pid) == at_rest, "probes left attached"
        assert map_entries(pid, PER_PROCESS_MAPS) == dict.fromkeys(PER_PROCESS_MAPS, 0)
        assert after - before <= RSS_SLACK_KIB, f"RSS grew {(after - before) / 1024:.1f} MiB"
        assert compiler_mappings(pid) == []
        assert agent.stop() == 0, agent.log
