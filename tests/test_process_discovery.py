"""Process discovery: the exec/exit tracepoints in this kernel (BPF, root), the layout of
their records, and resolving each binary once across mount namespaces."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebpf_apm.producer.errors import TargetError
from ebpf_apm.producer.process_discovery import (
    ProcessDiscovery,
    ProcessEvent,
    ProcessEventSource,
    ResolveOnceCache,
    exe_path,
    path_in_process,
    read_build_id,
    scan_processes,
)

ROOT = Path(__file__).resolve().parent.parent
STORM = 2000  # short-lived processes in the leak test

needs_bpf = pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF needs root")


# --- resolve once ----------------------------------------------------------------------------


def _sleeper(binary: str | Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([str(binary), "30"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if os.readlink(f"/proc/{proc.pid}/exe") == str(binary):
                break
        except OSError:
            pass  # mid-exec, the old program is gone before the new one is in place
        time.sleep(0.005)  # between fork and exec the child is still python
    return proc


@contextlib.contextmanager
def sleepers(*binaries: str | Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for binary in binaries:
            procs.append(_sleeper(binary))
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_each_binary_is_resolved_once(tmp_path: Path) -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    sleep = os.path.realpath(sleep)
    copy = tmp_path / "sleep-copy"  # another inode, the same build id
    shutil.copy2(sleep, copy)
    true_copy = tmp_path / "true"
    shutil.copy2(os.path.realpath(shutil.which("true") or "/bin/true"), true_copy)
    calls: list[str] = []

    def resolver(path: str) -> str:
        calls.append(path)
        return os.path.basename(os.readlink(path))

    cache: ResolveOnceCache[str] = ResolveOnceCache(resolver)
    with sleepers(sleep, sleep, copy, true_copy) as procs:
        results = [cache.get(p.pid) for p in procs[:3]]
        assert results == ["sleep", "sleep", "sleep"]  # the copy resolved by its build id
        assert calls == [f"/proc/{procs[0].pid}/exe"]
        assert (cache.hits, cache.misses, len(cache)) == (2, 1, 2)
    assert read_build_id(sleep) is not None and read_build_id(sleep) == read_build_id(str(copy))
    assert read_build_id(str(tmp_path)) is None  # not a file: no id, no error


def test_resolver_errors_are_remembered_but_vanished_processes_are_not(tmp_path: Path) -> None:
    calls = 0

    def resolver(path: str) -> str:
        nonlocal calls
        calls += 1
        raise TargetError("not a Go program")

    cache: ResolveOnceCache[str] = ResolveOnceCache(resolver, use_build_id=False)
    sleep = os.path.realpath(shutil.which("sleep") or "/bin/sleep")
    with sleepers(sleep, sleep) as procs:
        for p in procs:
            with pytest.raises(TargetError, match="not a Go program"):
                cache.get(p.pid)
        assert calls == 1
    with pytest.raises(ProcessLookupError):
        cache.get(procs[0].pid)


def test_the_cache_is_bounded(tmp_path: Path) -> None:
    sleep = os.path.realpath(shutil.which("sleep") or "/bin/sleep")
    binaries = []
    for i in range(4):
        binary = tmp_path / f"sleep{i}"
        shutil.copy2(sleep, binary)
        binaries.append(binary)
    cache: ResolveOnceCache[int] = ResolveOnceCache(lambda p: 1, max_entries=2, use_build_id=False)
    with sleepers(*binaries) as procs:
        for p in procs:
            cache.get(p.pid)
        assert len(cache) == 2 and cache.misses == 4


def test_scan_finds_this_process_and_no_kernel_threads() -> None:
    pids = scan_processes()
    assert os.getpid() in pids
    assert 2 not in pids  # kthreadd


def test_a_binary_only_visible_in_another_mount_namespace(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mount namespaces need root")
    hidden = tmp_path / "mnt"
    hidden.mkdir()
    sleep = os.path.realpath(shutil.which("sleep") or "/bin/sleep")
    proc = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"mount -t tmpfs tmpfs {hidden} && cp {sleep} {hidden}/app && exec {hidden}/app 30",
        ]
    )
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if exe_path(proc.pid) == f"{hidden}/app":
                    break
            except OSError:
                pass
            time.sleep(0.01)
        assert exe_path(proc.pid) == f"{hidden}/app"
        assert not (hidden / "app").exists()  # not in the agent's mount namespace
        assert os.path.isfile(path_in_process(proc.pid, f"{hidden}/app"))
        cache: ResolveOnceCache[str | None] = ResolveOnceCache(read_build_id)
        assert cache.get(proc.pid) == read_build_id(sleep)
    finally:
        proc.kill()
        proc.wait()


# --- the tracepoints (BPF) --------------------------------------------------------------


@pytest.mark.bpf
@needs_bpf
def test_exec_is_seen_within_a_second_and_exit_after_it() -> None:
    async def scenario() -> None:
        seen: dict[tuple[str, int], float] = {}
        running: list[int] = []

        def on_event(event: ProcessEvent) -> None:
            if event.kind == "running":
                running.append(event.pid)
            seen.setdefault((event.kind, event.pid), time.monotonic())

        discovery = ProcessDiscovery(on_event, poll_interval_s=0.1)
        await discovery.start()
        try:
            assert os.getpid() in running
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec("sleep", "0.5")
            while ("exec", proc.pid) not in seen and time.monotonic() - started < 2:
                await asyncio.sleep(0.01)
            assert seen[("exec", proc.pid)] - started < 1.0
            assert ("exit", proc.pid) not in seen
            await proc.wait()
            ended = time.monotonic()
            while ("exit", proc.pid) not in seen and time.monotonic() - ended < 2:
                await asyncio.sleep(0.01)
            assert seen[("exit", proc.pid)] - ended < 1.0
        finally:
            await discovery.stop()

    asyncio.run(scenario())


@pytest.mark.bpf
@needs_bpf
def test_a_multithreaded_process_exits_once() -> None:
    script = (
        "import threading, time\n"
        "for _ in range(7): threading.Thread(target=time.sleep, args=(0.2,)).start()\n"
    )
    with ProcessEventSource() as source:
        proc = subprocess.Popen([sys.executable, "-c", script])
        proc.wait()
        time.sleep(0.05)
        events = [e for e in source.poll() if e.pid == proc.pid]
    kinds = [e.kind for e in events]  # an interpreter may exec itself once more at start
    assert kinds.count("exit") == 1 and kinds[-1] == "exit" and "exec" in kinds


@pytest.mark.bpf
@needs_bpf
def test_thousands_of_short_lived_processes_leave_nothing_behind() -> None:
    true = os.path.realpath(shutil.which("true") or "/bin/true")
    spawned: set[int] = set()
    execs: set[int] = set()
    exits: set[int] = set()
    live: set[int] = set()  # what an agent keeps per process: must drain back to empty
    cache: ResolveOnceCache[str] = ResolveOnceCache(lambda path: os.readlink(path))
    vanished = 0

    def on_event(event: ProcessEvent) -> None:
        nonlocal vanished
        if event.pid not in spawned:
            return  # the rest of the machine
        if event.kind == "exec":
            execs.add(event.pid)
            live.add(event.pid)
            try:
                cache.get(event.pid)
            except ProcessLookupError:
                vanished += 1  # /bin/true is usually gone before we look
        elif event.kind == "exit":
            exits.add(event.pid)
            live.discard(event.pid)

    async def scenario() -> None:
        discovery = ProcessDiscovery(on_event, poll_interval_s=0.05, scan=False)
        await discovery.start()
        before = discovery.source.counters()
        try:
            for _ in range(STORM // 100):
                for _ in range(100):
                    pid = os.posix_spawn(true, [true], os.environ)
                    spawned.add(pid)
                    os.waitpid(pid, 0)
                await asyncio.sleep(0)  # let the loop poll between bursts
            deadline = time.monotonic() + 3
            while not spawned <= exits and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            after = discovery.source.counters()
        finally:
            await discovery.stop()
        assert after["ring_full"] == before["ring_full"], "ring buffer overflowed"

    asyncio.run(scenario())
    assert len(spawned) == STORM
    assert spawned <= execs, f"{len(spawned - execs)} execs missed"
    assert spawned <= exits, f"{len(spawned - exits)} exits missed"
    assert not (live & spawned)
    assert len(cache) <= 1  # one binary, however many processes ran it
    assert cache.misses <= 1 and cache.hits + vanished + cache.misses >= STORM
