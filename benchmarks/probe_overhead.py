"""Probe cost in the target: wall time per traced call of main.work in tests/targets/gocalls.

Three conditions, interleaved in every round (the order rotates) and repeated; the median
of the rounds is reported:

  (a) no probes;
  (b) an empty BPF program (`return 0`) attached at exactly the project's probe points
      (entry offset and every RET of main.work, from ebpf_apm.producer.targets.resolve_target),
      pid-filtered: the kernel's own uprobe cost, which no BPF program can avoid;
  (c) the project's span program attached through the agent's path (AgentProbes.add_process
      + attach_function, as AgentPipeline.attach does) while a thread drains the ring
      buffer every few ms, so nothing is dropped; every round checks that the kernel wrote
      one record per call and lost none.

(c)/(b) is what the project's BPF code adds on top of the unavoidable trap; (b)-(a) is the
trap itself. Exit status 1 only on a failure (build, attach, lost or missing records).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ebpf_apm.producer.bpf_loader import AgentProbes, ProbeOptions
from ebpf_apm.producer.targets import FunctionNames, TargetProcess, attach_target, resolve_target

REPO = Path(__file__).resolve().parent.parent
FUNCTION = "main.work"
TARGET_RATIO = 1.2
DRAIN_EVERY_S = 0.002
# Kernel counters that must not move in condition (c), besides one "emitted" per call.
CHECKED_COUNTERS = ("emitted", "ring_full", "table_full", "return_without_entry", "read_failed")
# A call passes the entry probe and exactly one of the RET probes.
HITS_PER_CALL = 2
EMPTY_PROGRAM = b"int empty(struct pt_regs *ctx) { return 0; }"

Teardown = Callable[[], None]
Setup = Callable[[int], Teardown]


class BenchmarkError(RuntimeError):
    """Something failed: the figures would mean nothing."""


def build_gocalls() -> Path:
    """gocalls built with Go 1.27 by the tests' builder, into its content-hash cache."""
    # tests/ is not a package; its builder is imported from there rather than copied.
    sys.path.insert(0, str(REPO / "tests"))
    go_builds = importlib.import_module("go_builds")
    cache = go_builds.default_cache_dir()
    out = cache / "bench" / "gocalls-go1.27"
    try:
        return Path(go_builds.build_go(go_builds.TARGETS_DIR / "gocalls", out, "1.27", False))
    except go_builds.BuildError as exc:
        raise BenchmarkError(f"building gocalls: {exc}") from exc


def pin_process(cpu: int) -> None:
    """Pin every thread of this process to one core, away from the target's."""
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), {cpu})


def plan(pid: int) -> TargetProcess:
    """The agent's own resolution of main.work in this process (no HTTP probe)."""
    return resolve_target(pid, [FUNCTION], FunctionNames(), http=False)


# -- one run of the target --------------------------------------------------------------


