"""The overhead meter: hits counted per process in the kernel, the trap cost calibrated on
this node, the CPU estimate built from them and exported to Prometheus.

Ground truth is what the test makes the targets do: a Go server answers a known, odd number
of requests (each passes ServeHTTP's entry, one of its RETs and one RET of finishRequest, and
a RET of runtime.newproc1 for each goroutine it makes);
gocalls calls main.work a known number of times (entry + RET each).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from agent_harness import Agent, go_server
from go_builds import TARGETS_DIR, build_go
from prometheus_client import CollectorRegistry, generate_latest

from ebpf_apm.producer.bpf_loader import AgentProbes, ProbeOptions
from ebpf_apm.producer.bpf_run_stats import RunStats
from ebpf_apm.producer.probe_cost import (
    CostRate,
    ProbeCostCollector,
    ProbeCostMeter,
    ProcessCost,
    cost_rates,
    format_rates,
    format_totals,
)
from ebpf_apm.producer.span_batcher import ProcessInfo
from ebpf_apm.producer.targets import FunctionNames, attach_target, resolve_target
from ebpf_apm.producer.trap_calibration import calibrate_trap_cost

REQUESTS = 37
# ServeHTTP's entry, a RET of it and of finishRequest; and a RET of runtime.newproc1 (the
# tree follows goroutine creation) for each of the two goroutines a request on a new
# connection makes: the connection's, and the one net/http starts to read in the background.
HITS_PER_REQUEST = {"entry": 1, "ret": 2 + 2}


def hits(entry: int = 0, ret: int = 0, uretprobe: int = 0, net: int = 0) -> dict[str, int]:
    return {"entry": entry, "ret": ret, "uretprobe": uretprobe, "net": net}


# --- the pure part ---------------------------------------------------------------------


def test_run_time_is_apportioned_by_hits_and_the_trap_cost_added() -> None:
    meter = ProbeCostMeter(None, trap_ns_per_hit=1000.0)
    programs = {
        "span_entry": RunStats(run_time_ns=1200, run_cnt=12),  # 100 ns a run
        "span_return": RunStats(2400, 12),  # 200 ns a run
        # The two net programs count into one kind: 800 ns over 8 runs, some of them for
        # untraced processes (the tracepoints fire for every socket).
        "tracepoint__sock__sock_send_length": RunStats(300, 3),
        "tracepoint__sock__sock_recv_length": RunStats(500, 5),
        "trap_calibration": RunStats(10_000, 1),  # not a probe of any target
    }
    first = meter.update({11: hits(10, 10, net=4), 22: hits(2, 2)}, programs)
    assert first == {
        11: ProcessCost(11, 24, 10 * 100 + 10 * 200 + 4 * 100 + 20 * 1000),
        22: ProcessCost(22, 4, 2 * 100 + 2 * 200 + 4 * 1000),
    }
    # Next interval: span_entry's mean over it is (3200-1200)/(22-12) = 200 ns; span_return
    # did not run for anyone (its lifetime mean stays 200); pid 22 exited and was detached.
    programs["span_entry"] = RunStats(3200, 22)
    second = meter.update({11: hits(20, 10, net=4)}, programs)
    assert second == {11: ProcessCost(11, 34, first[11].cpu_ns + 10 * 200 + 10 * 1000)}
    # pid 22 again, counters from zero: a new process, not a negative step.
    programs["span_entry"] = RunStats(3300, 23)
    third = meter.update({11: hits(20, 10, net=4), 22: hits(1)}, programs)
    assert third[22] == ProcessCost(22, 1, 100 + 1000)
    assert third[11] == second[11]


def test_without_a_calibrated_trap_cost_the_estimate_is_run_time_only() -> None:
    meter = ProbeCostMeter(None, trap_ns_per_hit=None)
    cost = meter.update(
        {5: hits(3, 3)}, {"span_entry": RunStats(30, 3), "span_return": RunStats(60, 3)}
    )
    assert cost == {5: ProcessCost(5, 6, 3 * 10 + 3 * 20)}


def test_rates_and_the_stats_line_figures() -> None:
    before = {1: ProcessCost(1, 1000, 1e9), 2: ProcessCost(2, 500, 0.0)}
    now = {
        1: ProcessCost(1, 52_000, 1.46e9),
        2: ProcessCost(2, 700, 2e6),
        3: ProcessCost(3, 5, 1e5),
    }
    rates = cost_rates(before, now, seconds=10.0)
    assert rates == [CostRate(1, 5100.0, 0.046), CostRate(2, 20.0, 0.0002), CostRate(3, 0.5, 1e-5)]
    assert format_rates(rates, limit=2) == (
        "pid 1 hits 5.1k/s cpu 4.6%, pid 2 hits 20/s cpu 0.0%, 1 more"
    )
    assert format_totals(now, limit=1) == "pid 1 hits 52000 cpu 1.460 s, 2 more"


class FixedSource:
    """Figures the test sets, in the shapes AgentProbes returns them."""

    def __init__(self, hits: Mapping[int, dict[str, int]], programs: dict[str, RunStats]) -> None:
        self.hits, self.programs = hits, programs

    def probe_hits(self) -> Mapping[int, Any]:
        return self.hits

    def process_hits(self, pid: int) -> Any:
        return self.hits.get(pid)

    def program_run_stats(self) -> Mapping[str, RunStats]:
        return self.programs


class CountingSource(FixedSource):
    """Counts how often every process's counters are read (a whole-meter sample)."""

    whole_reads = 0

    def probe_hits(self) -> Mapping[int, Any]:
        self.whole_reads += 1
        return self.hits


