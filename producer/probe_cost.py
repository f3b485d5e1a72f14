"""The overhead meter: probe hits, and the CPU the probes cost each traced process.

    probe_hits map: per process, runs of each program for it   ┐
    BPF run-time statistics: per program, run_time_ns, run_cnt ├─> ProbeCostMeter (cumulative)
    trap cost per uprobe hit: trap_calibration, at start       ┘    ├─> ProbeCostCollector
                                                                     └─> stats line rates

A process's CPU estimate grows, at every sample, by what happened since the previous one:

    sum over programs of (its hits in the process x its mean run time over the interval)
    + uprobe and uretprobe hits x the calibrated trap cost

The mean is the program's own over the interval (all processes share a program), so the
estimate stays monotonic, as a Prometheus counter must. Network programs run in the kernel
from tracepoints (or kprobes): no trap, their run time only.

`ProbeCostMeter.update` and `cost_rates` are pure (figures in, figures out); `sample` reads
the kernel through `ProbeCostSource` (AgentProbes). The collector may run on the metrics
server's thread: the meter locks around a sample. `final` is the last figure of one process
as it is detached (on every exit): it reads that process's record only, one map lookup, so
an exit costs the same however many processes are traced.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, Metric

from ebpf_apm.producer.bpf_run_stats import RunStats
from ebpf_apm.producer.map_layout import PROBE_HITS
from ebpf_apm.producer.span_batcher import ProcessInfo

HIT_KINDS: tuple[str, ...] = tuple(PROBE_HITS.names or ())
TRAPPED_KINDS = ("entry", "ret", "uretprobe")  # a uprobe or uretprobe trap each
# Program name in the BPF source -> the probe_hits field that counts its runs per process.
PROGRAM_KINDS: dict[str, str] = {
    "span_entry": "entry",
    "span_return": "ret",
    "span_uretprobe": "uretprobe",
    "tracepoint__sock__sock_send_length": "net",
    "tracepoint__sock__sock_recv_length": "net",
    "kprobe__tcp_sendmsg": "net",
    "kprobe__tcp_recvmsg": "net",
    "kretprobe__tcp_sendmsg": "net",
    "kretprobe__tcp_recvmsg": "net",
}
LABELS = ("namespace", "pod", "container", "pid", "exe")

Hits = Mapping[str, int]  # HIT_KINDS -> runs


class ProbeCostSource(Protocol):
    def probe_hits(self) -> Mapping[int, Any]: ...  # pid -> PROBE_HITS record

    def process_hits(self, pid: int) -> Any: ...  # its PROBE_HITS record, or None

    def program_run_stats(self) -> Mapping[str, RunStats]: ...


@dataclass(frozen=True)
class ProcessCost:
    pid: int
    hits: int  # every probe run for the process since it was attached
    cpu_ns: float  # estimated CPU the probes cost it since then


def runs_by_kind(programs: Mapping[str, RunStats]) -> dict[str, RunStats]:
    """Run time and count summed over the programs that count into each hit kind."""
    totals: dict[str, RunStats] = {}
    for name, stats in programs.items():
        # A copy of a program loaded for another attach type is "NAME.SUFFIX" (uprobe_multi).
        kind = PROGRAM_KINDS.get(name.split(".", 1)[0])
        if kind is not None:
            before = totals.get(kind, RunStats(0, 0))
            totals[kind] = RunStats(
                before.run_time_ns + stats.run_time_ns, before.run_cnt + stats.run_cnt
            )
    return totals


def mean_run_ns(before: RunStats | None, now: RunStats) -> float:
    """Mean run time over the interval; over the program's life if it did not run since."""
    if before is not None and now.run_cnt > before.run_cnt:
        return (now.run_time_ns - before.run_time_ns) / (now.run_cnt - before.run_cnt)
    return now.run_time_ns / now.run_cnt if now.run_cnt else 0.0


class ProbeCostMeter:
    """Cumulative hits and CPU estimate per traced process."""

    def __init__(self, source: ProbeCostSource | None, trap_ns_per_hit: float | None) -> None:
        """`trap_ns_per_hit` None: calibration failed, the estimate is run time only."""
        self.source = source
        self.trap_ns_per_hit = trap_ns_per_hit or 0.0
        self._hits: dict[int, dict[str, int]] = {}
        self._cpu_ns: dict[int, float] = {}
        self._runs: dict[str, RunStats] = {}
        self._lock = threading.Lock()

    def sample(self) -> dict[int, ProcessCost]:
        """Read the kernel's counters and bring every process's estimate up to date."""
        assert self.source is not None
        with self._lock:
            records = self.source.probe_hits()
            hits = {pid: {k: int(record[k]) for k in HIT_KINDS} for pid, record in records.items()}
            return self.update(hits, self.source.program_run_stats())

    def final(self, pid: int) -> ProcessCost | None:
        """The figures of one process up to now, which is then forgotten (it is being
        detached); None if no probe ever ran for it. Reads its own record (one lookup) and
        the programs' run statistics, not every process's: it runs on every exit."""
        assert self.source is not None
        with self._lock:
            record = self.source.process_hits(pid)
            if record is None:
                self._forget(pid)
                return None
            hits = {k: int(record[k]) for k in HIT_KINDS}
            # The mean run time since the last sample; the sample's baseline stays, so the
            # other processes' next interval is unchanged.
            means = _means(self._runs, runs_by_kind(self.source.program_run_stats()))
            cost = self._account(pid, hits, means)
            self._forget(pid)
            return cost

    def update(
        self, hits: Mapping[int, Hits], programs: Mapping[str, RunStats]
    ) -> dict[int, ProcessCost]:
        """Account the hits since the previous update; processes absent from `hits` (exited
        and detached) are forgotten."""
        runs = runs_by_kind(programs)
        means = _means(self._runs, runs)
        self._runs = runs
        costs = {pid: self._account(pid, now, means) for pid, now in hits.items()}
        for gone in set(self._hits) - set(hits):
            self._forget(gone)
        return costs

    def _account(self, pid: int, now: Hits, means: Mapping[str, float]) -> ProcessCost:
        """Add the hits since the process's previous figures, at `means` ns per run."""
        before = self._hits.get(pid, {})
        if any(now.get(k, 0) < before.get(k, 0) for k in HIT_KINDS):
            before = {}  # a new process under a reused pid
            self._cpu_ns.pop(pid, None)
        added = 0.0
        for kind in HIT_KINDS:
            new = now.get(kind, 0) - before.get(kind, 0)
            added += new * means.get(kind, 0.0)
            if kind in TRAPPED_KINDS:
                added += new * self.trap_ns_per_hit
        self._cpu_ns[pid] = self._cpu_ns.get(pid, 0.0) + added
        self._hits[pid] = {k: now.get(k, 0) for k in HIT_KINDS}
        return ProcessCost(pid, sum(self._hits[pid].values()), self._cpu_ns[pid])

    def _forget(self, pid: int) -> None:
        self._hits.pop(pid, None)
        self._cpu_ns.pop(pid, None)


