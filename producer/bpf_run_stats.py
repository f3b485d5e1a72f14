"""The kernel's BPF run-time statistics: how long each loaded program ran, and how often.

The kernel counts `run_time_ns` and `run_cnt` per program only while statistics are on:
either the sysctl `kernel.bpf_stats_enabled` is 1, or some process holds the file
descriptor that `bpf(BPF_ENABLE_STATS)` returned. The agent takes the descriptor (the
statistics stop when it exits, whatever happens to it) rather than writing the sysctl,
which it would have to restore. Counting costs every BPF program on the node two clock
reads per run (tens of nanoseconds).

Figures are read from /proc/self/fdinfo of the program's descriptor.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_ENABLE_STATS = 32
_BPF_STATS_RUN_TIME = 0
SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


@dataclass(frozen=True)
class RunStats:
    run_time_ns: int
    run_cnt: int


class RunTimeStats:
    """Keeps the kernel's run-time statistics on while open."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self.enabled = False
        self.how = "off"

    def open(self) -> RunTimeStats:
        number = _SYS_BPF.get(os.uname().machine)
        if number is not None:
            libc = ctypes.CDLL(None, use_errno=True)
            attr = ctypes.create_string_buffer(16)  # union bpf_attr: enable_stats.type = 0
            ctypes.c_uint32.from_buffer(attr).value = _BPF_STATS_RUN_TIME
            fd = libc.syscall(number, _BPF_ENABLE_STATS, attr, len(attr))
            if fd >= 0:
                self._fd, self.enabled, self.how = fd, True, "BPF_ENABLE_STATS"
                return self
            error = os.strerror(ctypes.get_errno())
        else:
            error = f"unknown bpf syscall number on {os.uname().machine}"
        if _sysctl_on():
            self.enabled, self.how = True, f"{SYSCTL} = 1"
            return self
        log.warning(
            "BPF run-time statistics are off (BPF_ENABLE_STATS: %s; needs Linux 5.8 and "
            "CAP_SYS_ADMIN): the probe CPU estimate counts trap cost only. Set "
            "`sysctl kernel.bpf_stats_enabled=1` to include the programs' own run time",
            error,
        )
        return self

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.enabled = False


def _sysctl_on() -> bool:
    try:
        return SYSCTL.read_text().strip() == "1"
    except OSError:
        return False


def program_run_stats(prog_fd: int) -> RunStats:
    """Run time and run count of the program behind `prog_fd` (0, 0 while stats are off)."""
    fields: dict[str, int] = {}
    with open(f"/proc/self/fdinfo/{prog_fd}") as info:
        for line in info:
            name, _, value = line.partition(":")
            if name in ("run_time_ns", "run_cnt"):
                fields[name] = int(value)
    return RunStats(fields.get("run_time_ns", 0), fields.get("run_cnt", 0))
