"""What one uprobe trap costs a process on this node, measured when the agent starts.

A uprobe hit enters the kernel through a breakpoint, runs the BPF program, then steps over
the probed instruction: about 20 us on a nested VM, under 1 us on bare metal. The BPF
run-time statistics only cover the program, so the agent measures the rest here rather than
assuming a figure:

    helper process (this Python, `os.getppid()` in a loop, timed in its own thread CPU time)
      rounds without a probe | rounds with the empty `trap_calibration` program on libc's
      getppid, in the helper only
    trap cost per hit = (median CPU per call with - without) - the empty program's run time

CPU time, not wall time: on a busy node the helper may wait for a core, which costs it
nothing. The figure is the median of the rounds.
"""

from __future__ import annotations

import logging
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Protocol

from ebpf_apm.producer.bpf_run_stats import RunStats
from ebpf_apm.producer.errors import AgentError

log = logging.getLogger(__name__)

CALIBRATION_SYMBOL = "getppid"
CALIBRATION_PROGRAM = "trap_calibration"

# Each stdin line: one timed run of `calls` getppid() calls; prints its thread CPU ns.
_HELPER = """
import os, sys, time
calls = int(sys.argv[1])
for _ in sys.stdin:
    start = time.thread_time_ns()
    for _ in range(calls):
        os.getppid()
    print(time.thread_time_ns() - start, flush=True)
"""


class CalibrationError(AgentError):
    """The trap cost could not be measured (the helper failed, or the probe did not attach)."""


class CalibrationProbes(Protocol):
    def attach_trap_calibration(self, binary: str, symbol: str, pid: int) -> None: ...

    def detach_trap_calibration(self) -> None: ...

    def program_run_stats(self) -> dict[str, RunStats]: ...


@dataclass(frozen=True)
class TrapCost:
    ns_per_hit: float  # what a hit costs the process besides its BPF program's run time
    plain_ns_per_call: float  # the helper's CPU per call without the probe
    probed_ns_per_call: float
    program_ns_per_hit: float  # the empty program's own run time (0 if stats are off)
    calls: int
    rounds: int

    def describe(self) -> str:
        return (
            f"{self.ns_per_hit / 1000:.2f} us per hit (calibrated: {self.rounds} x "
            f"{self.calls} getppid() calls, {self.probed_ns_per_call:,.0f} ns per call with "
            f"an empty uprobe, {self.plain_ns_per_call:,.0f} ns without)"
        )


def calibrate_trap_cost(
    probes: CalibrationProbes, calls: int = 2000, rounds: int = 5, timeout_s: float = 30.0
) -> TrapCost:
    """Measure the trap cost with a helper process (takes about rounds x calls x cost)."""
    helper = subprocess.Popen(
        [sys.executable, "-c", _HELPER, str(calls)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout_s

    def run() -> float:
        if time.monotonic() > deadline:
            raise CalibrationError(f"trap calibration took longer than {timeout_s:.0f} s")
        assert helper.stdin is not None and helper.stdout is not None
        helper.stdin.write("\n")
        helper.stdin.flush()
        line = helper.stdout.readline()
        if not line:
            raise CalibrationError(f"the calibration helper (pid {helper.pid}) died")
        return int(line) / calls

    try:
        run()  # warm up, and libc is mapped by now
        libc = _libc_of(helper.pid)
        plain = [run() for _ in range(rounds)]
        before = probes.program_run_stats().get(CALIBRATION_PROGRAM, RunStats(0, 0))
        probes.attach_trap_calibration(libc, CALIBRATION_SYMBOL, helper.pid)
        try:
            probed = [run() for _ in range(rounds)]
        finally:
            probes.detach_trap_calibration()
        after = probes.program_run_stats().get(CALIBRATION_PROGRAM, RunStats(0, 0))
    finally:
        _end(helper)
    hits = after.run_cnt - before.run_cnt
    program_ns = (after.run_time_ns - before.run_time_ns) / hits if hits > 0 else 0.0
    if hits and hits != calls * rounds:
        log.debug("calibration probe ran %d times for %d calls", hits, calls * rounds)
    plain_ns, probed_ns = statistics.median(plain), statistics.median(probed)
    cost = TrapCost(
        ns_per_hit=max(probed_ns - plain_ns - program_ns, 0.0),
        plain_ns_per_call=plain_ns,
        probed_ns_per_call=probed_ns,
        program_ns_per_hit=program_ns,
        calls=calls,
        rounds=rounds,
    )
    if cost.ns_per_hit == 0.0:
        raise CalibrationError(
            f"a uprobe added no measurable CPU to {calls} calls ({cost.describe()}): "
            "the calibration probe did not fire"
        )
    return cost


def _libc_of(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            path = line.split(maxsplit=5)[-1].strip()
            if "/libc.so" in path or "/libc-" in path or "/ld-musl-" in path:  # glibc, musl
                return path
    raise CalibrationError(
        f"the calibration helper (pid {pid}, {sys.executable}) maps no libc to probe"
    )


def _end(helper: subprocess.Popen[str]) -> None:
    """End the helper this module started (by its pid, through its handle)."""
    for stream in (helper.stdin, helper.stdout):
        if stream is not None:
            stream.close()
    try:
        helper.wait(5)
    except subprocess.TimeoutExpired:
        helper.kill()
        helper.wait()
    if helper.stderr is not None:
        helper.stderr.close()