def test_an_exiting_process_is_accounted_from_its_own_record_alone() -> None:
    """`final` on every exit: that process's record only, and the other processes' next
    figures are what they would have been without it."""
    first = {1: hits(10, 10), 2: hits(4, 4)}
    later = {1: hits(30, 30), 2: hits(6, 6)}
    programs = {"span_entry": RunStats(1400, 14), "span_return": RunStats(2800, 14)}
    # 24 more runs of each program since the sample, at 300 and 500 ns: the interval's means.
    programs_later = {
        "span_entry": RunStats(1400 + 24 * 300, 38),
        "span_return": RunStats(2800 + 24 * 500, 38),
    }
    source = CountingSource(first, programs)
    meter, twin = (
        ProbeCostMeter(source, 1000.0),
        ProbeCostMeter(FixedSource(first, programs), 1000.0),
    )
    before = meter.sample()
    twin.sample()
    source.hits, source.programs = later, programs_later
    cost = meter.final(1)
    assert source.whole_reads == 1  # only the sample before
    added = 20 * 300 + 20 * 500 + 40 * 1000  # the interval's mean run times, plus traps
    assert cost == ProcessCost(1, 60, before[1].cpu_ns + added)
    assert meter.final(3) is None  # never hit
    twin.source = FixedSource(later, programs_later)
    assert meter.sample()[2] == twin.sample()[2]


def test_collector_exports_counters_with_pod_labels() -> None:
    source = FixedSource(
        {101: hits(7, 7), 102: hits(1, 2, net=3)},
        {"span_entry": RunStats(800, 8), "span_return": RunStats(900, 9)},
    )
    info = {
        101: ProcessInfo(
            "/app/server",
            {
                "k8s_namespace": "shop",
                "k8s_pod": "cart-7d9",
                "k8s_container": "cart",
                "k8s_workload": "cart",
            },
        ),
        102: ProcessInfo("/usr/bin/other"),
    }
    registry = CollectorRegistry()
    registry.register(ProbeCostCollector(ProbeCostMeter(source, 2000.0), info))
    text = generate_latest(registry).decode()
    assert "# TYPE ebpf_apm_probe_hits_total counter" in text
    assert "# TYPE ebpf_apm_probe_cpu_seconds_total counter" in text
    labels = 'container="cart",exe="/app/server",namespace="shop",pid="101",pod="cart-7d9"'
    assert f"ebpf_apm_probe_hits_total{{{labels}}} 14.0" in text
    cpu = (7 * 100 + 7 * 100 + 14 * 2000) / 1e9
    assert f"ebpf_apm_probe_cpu_seconds_total{{{labels}}} {cpu!r}" in text
    other = 'container="",exe="/usr/bin/other",namespace="",pid="102",pod=""'
    assert f"ebpf_apm_probe_hits_total{{{other}}} 6.0" in text


# --- real BPF, real Go targets -----------------------------------------------------------


@pytest.fixture(scope="module")
def gocalls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gocalls") / "gocalls"
    return build_go(TARGETS_DIR / "gocalls", out, "1.27", False)


