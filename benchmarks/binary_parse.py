"""How long the agent takes to plan probes in a target binary, cold and cached.

For each test target (goserver by Go 1.27 and 1.19, unstripped and stripped) it prints the
cold plan time (symbols, Go layout, probe sites; median of --rounds) beside a baseline: the
time to read the file's bytes once. Then it runs a real process of the intact binary and one
of a damaged copy (its .gopclntab section header points past the end of the file) through
the agent's per-binary cache (RulePlanner) --lookups times each, as 1000 execs of one
binary would, and prints how many parses that took and the cost of a cached lookup.

    .venv/bin/python benchmarks/binary_parse.py [--rounds 3] [--lookups 1000]
"""

from __future__ import annotations

import argparse
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from go_builds import TARGETS_DIR, build_go  # noqa: E402

from ebpf_apm.producer import go_binary  # noqa: E402
from ebpf_apm.producer.elf_symbols import ElfImage  # noqa: E402
from ebpf_apm.producer.rule_targets import RulePlanner  # noqa: E402
from ebpf_apm.producer.targets import FunctionNames, plan_binary  # noqa: E402


def timed(fn: object, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        go_binary.clear_layout_cache()
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def damaged_copy(binary: Path, out: Path) -> Path:
    data = bytearray(binary.read_bytes())
    image = ElfImage.open(binary)
    index = next(i for i, s in enumerate(image.sections_by_index) if s.name == ".gopclntab")
    shoff, shentsize = struct.unpack_from("<Q", data, 40)[0], struct.unpack_from("<H", data, 58)[0]
    struct.pack_into("<Q", data, shoff + index * shentsize + 24, len(data) + 0x1000)
    out.write_bytes(bytes(data))
    out.chmod(0o755)
    return out


def lookups(binary: Path, count: int) -> tuple[int, float, str]:
    """(parses, seconds per cached lookup, outcome) for `count` lookups of one process."""
    planner = RulePlanner(FunctionNames(), http_allowed=True)
    process = subprocess.Popen([str(binary), "-addr", "127.0.0.1:0"], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        process.stdout.readline()
        first = planner.plan(process.pid, (), True)
        started = time.perf_counter()
        for _ in range(count - 1):
            planner.plan(process.pid, (), True)
        per_hit = (time.perf_counter() - started) / max(count - 1, 1)
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    parses = planner.parses
    outcome = "planned" if first.error is None else str(first.error)[:90]
    return parses, per_hit, outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lookups", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        print(f"{'binary':<26}{'MB':>6}{'cold plan':>12}{'baseline: read bytes':>24}")
        builds = {}
        for toolchain in ("1.27", "1.19"):
            for stripped in (False, True):
                name = f"goserver-go{toolchain}{'-stripped' if stripped else ''}"
                binary = build_go(TARGETS_DIR / "goserver", work / name, toolchain, stripped)
                builds[name] = binary
                plan = timed(lambda b=binary: plan_binary(str(b), [], FunctionNames()), args.rounds)
                read = timed(lambda b=binary: b.read_bytes(), args.rounds)
                size = binary.stat().st_size / 1e6
                print(f"{name:<26}{size:>6.1f}{plan * 1e3:>10.0f} ms{read * 1e3:>21.1f} ms")
        intact = builds["goserver-go1.27-stripped"]
        damaged = damaged_copy(intact, work / "goserver-damaged")
        print(f"\n{args.lookups} lookups of one running process through the per-binary cache:")
        for label, binary in (("intact", intact), ("damaged", damaged)):
            parses, per_hit, outcome = lookups(binary, args.lookups)
            print(f"  {label:<8} parses {parses}, cached lookup {per_hit * 1e6:.0f} us: {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
