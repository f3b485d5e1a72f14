"""Load generator of benchmarks/agent_throughput.py: calls getppid() at a steady rate.

Each getppid() of this process makes the benchmark's BPF program (built with
SYNTHETIC_SOURCE) write SYNTHETIC_BURST span records, so the syscall rate sets the offered
event rate. Protocol on stdio: prints `READY <pid>`, waits for a line on stdin (the agent
registers the pid in between), runs for the given seconds, prints `DONE <calls> <seconds>`.

    python getppid_load.py CPU CALLS_PER_SECOND SECONDS     (0 calls/s: as fast as it can)
"""

from __future__ import annotations

import os
import sys
import time

# Pacing granularity: the loop tops up to the due count, then sleeps this long. Short
# enough that the ring buffer sees a steady stream rather than bursts.
TICK_S = 0.0005
MAX_CATCH_UP_S = 0.01
# Calls between clock reads in the unpaced loop: a clock read costs about as much as a call.
UNPACED_CHUNK = 256


def run_unpaced(seconds: float) -> int:
    getppid, clock = os.getppid, time.perf_counter
    end = clock() + seconds
    calls = 0
    while clock() < end:
        for _ in range(UNPACED_CHUNK):
            getppid()
        calls += UNPACED_CHUNK
    return calls


def run_paced(rate: float, seconds: float) -> int:
    getppid, clock = os.getppid, time.perf_counter
    # A generator that falls behind catches up at most this many calls between clock
    # reads, so it still stops on time (it then runs flat out, and reports what it made).
    most = max(1, int(rate * MAX_CATCH_UP_S))
    start = clock()
    calls = 0
    while True:
        elapsed = clock() - start
        if elapsed >= seconds:
            return calls
        batch = min(int(elapsed * rate) - calls, most)
        for _ in range(batch):
            getppid()
        calls += max(batch, 0)
        if batch < most:
            time.sleep(TICK_S)


def main(argv: list[str]) -> int:
    cpu, rate, seconds = int(argv[0]), float(argv[1]), float(argv[2])
    os.sched_setaffinity(0, {cpu})  # its own core: the agent's core stays the agent's
    print(f"READY {os.getpid()}", flush=True)
    if not sys.stdin.readline():
        return 1  # the benchmark went away before starting us
    start = time.perf_counter()
    calls = run_paced(rate, seconds) if rate > 0 else run_unpaced(seconds)
    print(f"DONE {calls} {time.perf_counter() - start:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