@pytest.fixture(scope="module")
def probes() -> Iterator[AgentProbes]:
    loaded = AgentProbes(ProbeOptions(net_hooks="auto"))
    try:
        yield loaded
    finally:
        loaded.close()


def hit_counts(probes: AgentProbes) -> dict[int, dict[str, int]]:
    return {
        pid: {name: int(record[name]) for name in ("entry", "ret", "uretprobe", "net")}
        for pid, record in probes.probe_hits().items()
    }


@pytest.mark.bpf
def test_every_request_is_counted_at_its_probe_sites(go_targets: dict, probes: AgentProbes) -> None:
    with go_server(go_targets[("1.27", False)]) as server:
        attach_target(probes, resolve_target(server.pid, [], FunctionNames(), http=True))
        try:
            for _ in range(REQUESTS):
                assert server.get("/health")[0] == 200
            # finishRequest returns after the response is on the wire: the client may read the
            # last response before that RET fires. Wait for it (briefly), then compare exactly.
            deadline = time.monotonic() + 2.0
            counted = hit_counts(probes)[server.pid]
            while counted["ret"] < HITS_PER_REQUEST["ret"] * REQUESTS and (
                time.monotonic() < deadline
            ):
                time.sleep(0.02)
                counted = hit_counts(probes)[server.pid]
        finally:
            probes.detach_process(server.pid)
    net = counted.pop("net")
    assert counted == {name: n * REQUESTS for name, n in HITS_PER_REQUEST.items()} | {
        "uretprobe": 0
    }
    if probes.net_enabled:
        # At least the request's receive and the response's send; a few more (a receive
        # that finds the connection closed) are possible, many more are not.
        assert 2 * REQUESTS <= net <= 6 * REQUESTS, net
    else:
        assert net == 0


def start_waiting(command: list[str]) -> subprocess.Popen[str]:
    """A target that prints READY <pid> and waits for a line on stdin before its calls."""
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().split()[:1] == ["READY"]
    return proc


@pytest.mark.bpf
def test_two_processes_are_counted_apart_and_an_exited_one_is_forgotten(
    gocalls: Path, c_target: Path, probes: AgentProbes
) -> None:
    """A Go process (entry + RET uprobes) and a C one (entry uprobe + uretprobe)."""
    go = start_waiting([str(gocalls), "-n", str(REQUESTS), "-wait"])
    c = start_waiting([str(c_target), "23", "0"])
    procs = {go.pid: go, c.pid: c}
    try:
        names = FunctionNames()
        attach_target(probes, resolve_target(go.pid, ["main.work"], names, False))
        attach_target(probes, resolve_target(c.pid, ["compute"], names, False))
        for proc in procs.values():
            proc.communicate("\n", timeout=30)
            assert proc.returncode == 0
        counted = hit_counts(probes)
        assert {pid: counted.get(pid) for pid in procs} == {
            go.pid: hits(entry=REQUESTS, ret=REQUESTS),
            c.pid: hits(entry=23, uretprobe=23),
        }
        meter = ProbeCostMeter(probes, trap_ns_per_hit=1000.0)
        info = {go.pid: ProcessInfo(str(gocalls)), c.pid: ProcessInfo(str(c_target))}
        registry = CollectorRegistry()
        registry.register(ProbeCostCollector(meter, info))
        text = generate_latest(registry).decode()
        for pid, exe, n in ((go.pid, gocalls, 2 * REQUESTS), (c.pid, c_target, 2 * 23)):
            labels = f'container="",exe="{exe}",namespace="",pid="{pid}",pod=""'
            assert f"ebpf_apm_probe_hits_total{{{labels}}} {float(n)}" in text
            cpu = re.search(rf"ebpf_apm_probe_cpu_seconds_total{{{labels}}} (\S+)", text)
            assert cpu is not None, text
            # The trap cost given, plus some BPF run time (statistics are on).
            assert n * 1000 / 1e9 < float(cpu.group(1)) < n * 50_000 / 1e9
        # The Go process exited; the agent detaches it (AgentPipeline._on_exit): its
        # counters go, the other process's stay.
        probes.detach_process(go.pid)
        counted = hit_counts(probes)
        assert go.pid not in counted and counted[c.pid] == hits(entry=23, uretprobe=23)
        assert set(meter.sample()) == {c.pid}
    finally:
        for pid, proc in procs.items():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            probes.detach_process(pid)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
    assert not set(procs) & set(hit_counts(probes))