def run_target(binary: Path, calls: int, cpu: int, setup: Setup) -> float:
    """Start gocalls, let `setup` attach to it while it waits, run it; its ns per call."""
    proc = subprocess.Popen(
        [str(binary), "-n", str(calls), "-wait"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        # Every Go thread inherits this: the target has a core to itself.
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        ready = proc.stdout.readline().split()
        if ready[:1] != ["READY"]:
            raise BenchmarkError(f"gocalls printed {ready!r} instead of READY <pid>")
        teardown = setup(proc.pid)
        try:
            proc.stdin.write("\n")
            proc.stdin.flush()
            result = proc.stdout.readline().split()
            if proc.wait() != 0 or result[:1] != ["NS_PER_CALL"]:
                raise BenchmarkError(f"gocalls exited {proc.returncode}, printed {result!r}")
        finally:
            teardown()
        return float(result[1])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


# -- the three conditions ---------------------------------------------------------------


def no_probes(pid: int) -> Teardown:
    return lambda: None


class EmptyProbes:
    """An empty BPF program on the project's probe points for main.work."""

    def __init__(self) -> None:
        from bcc import BPF  # noqa: PLC0415 - bcc is loaded only where a program is built

        self._bpf = BPF(text=EMPTY_PROGRAM)

    def setup(self, pid: int) -> Teardown:
        target = plan(pid)
        (fn,) = target.functions
        symbol = fn.plan.symbol.address
        # The same (binary, ELF address, pid) triples AgentProbes.attach_function uses.
        addresses = [symbol + fn.plan.entry_offset]
        addresses += [symbol + offset for offset in fn.plan.return_offsets]
        before = set(self._bpf.uprobe_fds)
        for addr in addresses:
            self._bpf.attach_uprobe(
                name=target.binary.encode(), addr=addr, fn_name=b"empty", pid=pid
            )
        return lambda: detach_new_uprobes(self._bpf, before)

    def close(self) -> None:
        self._bpf.cleanup()


def detach_new_uprobes(bpf: Any, before: set[bytes]) -> None:
    """Detach the uprobes attached since `before`, by BCC's event names.

    BCC's detach_uprobe(name, addr, pid) resolves /proc/PID/exe again to rebuild the event
    name, which fails once the target has exited; detaching by the names recorded at attach
    time works either way (AgentProbes.detach_process does the same).
    """
    for event in set(bpf.uprobe_fds) - before:
        bpf.detach_uprobe_event(event)


class Drainer(threading.Thread):
    """Reads the span ring every few ms, as the agent's reader would, so it never fills."""

    def __init__(self, probes: AgentProbes) -> None:
        super().__init__(name="ring-drainer", daemon=True)
        self._probes = probes
        self._done = threading.Event()
        self.records = 0

    def run(self) -> None:
        while not self._done.wait(DRAIN_EVERY_S):
            self.records += len(self._probes.span_reader.drain())
        self.records += len(self._probes.span_reader.drain())

    def finish(self) -> int:
        self._done.set()
        self.join()
        return self.records


class ProjectProbes:
    """The agent's span program, attached the way AgentPipeline.attach does it."""

    def __init__(self, calls: int) -> None:
        self.probes = AgentProbes(ProbeOptions())  # the agent's defaults
        self.calls = calls
        self.problems: list[str] = []

    def setup(self, pid: int) -> Teardown:
        target = plan(pid)
        before = self.probes.counters()
        attach_target(self.probes, target)
        drainer = Drainer(self.probes)
        drainer.start()

        def teardown() -> None:
            records = drainer.finish()
            self.probes.detach_process(pid)  # the agent's path: probes and map entries go
            self._check(before, self.probes.counters(), records)

        return teardown

    def _check(self, before: dict[str, int], after: dict[str, int], records: int) -> None:
        delta = {name: after.get(name, 0) - before.get(name, 0) for name in CHECKED_COUNTERS}
        lost = {name: n for name, n in delta.items() if name != "emitted" and n}
        if delta["emitted"] != self.calls or records != self.calls or lost:
            self.problems.append(
                f"{self.calls:,} calls: kernel emitted {delta['emitted']:,}, reader got "
                f"{records:,}, loss counters {lost or 'all zero'}"
            )

    def close(self) -> None:
        self.probes.close()


# -- rounds and report ------------------------------------------------------------------


def run_rounds(
    binary: Path, args: argparse.Namespace, conditions: list[tuple[str, Setup]]
) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {name: [] for name, _ in conditions}
    for r in range(args.rounds):
        # Rotate the order so drift (thermal, other load) does not favour one condition.
        shift = r % len(conditions)
        order = conditions[shift:] + conditions[:shift]
        line = []
        for name, setup in order:
            ns = run_target(binary, args.calls, args.target_cpu, setup)
            results[name].append(ns)
            line.append(f"{name} {ns:,.1f}")
        print(f"  round {r + 1}: " + ", ".join(line) + " ns/call", flush=True)
    return results


def report(results: dict[str, list[float]], labels: dict[str, str], sites: int) -> None:
    median = {name: statistics.median(values) for name, values in results.items()}
    print(f"\n{'condition':<58} {'ns/call (median)':>16} {'min':>9} {'max':>9}")
    for name, values in results.items():
        print(
            f"{labels[name]:<58} {median[name]:>16,.1f} {min(values):>9,.1f} {max(values):>9,.1f}"
        )
    a, b, c = median["a"], median["b"], median["c"]
    ratio = c / b
    # Other processes on the target's core only ever add time, so the fastest runs and the
    # ratio within each round (b and c run back to back) show how much is disturbance.
    paired = ", ".join(f"{rc / rb:.2f}" for rb, rc in zip(results["b"], results["c"], strict=True))
    print(
        f"\n(c)/(b) = {ratio:.3f} (medians); {min(results['c']) / min(results['b']):.3f} "
        f"on the fastest runs; per round {paired}"
    )
    print(f"  the project's BPF work adds {c - b:,.0f} ns per call to the {b - a:,.0f} ns trap")
    print(
        f"(b)-(a) = {b - a:,.0f} ns per call = the kernel's uprobe trap cost, "
        f"{(b - a) / sites:,.0f} ns per hit ({sites} hits per call)"
    )
    verdict = "target met" if ratio <= TARGET_RATIO else "target NOT met"
    print(f"target (c)/(b) <= {TARGET_RATIO} (medians): {verdict}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200_000, help="calls of main.work per run")
    parser.add_argument("--bench-cpu", type=int, default=0, help="this process and its drainer")
    parser.add_argument("--target-cpu", type=int, default=1)
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, binary: Path) -> int:
    empty = EmptyProbes()
    project = ProjectProbes(args.calls)
    try:
        conditions: list[tuple[str, Setup]] = [
            ("a", no_probes),
            ("b", empty.setup),
            ("c", project.setup),
        ]
        results = run_rounds(binary, args, conditions)
    finally:
        empty.close()
        project.close()
    labels = {
        "a": "(a) no probes",
        "b": "(b) empty BPF program at the project's probe points",
        "c": "(c) project's span probes, ring drained concurrently",
    }
    report(results, labels, HITS_PER_CALL)
    if project.problems:
        for problem in project.problems:
            print(f"error: condition (c): {problem}", file=sys.stderr)
        return 1
    print(f"(c) every round: {args.calls:,} records emitted and read, none lost")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        binary = build_gocalls()
        pin_process(args.bench_cpu)
        print(
            f"probe overhead, {time.strftime('%Y-%m-%d %H:%M')}, {os.uname().release}: "
            f"{FUNCTION} of gocalls (Go 1.27), {args.calls:,} calls per run, "
            f"{args.rounds} rounds, target on cpu {args.target_cpu}, "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        describe_sites(binary, args.target_cpu)
        return measure(args, binary)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def describe_sites(binary: Path, cpu: int) -> None:
    """Print where the probes go, from a throwaway run of the target."""
    seen: dict[str, Any] = {}

    def look(pid: int) -> Teardown:
        (fn,) = plan(pid).functions
        seen["plan"] = fn.plan
        return lambda: None

    run_target(binary, 1, cpu, look)
    p = seen["plan"]
    print(
        f"probe points: {p.symbol.name} at {p.symbol.address:#x}, entry +{p.entry_offset}, "
        f"RET at {', '.join(f'+{o}' for o in p.return_offsets)}"
    )


if __name__ == "__main__":
    sys.exit(main())