def _means(before: Mapping[str, RunStats], runs: Mapping[str, RunStats]) -> dict[str, float]:
    return {kind: mean_run_ns(before.get(kind), now) for kind, now in runs.items()}


@dataclass(frozen=True)
class CostRate:
    pid: int
    hits_per_s: float
    cpu_fraction: float  # of one core


def cost_rates(
    before: Mapping[int, ProcessCost], now: Mapping[int, ProcessCost], seconds: float
) -> list[CostRate]:
    """Per process, hits per second and CPU share between two samples, costliest first."""
    if seconds <= 0:
        return []
    rates = []
    for pid, cost in now.items():
        prior = before.get(pid, ProcessCost(pid, 0, 0.0))
        if cost.hits < prior.hits:  # pid reused
            prior = ProcessCost(pid, 0, 0.0)
        rates.append(
            CostRate(
                pid,
                (cost.hits - prior.hits) / seconds,
                (cost.cpu_ns - prior.cpu_ns) / (seconds * 1e9),
            )
        )
    return sorted(rates, key=lambda rate: (-rate.cpu_fraction, rate.pid))


def format_rates(rates: list[CostRate], limit: int = 5) -> str:
    """`pid 1234 hits 5.1k/s cpu 2.3%, ...` for the stats line (the `limit` costliest)."""
    parts = [
        f"pid {r.pid} hits {_si(r.hits_per_s)}/s cpu {r.cpu_fraction * 100:.1f}%"
        for r in rates[:limit]
    ]
    if len(rates) > limit:
        parts.append(f"{len(rates) - limit} more")
    return ", ".join(parts)


def format_totals(costs: Mapping[int, ProcessCost], limit: int = 5) -> str:
    """`pid 1234 hits 51234 cpu 2.310 s, ...` for the final totals line (exact counts)."""
    ordered = sorted(costs.values(), key=lambda c: (-c.cpu_ns, c.pid))
    parts = [f"pid {c.pid} hits {c.hits} cpu {c.cpu_ns / 1e9:.3f} s" for c in ordered[:limit]]
    if len(ordered) > limit:
        parts.append(f"{len(ordered) - limit} more")
    return ", ".join(parts)


def _si(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"


class ProbeCostCollector:
    """A prometheus_client custom collector: `ebpf_apm_probe_hits_total` and
    `ebpf_apm_probe_cpu_seconds_total` per traced process, labelled with its Kubernetes
    namespace, pod and container (empty outside a pod), pid and executable.

    `process_info` is the agent's table of traced processes (AgentPipeline.process_info),
    read at every scrape, so labels follow the pod metadata as it arrives."""

    def __init__(self, meter: ProbeCostMeter, process_info: Mapping[int, ProcessInfo]) -> None:
        self.meter = meter
        self.process_info = process_info

    def describe(self) -> Iterator[Metric]:
        """Names only, so registering does not sample the kernel."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        hits, cpu = self._families()
        for pid, cost in sorted(self.meter.sample().items()):
            labels = self._labels(pid)
            hits.add_metric(labels, cost.hits)
            cpu.add_metric(labels, cost.cpu_ns / 1e9)
        yield hits
        yield cpu

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, CounterMetricFamily]:
        return (
            CounterMetricFamily(
                "ebpf_apm_probe_hits",
                "Probe program runs in a traced process (uprobe entry and return sites, "
                "uretprobes, socket I/O hooks)",
                labels=LABELS,
            ),
            CounterMetricFamily(
                "ebpf_apm_probe_cpu_seconds",
                "Estimated CPU the probes took from a traced process: BPF run time "
                "(kernel statistics) plus uprobe hits times the trap cost calibrated at start",
                labels=LABELS,
            ),
        )

    def _labels(self, pid: int) -> list[str]:
        info = self.process_info.get(pid)
        k8s = (info.k8s if info else None) or {}
        return [
            k8s.get("k8s_namespace") or "",
            k8s.get("k8s_pod") or "",
            k8s.get("k8s_container") or "",
            str(pid),
            info.exe if info else "",
        ]
