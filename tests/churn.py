"""Many short-lived processes of one traced executable: the agent's churn load.

Shared by tests/test_agent_churn.py and benchmarks/agent_memory.py. Each process is
`gocalls -n CALLS -sleep SLEEP`: some exit at once, some sleep long enough for the agent
to attach and then call the probed function a few times. Started in parallel waves; this
module ends only the processes it started.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

PROBED = "main.work"
RULES = """\
targets:
  - name: churn
    select:
      exeNames: [{name}]
    functions: ["{func}"]
    http: false
"""
# (calls, sleep) by process index modulo 4: none, a few at once, a few after attaching.
MIX = ((0, "0s"), (3, "0s"), (3, "300ms"), (5, "600ms"))


def rules_text(binary: Path) -> str:
    return RULES.format(name=binary.name, func=PROBED)


def run_churn(binary: Path, count: int, parallel: int = 24) -> float:
    """Start `count` processes, at most `parallel` at a time; return the seconds it took."""
    started = time.monotonic()
    running: list[subprocess.Popen[bytes]] = []
    for index in range(count):
        calls, sleep = MIX[index % len(MIX)]
        while len(running) >= parallel:
            running = [p for p in running if p.poll() is None]
            if len(running) >= parallel:
                time.sleep(0.001)
        running.append(
            subprocess.Popen(
                [str(binary), "-n", str(calls), "-sleep", sleep],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    for process in running:
        if process.wait(30) != 0:
            raise AssertionError(f"gocalls (pid {process.pid}) exited {process.returncode}")
    return time.monotonic() - started
