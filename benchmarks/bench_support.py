"""What the agent benchmarks share: the Go service they load, and reading a process's CPU.

Imported by the scripts beside it (`python benchmarks/NAME.py` puts this folder on the path).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

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
