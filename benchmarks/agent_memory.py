"""Agent memory and start-up: the helper-process loader beside the old in-process one.

For each design (`--bpf-loader helper`, then `--bpf-loader in-process`, same run, same
broker, same Go server build):

    start the Go server (tests/targets/goserver, Go 1.27) -> start `ebpf-apm agent --pid`
    -> start-up: seconds from the agent's exec to its "tracing 1 process(es)" line
       (probes compiled, loaded and attached to the first process)
    -> 2,000 HTTP requests (16 clients) -> wait for their spans in Kafka
    -> the agent's VmRSS, and whether BCC/LLVM are mapped in it

Then the churn figure (helper design only): N short-lived processes of a traced Go
executable selected by a rules file (default 10,000): the agent's RSS before and after, the
probes left open and the entries left in the per-process maps.

Targets (issue 11): RSS after 2,000 requests <= 100 MB (the in-process design is the
baseline, ~300 MB when the issue was filed), start-up no worse than the in-process design,
churn within 10 MB.

    sudo .venv/bin/python benchmarks/agent_memory.py [--requests 2000] [--churn 10000]
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from ebpf_apm.kafka.embedded_broker import EmbeddedBroker  # noqa: E402
from ebpf_apm.producer import bpf_loader  # noqa: E402

HANDLE_SLEEP = "main.(*server).handleSleep"
# The kernel keeps the first 15 bytes of a map's name.
PER_PROCESS_MAPS = tuple(name[:15] for name in bpf_loader.PER_PROCESS_MAPS)


def tests_module(name: str) -> Any:
    """tests/ is not a package: its harness is imported from there rather than copied."""
    return importlib.import_module(name)


def measure_design(loader: str, server_binary: Path, bootstrap: str, requests: int) -> dict:
    harness = tests_module("agent_harness")
    footprint = tests_module("agent_footprint")
    with harness.go_server(server_binary) as server:
        args = ["--pid", str(server.pid), "--func", HANDLE_SLEEP, "--bootstrap-servers",
                bootstrap, "--node-name", f"bench-{loader}", "--bpf-loader", loader]  # fmt: skip
        started = time.monotonic()
        with harness.Agent(args) as agent:
            agent.wait_ready(120)
            startup_s = time.monotonic() - started
            plan = harness.plan_requests(requests, deep_every=10**9)
            harness.send_concurrently(server, plan, clients=16)
            # Every request's HTTP span, and the handler's of each /sleep request (request 0
            # is a /deep one: plan_requests makes every deep_every-th from 0), reached Kafka:
            # the agent did the work.
            expected = requests + sum(r.path.startswith("/sleep/") for r in plan)
            spans = harness.read_spans(bootstrap, server.pid, expected, timeout=60)
            if len(spans) < expected:
                agent.stop()
                totals = [line for line in agent.log.splitlines() if "totals:" in line]
                raise RuntimeError(f"agent ({loader}): {len(spans)} spans of {expected}; {totals}")
            rss = footprint.rss_kib(agent.process.pid)
            compiler = footprint.compiler_mappings(agent.process.pid)
            if agent.stop() != 0:
                raise RuntimeError(f"agent ({loader}) failed:\n{agent.log}")
    return {"startup_s": startup_s, "rss_mib": rss / 1024, "compiler": compiler}


def measure_churn(count: int, bootstrap: str, work: Path) -> dict:
    harness = tests_module("agent_harness")
    footprint = tests_module("agent_footprint")
    churn = tests_module("churn")
    go_builds = tests_module("go_builds")
    built = go_builds.build_go(go_builds.TARGETS_DIR / "gocalls", work / "gocalls", "1.27", False)
    binary = work / "churnjob"
    shutil.copy2(built, binary)
    rules = work / "targets.yaml"
    rules.write_text(churn.rules_text(binary))
    args = ["--config", str(rules), "--no-kubernetes", "--node-name", "bench-churn",
            "--bootstrap-servers", bootstrap]  # fmt: skip
    with harness.Agent(args) as agent:
        agent.wait_ready(120)
        pid = agent.process.pid
        at_rest = footprint.probe_fds(pid)
        start_rss = footprint.rss_kib(pid)
        churn.run_churn(binary, 200)  # warm-up, as the test does
        footprint.wait_settled(pid, at_rest, PER_PROCESS_MAPS)
        before = footprint.rss_kib(pid)
        seconds = churn.run_churn(binary, count)
        settled = footprint.wait_settled(pid, at_rest, PER_PROCESS_MAPS)
        after = footprint.rss_kib(pid)
        result = {
            "seconds": seconds,
            "settled_s": settled,
            "attached": agent.log.count("selected by churn"),
            "start_mib": start_rss / 1024,
            "before_mib": before / 1024,
            "after_mib": after / 1024,
            "probes_left": footprint.probe_fds(pid) - at_rest,
            "entries_left": footprint.map_entries(pid, PER_PROCESS_MAPS),
        }
        agent.stop()
    return result


def _median(runs: list[dict]) -> dict:
    return {
        "startup_s": statistics.median(r["startup_s"] for r in runs),
        "rss_mib": statistics.median(r["rss_mib"] for r in runs),
        "compiler": runs[-1]["compiler"],
        "all": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--churn", type=int, default=10_000, help="0 skips the churn run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each design")
    args = parser.parse_args(argv)
    go_builds = tests_module("go_builds")
    with tempfile.TemporaryDirectory(prefix="agent-memory-") as tmp, EmbeddedBroker() as broker:
        work = Path(tmp)
        server = go_builds.build_go(
            go_builds.TARGETS_DIR / "goserver", work / "goserver", "1.27", False
        )
        # Alternating rounds, so neither design always runs on a colder machine; the
        # figures are each design's median.
        runs: dict[str, list[dict]] = {"helper": [], "in-process": []}
        for round_ in range(args.rounds):
            order = ("in-process", "helper") if round_ % 2 == 0 else ("helper", "in-process")
            for loader in order:
                runs[loader].append(
                    measure_design(loader, server, broker.bootstrap_servers, args.requests)
                )
        results = {loader: _median(found) for loader, found in runs.items()}
        print(f"agent after attaching to one Go service and serving {args.requests} requests")
        print(f"  {'design (median)':<28} {'RSS MiB':>8} {'start-up s':>11}  BCC/LLVM mapped")
        for loader, label in (("helper", "compile helper (new)"),
                              ("in-process", "in-process BCC (old)")):  # fmt: skip
            r = results[loader]
            mapped = ", ".join(Path(p).name for p in r["compiler"]) or "none"
            print(f"  {label:<28} {r['rss_mib']:>8.1f} {r['startup_s']:>11.2f}  {mapped}")
            each = ", ".join(f"{x['rss_mib']:.1f} MiB/{x['startup_s']:.2f} s" for x in r["all"])
            print(f"  {'':<28} runs: {each}")
        print("  targets: RSS <= 100 MB; start-up no worse than the in-process design")
        if args.churn:
            c = measure_churn(args.churn, broker.bootstrap_servers, work)
            print(f"churn: {args.churn} short-lived processes in {c['seconds']:.1f} s "
                  f"({args.churn / c['seconds']:.0f}/s), {c['attached']} attached (with "
                  f"warm-up); every probe and map entry gone {c['settled_s']:.1f} s after "
                  f"the last exit")  # fmt: skip
            print(f"  agent RSS: {c['start_mib']:.1f} MiB at start, {c['before_mib']:.1f} after "
                  f"200 warm-up processes, {c['after_mib']:.1f} after the churn "
                  f"({c['after_mib'] - c['before_mib']:+.1f} MiB; target within 10)")  # fmt: skip
            print(f"  left behind: {c['probes_left']} probes, map entries {c['entries_left']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