@pytest.mark.bpf
def test_trap_calibration_gives_a_plausible_cost(probes: AgentProbes) -> None:
    cost = calibrate_trap_cost(probes, calls=1000, rounds=3)
    # Bare metal: a few hundred ns; nested VMs: tens of us. Outside that, something is off.
    assert 100 < cost.ns_per_hit < 200_000, cost
    assert cost.probed_ns_per_call > cost.plain_ns_per_call + cost.ns_per_hit * 0.99
    assert probes.run_time_stats.enabled
    assert 0 < cost.program_ns_per_hit < cost.ns_per_hit  # the empty program ran, briefly
    assert probes.attached_uprobes == 0  # the calibration probe is gone


@pytest.mark.bpf
@pytest.mark.integration
def test_agent_reports_the_cost_per_process(go_targets: dict, kafka_broker) -> None:
    with go_server(go_targets[("1.27", False)]) as server:
        args = ["--pid", str(server.pid), "--net-hooks", "off"]
        args += ["--bootstrap-servers", kafka_broker.bootstrap_servers, "--node-name", "n1"]
        with Agent(args) as agent:
            agent.wait_ready()
            for _ in range(REQUESTS):
                assert server.get("/health")[0] == 200
            assert agent.stop() == 0, agent.log
    assert re.search(r"uprobe trap cost on this node: \d+\.\d\d us per hit", agent.log), agent.log
    totals = re.search(rf"probe cost: pid {server.pid} hits (\d+) cpu ([\d.]+) s", agent.log)
    assert totals is not None, agent.log
    assert int(totals.group(1)) == REQUESTS * sum(HITS_PER_REQUEST.values())
    assert float(totals.group(2)) > 0


@pytest.mark.bpf
@pytest.mark.integration
def test_the_totals_keep_the_cost_of_a_process_that_exited(go_targets: dict, kafka_broker) -> None:
    """The target exits first (the agent then exits on its own): its cost stays in the totals."""
    with go_server(go_targets[("1.27", False)]) as server:
        args = ["--pid", str(server.pid), "--net-hooks", "off"]
        args += ["--bootstrap-servers", kafka_broker.bootstrap_servers, "--node-name", "n1"]
        with Agent(args) as agent:
            agent.wait_ready()
            for _ in range(REQUESTS):
                assert server.get("/health")[0] == 200
            time.sleep(0.2)  # the last finishRequest RET fires after the client has its answer
            server.process.terminate()
            assert agent.wait() == 0, agent.log
    totals = re.search(r"totals: .*probe cost: (.*)", agent.log)
    assert totals is not None, agent.log
    gone = re.search(r"processes gone before the end: hits (\d+) cpu ([\d.]+) s", totals.group(1))
    assert gone is not None, totals.group(0)
    # Shutting down (SIGTERM, http.Server.Shutdown) makes a goroutine or two of its own:
    # a newproc1 RET each.
    extra = int(gone.group(1)) - REQUESTS * sum(HITS_PER_REQUEST.values())
    assert extra in (0, 1, 2), gone.group(0)
    assert float(gone.group(2)) > 0
    assert "Kafka unreachable" not in totals.group(0)


@pytest.mark.bpf
def test_without_cap_sys_admin_run_time_statistics_stay_off_and_say_so() -> None:
    """BPF_ENABLE_STATS needs CAP_SYS_ADMIN (the DaemonSet does not grant it): the agent
    goes on with the trap cost only, and says what to do."""
    code = (
        "import logging; logging.basicConfig()\n"
        "from ebpf_apm.producer.bpf_run_stats import RunTimeStats\n"
        "stats = RunTimeStats().open(); print(stats.enabled, stats.how)\n"
    )
    result = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-sys_admin",
            "--inh-caps=-sys_admin",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    if Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip() == "1":
        assert result.stdout.split() == ["True", "/proc/sys/kernel/bpf_stats_enabled", "=", "1"]
    else:
        assert result.stdout.split() == ["False", "off"]
        assert "BPF_ENABLE_STATS: Operation not permitted" in result.stderr
        assert "sysctl kernel.bpf_stats_enabled=1" in result.stderr
