"""Attaching and detaching a process's probes while the agent runs, against the real kernel.

The pipeline attaches in its probe worker thread; an exit seen while the attach is under
way must remove everything after the attach, never leave part of it. Ground truth: the
target (gocalls -wait) calls main.work a known number of times after the test says so, and
the kernel's maps and the agent's descriptors are read directly.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from go_builds import TARGETS_DIR, build_go

from ebpf_apm.producer.bpf_fds import LinkCloser
from ebpf_apm.producer.bpf_loader import PER_PROCESS_MAPS, AgentProbes, ProbeOptions
from ebpf_apm.producer.pipeline import AgentPipeline, PipelineSettings
from ebpf_apm.producer.targets import FunctionNames, attach_target, resolve_target

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="attaching uprobes needs root")

CALLS = 41
NOTHING = dict.fromkeys(PER_PROCESS_MAPS, 0)


@pytest.fixture(scope="module")
def gocalls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("attach") / "gocalls"
    return build_go(TARGETS_DIR / "gocalls", out, "1.27", False)


@pytest.fixture(scope="module")
def probes() -> Iterator[AgentProbes]:
    loaded = AgentProbes(ProbeOptions(net_hooks="off"))
    try:
        yield loaded
    finally:
        loaded.close()


class Waiting:
    """gocalls -wait: prints READY, makes its CALLS calls of main.work once told to."""

    def __init__(self, binary: Path) -> None:
        self.process = subprocess.Popen(
            [str(binary), "-n", str(CALLS), "-wait"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().split()[:1] == ["READY"]
        self.pid = self.process.pid

    def run_calls(self) -> None:
        self.process.communicate("\n", timeout=30)
        assert self.process.returncode == 0

    def end(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


def new_pipeline(probes: AgentProbes) -> AgentPipeline:
    # attach_running and detach use the probes only: no streams, no broker.
    return AgentPipeline(probes, [], {}, cast(Any, None), PipelineSettings())


def entry_hits(probes: AgentProbes, pid: int) -> int | None:
    record = probes.process_hits(pid)
    return None if record is None else int(record["entry"])


def wait_closed(probes: AgentProbes, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while probes.pending_detaches and time.monotonic() < deadline:
        time.sleep(0.02)
    assert probes.pending_detaches == 0


@pytest.mark.bpf
@pytest.mark.parametrize("how", ["detached", "cancelled, then detached"])
def test_an_exit_seen_while_the_attach_runs_leaves_nothing(
    gocalls: Path, probes: AgentProbes, how: str
) -> None:
    target = Waiting(gocalls)
    fds_before = probe_fds()
    try:
        resolved = resolve_target(target.pid, ["main.work"], FunctionNames(), False)
        pipeline = new_pipeline(probes)

        async def attach_and_exit() -> bool | None:
            attaching = asyncio.create_task(pipeline.attach_running(resolved))
            await asyncio.sleep(0)  # the attach is in the worker (or queued for it) now
            if how.startswith("cancelled"):  # what RuleTargets does on an exit event
                attaching.cancel()
            pipeline.detach(target.pid)
            try:
                attached = await attaching
            except asyncio.CancelledError:
                attached = None
            await pipeline.probe_jobs_done()
            return attached

        attached = asyncio.run(attach_and_exit())
        pipeline.close()
        assert attached in (False, None)
        assert pipeline.targets == {}
        assert probes.kernel_entries(target.pid) == NOTHING
        assert probes.attached_uprobes == 0
        target.run_calls()  # nothing is probed any more: no hit is counted
        assert entry_hits(probes, target.pid) is None
        wait_closed(probes)
        assert probe_fds() == fds_before
    finally:
        target.end()


@pytest.mark.bpf
@pytest.mark.parametrize("links", [True, False], ids=["uprobe_multi links", "perf events"])
def test_links_and_perf_events_count_every_call_and_detach_completely(
    gocalls: Path, probes: AgentProbes, links: bool
) -> None:
    """Both ways of attaching (links on Linux 6.6+, perf events before) see every entry and
    RET, and detaching closes every descriptor."""
    assert probes.uprobe_links, "this kernel (6.6+) should load the uprobe_multi programs"
    target = Waiting(gocalls)
    fds_before = probe_fds()
    probes.uprobe_links = links
    try:
        resolved = resolve_target(target.pid, ["main.work"], FunctionNames(), False)
        attach_target(probes, resolved)
        opened = probe_fds() - fds_before
        kinds = {kind for _fd, kind in opened}
        # main.work's entry and RET (one link each, or one perf event each), and what follows
        # goroutine creation (runtime.newproc1: its RETs, with its entry on some releases).
        expected = 0
        for function in resolved.functions:
            entries = 0 if function.http_finish or function.returns_only else 1
            returns = 0 if function.entry_only else len(function.plan.return_offsets)
            expected += entries + (min(returns, 1) if links else returns)
        assert len(opened) == expected
        assert kinds == {"anon_inode:bpf_link" if links else "anon_inode:[perf_event]"}, kinds
        target.run_calls()
        record = probes.process_hits(target.pid)
        assert record is not None
        assert (int(record["entry"]), int(record["ret"])) == (CALLS, CALLS)
        probes.detach_process(target.pid)
        wait_closed(probes)
        assert probe_fds() - fds_before == set()
        assert probes.kernel_entries(target.pid) == NOTHING
    finally:
        probes.uprobe_links = True
        probes.detach_process(target.pid)
        target.end()


def test_link_closer_waits_while_probes_are_attached_and_closes_everything() -> None:
    closer = LinkCloser(workers=2)
    pipes = [os.pipe() for _ in range(6)]
    readers = [r for r, _ in pipes]
    try:
        with closer.attaching():
            closer.close(readers[:3])
            time.sleep(0.2)
            assert closer.pending == 3  # held back while the attach runs
            assert all(_is_open(fd) for fd in readers[:3])
        deadline = time.monotonic() + 5
        while closer.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert closer.pending == 0 and not any(_is_open(fd) for fd in readers[:3])
        closer.close(readers[3:])
        closer.shutdown()  # returns once every descriptor handed over is closed
        assert not any(_is_open(fd) for fd in readers)
    finally:
        for reader, writer in pipes:
            os.close(writer)
            if _is_open(reader):
                os.close(reader)


def probe_fds() -> set[tuple[int, str]]:
    """This process's BPF link and perf event descriptors, with their kind."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            kind = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
        if kind in ("anon_inode:bpf_link", "anon_inode:[perf_event]"):
            found.add((int(name), kind))
    return found


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


