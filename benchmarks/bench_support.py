"""What the agent benchmarks share: the Go service they load, reading a process's CPU, and
measuring probes against an empty program on the same points.

Imported by the scripts beside it (`python benchmarks/NAME.py` puts this folder on the path).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


class BenchmarkError(RuntimeError):
    """Something failed: the figures would mean nothing."""


def build_goserver() -> Path:
    """tests/targets/goserver built with Go 1.27 by the tests' builder, into its content-hash
    cache (a second run reuses it)."""
    sys.path.insert(0, str(REPO / "tests"))  # tests/ is not a package
    go_builds = importlib.import_module("go_builds")
    out = go_builds.default_cache_dir() / "bench" / "goserver-go1.27"
    try:
        return Path(go_builds.build_go(go_builds.TARGETS_DIR / "goserver", out, "1.27", False))
    except go_builds.BuildError as exc:
        raise BenchmarkError(f"building goserver: {exc}") from exc


def process_cpu_ns(pid: int) -> int:
    """On-CPU time (user + system, ns) of every live thread of `pid` so far, from
    /proc/PID/task/*/schedstat (Go threads do not exit, so nothing is missed)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                total += int(stat.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
    return total


# -- probe cost against an empty program (server_probe_cost.py, client_probe_cost.py) --------

EMPTY_PROGRAM = b"int empty(struct pt_regs *ctx) { return 0; }"


def probe_points(target: Any) -> list[int]:
    """ELF addresses of every uprobe the agent puts in `target` (a TargetProcess): entries
    and RETs, as attach_target places them."""
    points = []
    for fn in target.functions:
        base = fn.plan.symbol.address
        if not (fn.http_finish or fn.returns_only):
            points.append(base + fn.plan.entry_offset)
        if not fn.entry_only:
            points += [base + off for off in fn.plan.return_offsets]
    return points


@dataclass(frozen=True)
class ProbeCost:
    empty_runs: int  # runs of the empty program
    empty_ns: float  # its mean run time per hit
    project_ns: float  # the span programs' mean run time per hit
    hits: int  # the span programs' hits in the target (entries and RETs)
    records: int  # span records drained from the rings
    ratio: float  # (trap + project) / (trap + empty), per hit

    def per(self, count: int, unit: str) -> dict[str, float]:
        """The figures a script prints, hits, spans and empty runs per `unit` of `count`."""
        return {
            f"hits_per_{unit}": self.hits / count,
            f"spans_per_{unit}": self.records / count,
            "empty_ns": self.empty_ns,
            "project_ns": self.project_ns,
            "ratio": self.ratio,
            f"empty_runs_per_{unit}": self.empty_runs / count,
        }


def measure_probe_cost(
    target: Any, run: Callable[[], None], rings: tuple[str, ...], trap_ns: float
) -> ProbeCost:
    """Run the same load twice on `target`'s probe points: (e) an empty BPF program, then (p)
    the project's programs attached as the agent attaches them, draining `rings` (reader
    attributes of AgentProbes, e.g. "http_reader") meanwhile. Run times from the kernel's BPF
    statistics (RunTimeStats must be on); hits from the programs' per-process counters."""
    from bcc import BPF  # noqa: PLC0415 - bcc is loaded only where a program is built

    from ebpf_apm.producer.bpf_loader import AgentProbes, ProbeOptions
    from ebpf_apm.producer.bpf_run_stats import program_run_stats
    from ebpf_apm.producer.targets import attach_target

    pid = target.pid
    empty = BPF(text=EMPTY_PROGRAM)
    try:
        for addr in probe_points(target):
            empty.attach_uprobe(name=target.binary.encode(), addr=addr, fn_name=b"empty", pid=pid)
        fd = empty.funcs[b"empty"].fd
        before = program_run_stats(fd)
        run()
        after = program_run_stats(fd)
    finally:
        empty.cleanup()
    empty_runs = after.run_cnt - before.run_cnt
    empty_ns = (after.run_time_ns - before.run_time_ns) / max(empty_runs, 1)

    probes = AgentProbes(ProbeOptions())
    try:
        attach_target(probes, target)
        readers = [getattr(probes, ring) for ring in rings]
        done = threading.Event()
        records = [0]

        def drain() -> None:
            while not done.wait(0.005):
                records[0] += sum(len(reader.drain()) for reader in readers)
            records[0] += sum(len(reader.drain()) for reader in readers)

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        stats0 = probes.program_run_stats()
        run()
        time.sleep(0.05)
        stats1 = probes.program_run_stats()
        hits = probes.probe_hits().get(pid)
        done.set()
        drainer.join()
        probes.detach_process(pid)
    finally:
        probes.close()
    # Each program and its uprobe_multi copy ("span_entry.multi"), whichever is attached.
    programs = [p for p in stats1 if p.split(".", 1)[0] in ("span_entry", "span_return")]
    runs = sum(stats1[p].run_cnt - stats0[p].run_cnt for p in programs)
    run_ns = sum(stats1[p].run_time_ns - stats0[p].run_time_ns for p in programs)
    if hits is None:
        raise BenchmarkError(f"no probe hits counted for pid {pid}")
    project_ns = run_ns / max(runs, 1)
    return ProbeCost(
        empty_runs=empty_runs,
        empty_ns=empty_ns,
        project_ns=project_ns,
        hits=int(hits["entry"]) + int(hits["ret"]),
        records=records[0],
        ratio=(trap_ns + project_ns) / (trap_ns + empty_ns),
    )
