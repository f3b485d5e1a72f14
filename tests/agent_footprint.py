"""What a running agent process holds, read from outside it: resident memory, mapped
libraries, probe descriptors (perf events, BPF links) and the entries of its BPF maps.

The maps are opened by their kernel ids, which /proc/PID/fdinfo names, so the figures are
the kernel's, not the agent's own account of them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ebpf_apm.producer.bpf_fds import BpfMap, open_map_by_id

# Libraries a BCC compile maps: none may stay in the agent.
COMPILER_LIBRARIES = ("libbcc", "libLLVM", "libclang", "/bcc/")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def compiler_mappings(pid: int) -> list[str]:
    """Mapped files of `pid` that belong to BCC or LLVM."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1] if len(line.split()) >= 6 else ""
        if any(name in path for name in COMPILER_LIBRARIES):
            found.add(path)
    return sorted(found)


def _fd_links(pid: int) -> dict[int, str]:
    links = {}
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            links[int(entry.name)] = os.readlink(entry)
        except OSError:  # closed meanwhile
            continue
    return links


PROBE_FD_KINDS = ("anon_inode:[perf_event]", "anon_inode:bpf_link")


def probe_fds(pid: int) -> int:
    """Descriptors that keep probes attached: perf events (tracepoints, and uprobes on
    kernels before 6.6) and BPF links (uprobe_multi: one per function and kind)."""
    return sum(link in PROBE_FD_KINDS for link in _fd_links(pid).values())


def wait_settled(
    pid: int, probes_at_rest: int, maps: tuple[str, ...], timeout: float = 60
) -> float:
    """Until the agent has dealt with every process it saw: no probe descriptor beyond
    `probes_at_rest` and no entry in the per-process `maps` (a process's entries go in before
    its probes are opened, so an attach still under way shows there). A leak stays, and the
    caller's checks then fail. Returns the seconds it took."""
    started = time.monotonic()
    empty = dict.fromkeys(maps, 0)
    while time.monotonic() - started < timeout:
        if probe_fds(pid) <= probes_at_rest and map_entries(pid, maps) == empty:
            break
        time.sleep(0.2)
    settled = time.monotonic() - started
    time.sleep(0.5)  # a drain turn or two for the last records
    return settled


def map_entries(pid: int, names: tuple[str, ...]) -> dict[str, int]:
    """Entries in each of `pid`'s BPF maps named in `names` (kernel names: 15 bytes)."""
    counts: dict[str, int] = {}
    for fd, link in _fd_links(pid).items():
        if link != "anon_inode:bpf-map":
            continue
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in info.splitlines() if ":\t" in line)
        map_id = int(fields.get("map_id", "0"))
        if not map_id:
            continue
        mine = open_map_by_id(map_id)
        try:
            table = BpfMap("", mine)
            if table.info.name in names:
                counts[table.info.name] = counts.get(table.info.name, 0) + len(table.all_keys())
        finally:
            os.close(mine)
    return counts