DAEMONSET = Path(__file__).resolve().parent.parent / "deploy/base/agent-daemonset.yaml"
WITH_DAEMONSET_CAPS = """
import subprocess, sys
from ebpf_apm.producer.bpf_loader import PER_PROCESS_MAPS, AgentProbes, ProbeOptions
from ebpf_apm.producer.targets import FunctionNames, attach_target, resolve_target
target = subprocess.Popen([sys.argv[1], "-n", "7", "-wait"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
target.stdout.readline()
probes = AgentProbes(ProbeOptions(net_hooks="off"))
attach_target(probes, resolve_target(target.pid, ["main.work"], FunctionNames(), False))
target.communicate("\\n")
record = probes.process_hits(target.pid)
print("links", probes.uprobe_links, "entry", int(record["entry"]), "ret", int(record["ret"]))
probes.detach_process(target.pid)
probes.close()
"""


@pytest.mark.bpf
def test_the_daemonsets_capabilities_are_enough_for_the_helper_and_the_links(
    gocalls: Path,
) -> None:
    """Exactly the capabilities the DaemonSet adds (no CAP_SYS_ADMIN): the compile helper
    loads the programs, and uprobe_multi links attach and count."""
    docs = list(yaml.safe_load_all(DAEMONSET.read_text()))
    pod = next(d for d in docs if d and d.get("kind") == "DaemonSet")["spec"]["template"]["spec"]
    agent = next(c for c in pod["containers"] if "agent" in c["name"])
    caps = agent["securityContext"]["capabilities"]["add"]
    bounding = "-all," + ",".join(f"+{cap.lower()}" for cap in caps)
    result = subprocess.run(
        [
            "setpriv",
            f"--bounding-set={bounding}",
            "--inh-caps=-all",
            sys.executable,
            "-c",
            WITH_DAEMONSET_CAPS,
            str(gocalls),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "links True entry 7 ret 7" in result.stdout, result.stdout + result.stderr
