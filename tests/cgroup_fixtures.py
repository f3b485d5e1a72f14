"""cgroup v2 directories shaped like a container runtime's, for tests (root).

Tests create their own directories under the v2 hierarchy and remove them afterwards; they
never move or change cgroups they did not create.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CGROUP2 = Path("/sys/fs/cgroup/unified")


def _cgroup2_root() -> Path | None:
    for root in (CGROUP2, Path("/sys/fs/cgroup")):
        if (root / "cgroup.procs").exists() and (root / "cgroup.controllers").exists():
            return root
    return None


class Cgroups:
    """Directories this test makes, removed deepest first; nothing else is touched."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.created: list[Path] = []

    def make(self, relative: str) -> Path:
        path = self.root
        for part in relative.split("/"):
            path = path / part
            if not path.exists():
                path.mkdir()
                self.created.append(path)
        return path

    def remove(self) -> None:
        for path in reversed(self.created):
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # busy for a moment after its last process is reaped
                    time.sleep(0.02)
            else:
                # Another user's cgroup below a shared parent: leave it; ours are gone.
                pass


@pytest.fixture(name="cgroups")
def cgroups_fixture() -> Iterator[Cgroups]:
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root")
    root = _cgroup2_root()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    made = Cgroups(root)
    try:
        yield made
    finally:
        made.remove()


def child_of(pid: int, timeout_s: float = 5.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise AssertionError(f"unshare {pid} started no child")


def ns_pids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(x) for x in line.split()[1:]]
    return []
