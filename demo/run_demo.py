"""`make demo`: the whole path on one machine, on embedded defaults.

    demo/userservice (Go, HTTP) --gRPC--> demo/profileservice (Go)
                                --database/sql--> PostgreSQL (a throwaway cluster)
    both services --uprobes--> ebpf-apm agent --> apm.uprobe.events, apm.kprobe.events
      --> ebpf-apm join --> apm.spans --> ebpf-apm aggregate --> build/demo.sqlite, apm.latency
      build/demo.sqlite --> ebpf-apm dashboard --> http://127.0.0.1:8080/
    on screen: apm.latency (each closed window's percentiles, as the aggregator published
    them) and apm.spans (the last calls), both read with `ebpf-apm tail --json`

Builds the services with Go, starts the embedded broker, PostgreSQL, the services, the agent
(with a targets file selecting both executables), the join and the aggregator (5 s windows,
short lateness so that windows close promptly) and the dashboard on its storage
(http://127.0.0.1:8080/, else a free port: the address is printed and stays in the status
line), sends traffic and shows p50/p90/p99 per series of the newest closed window: the
HTTP route and the handler's slow step (server and internal), its gRPC and SQL calls
(client), and the profile service's gRPC method (server); redrawn in place on a terminal
(printed once per window otherwise). Ctrl-C (or --duration) stops the traffic, waits for the
last calls to reach storage, stops every process by pid in the reverse order of its start,
and shows the slowest request's trace as a tree (`ebpf-apm query --trace`), the dashboard
and the query for a later look. Logs of every process: build/demo/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from demo_database import DemoDatabase
from demo_service import CLIENTS, HANDLER, SLOW_STEP, build_services, send_traffic
from latency_board import LatencyBoard
from pipeline_processes import Child, Children, describe_exit, short
from terminal_screen import Screen

from ebpf_apm.kafka.admin import ensure_topics
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.embedded_broker import EmbeddedBroker

ROOT = Path(__file__).resolve().parent.parent

EBPF_APM = [sys.executable, "-m", "ebpf_apm.cli"]
LOG_DIR = ROOT / "build" / "demo"
DATABASE = ROOT / "build" / "demo.sqlite"
STORAGE = f"sqlite:///{DATABASE}"
WINDOW_S = 5
JOIN_FLAGS = ["--allowed-lateness-ms", "1000", "--idle-advance-ms", "500"]
AGGREGATE_FLAGS = ["--window", f"{WINDOW_S}s", "--lateness", "1s", "--idle-timeout", "1s"]
AGENT_START_TIMEOUT_S = 120.0  # it compiles its BPF programs first
REDRAW_S = 0.25
FLUSH_TIMEOUT_S = 25.0  # a window, its lateness and idle timeout, the join's, and room
STORAGE_WAIT_S = 30.0  # the aggregator creates the database when it starts
DASHBOARD_PORT = 8080
STOP_TIMEOUT_S = 60.0  # the agent detaches every probe before it exits


def feed(
    stream: TextIO, add: Callable[[dict[str, Any], float], None], lock: threading.Lock
) -> None:
    """One `ebpf-apm tail --json` output into the board."""
    for line in stream:
        event = json.loads(line)
        with lock:
            add(event, time.monotonic())


class Demo:
    def __init__(self, duration_s: float) -> None:
        self.duration_s = duration_s
        self.screen = Screen(sys.stdout)
        self.notes: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.children = Children(LOG_DIR, self.notes.put)
        self.board = LatencyBoard(WINDOW_S * 1_000_000_000)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.traffic_stop = threading.Event()
        self.status = ""
        self.printed_window: int | None = None
        self.dashboard_url = ""

    # -- start ----------------------------------------------------------------------------

    def start_service(self, name: str, argv: list[str]) -> tuple[Child, str]:
        """A Go service that prints `LISTEN host:port` once it listens; it and the address."""
        service = self.children.start(name, argv, cwd=ROOT, stdout=subprocess.PIPE)
        assert service.process.stdout is not None
        listen = service.process.stdout.readline().split()
        if len(listen) != 2 or listen[0] != "LISTEN":
            raise ChildFailed(service)
        return service, listen[1]

    def start(
        self, binaries: dict[str, Path], database: DemoDatabase, bootstrap: str
    ) -> tuple[str, int]:
        """Everything in the order data flows; the user service's address."""
        topics = {t: 6 for t in ("apm.uprobe.events", "apm.kprobe.events", "apm.spans")}
        asyncio.run(
            ensure_topics(KafkaConnection(bootstrap), {**topics, "apm.latency": 6})
        )  # tails need them
        kafka = ["--bootstrap-servers", bootstrap]
        database.initdb()
        postgres = self.children.start(
            "postgres", database.server_argv(), cwd=database.dir, user=database.user,
            stop_signal=signal.SIGINT,  # fast shutdown
        )  # fmt: skip
        database.seed()
        self.screen.note(f"postgres: pid {postgres.pid} on 127.0.0.1:{database.port}")
        profiles, profiles_at = self.start_service(
            "profileservice", [str(binaries["profileservice"])]
        )
        users, users_at = self.start_service(
            "userservice",
            [str(binaries["userservice"]), "-profiles", profiles_at, "-db", database.url],
        )
        host, port = users_at.rsplit(":", 1)
        self.screen.note(
            f"userservice: pid {users.pid} on http://{host}:{port}; profileservice: pid "
            f"{profiles.pid} on {profiles_at} (gRPC)"
        )
        agent = self.children.start(
            "agent", [*EBPF_APM, "agent", "--config", str(write_targets()), *kafka,
                      "--node-name", "demo-node"],
            cwd=ROOT, ready_when="tracing ", echo_until_ready=True,
        )  # fmt: skip
        started = time.monotonic()
        while not agent.ready.wait(0.2):
            self.print_notes()
            if time.monotonic() - started > AGENT_START_TIMEOUT_S:
                raise ChildFailed(agent, f"not tracing after {AGENT_START_TIMEOUT_S:.0f} s")
        # The rules select the running services just after the agent says it is tracing.
        while not all(agent.last_line_with(f"selected by {name}") for name in binaries):
            self.print_notes()
            self.check_children()
            if time.monotonic() - started > AGENT_START_TIMEOUT_S:
                raise ChildFailed(agent, "the targets file did not select both services")
            time.sleep(0.2)
        self.print_notes()
        self.check_children()
        join = self.children.start("join", [*EBPF_APM, "join", *kafka, *JOIN_FLAGS], cwd=ROOT)
        aggregate = self.children.start(
            "aggregate", [*EBPF_APM, "aggregate", "--storage", STORAGE, *kafka, *AGGREGATE_FLAGS],
            cwd=ROOT,
        )  # fmt: skip
        self.screen.note(
            f"join: pid {join.pid} -> apm.spans; aggregate: pid {aggregate.pid} -> "
            f"{WINDOW_S} s windows in {DATABASE.relative_to(ROOT)} and apm.latency"
        )
        self.start_dashboard(kafka)
        for topic, add in (("apm.spans", self.board.add_span),
                           ("apm.latency", self.board.add_latency)):  # fmt: skip
            tail = self.children.start(
                f"tail {topic}", [*EBPF_APM, "tail", topic, "--json", "--from-beginning", *kafka],
                cwd=ROOT, stdout=subprocess.PIPE, stop_signal=signal.SIGINT,
            )  # fmt: skip
            threading.Thread(
                target=feed, args=(tail.process.stdout, add, self.lock), daemon=True
            ).start()
        self.screen.note(f"logs: {LOG_DIR.relative_to(ROOT)}/")
        return host, int(port)

    def start_dashboard(self, kafka: list[str]) -> None:
        """`ebpf-apm dashboard` on the demo's storage, once the aggregator has created it."""
        deadline = time.monotonic() + STORAGE_WAIT_S
        while not DATABASE.exists():
            self.check_children()
            if time.monotonic() > deadline:
                raise ChildFailed(self.children.started[-1], f"no {DATABASE} after "
                                  f"{STORAGE_WAIT_S:.0f} s")  # fmt: skip
            time.sleep(0.1)
        argv = [*EBPF_APM, "dashboard", "--storage", STORAGE, "--listen", listen(), *kafka]
        dashboard = self.children.start("dashboard", argv, cwd=ROOT, stdout=subprocess.PIPE)
        assert dashboard.process.stdout is not None
        line = dashboard.process.stdout.readline().split()
        if len(line) < 2 or line[0] != "dashboard:":
            raise ChildFailed(dashboard)
        self.dashboard_url = line[1]
        self.screen.note(
            f"dashboard: {self.dashboard_url} (pid {dashboard.pid}; the same figures as "
            "`ebpf-apm query`, with charts)"
        )

    # -- while it runs --------------------------------------------------------------------

    def print_notes(self) -> None:
        while True:
            try:
                self.screen.note(self.notes.get_nowait())
            except queue.Empty:
                return

    def check_children(self) -> None:
        for child in self.children.failed():
            raise ChildFailed(child)

    def frame(self) -> list[str]:
        with self.lock:
            board = self.board
            lines = ["", board.title(), *board.table()]
            if self.screen.live:
                lines += ["", "last calls, from apm.spans:", *board.ticker(), "", self.status]
        return lines

    def refresh(self) -> None:
        """Redraw (terminal), or print a window once its rows have stopped coming (else)."""
        self.print_notes()
        if self.screen.live:
            self.screen.show(self.frame())
            return
        with self.lock:
            newest, quiet = self.board.newest_window, time.monotonic() - self.board.last_row_seen
        if newest is not None and newest != self.printed_window and quiet > 0.5:
            self.printed_window = newest
            self.screen.show(self.frame())

    def run(self) -> None:
        """Until Ctrl-C, SIGTERM or --duration."""
        deadline = time.monotonic() + self.duration_s if self.duration_s else None
        ends = f"after {self.duration_s:g} s" if deadline else "on Ctrl-C"
        while not self.stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            with self.lock:
                calls = self.board.spans
            self.status = (
                f"{CLIENTS} clients sending; {calls} spans joined; dashboard "
                f"{self.dashboard_url}; stops {ends}"
            )
            self.refresh()
            self.check_children()
            self.stop.wait(REDRAW_S)

    def flush(self, threads: list[threading.Thread]) -> None:
        """Stop the traffic, then wait until the aggregator has closed the window of the last
        call (a second Ctrl-C skips the wait)."""
        self.traffic_stop.set()
        for t in threads:
            t.join(11)
        start = time.monotonic()
        self.status = "traffic stopped; waiting for the last calls to reach storage ..."
        target = None
        while time.monotonic() - start < FLUSH_TIMEOUT_S:
            self.refresh()
            self.check_children()
            with self.lock:
                board, now = self.board, time.monotonic()
                if target is None and now - board.last_span_seen > 1.5:
                    target = board.last_span_end_ns // board.window_ns * board.window_ns
                newest, rows_quiet = board.newest_window, now - board.last_row_seen > 0.5
            if target is not None and newest is not None and newest >= target and rows_quiet:
                self.status = "every call is in storage"
                self.refresh()
                return
            time.sleep(REDRAW_S)
        self.notes.put(f"the last window was not closed after {FLUSH_TIMEOUT_S:.0f} s; stopping")


class ChildFailed(Exception):
    def __init__(self, child: Child, what: str | None = None) -> None:
        self.child = child
        what = what or describe_exit(child.process.poll())
        super().__init__(f"{child.name} (pid {child.pid}): {what}")


def slowest_trace(demo: Demo, bootstrap: str) -> str:
    """The slowest request's trace as `ebpf-apm query --trace` shows it (the broker is in
    memory: this is the last moment it can be read)."""
    with demo.lock:
        slowest = demo.board.slowest_trace
    if slowest is None:
        return ""
    duration_ns, trace_id = slowest
    command = [*EBPF_APM, "query", "--trace", trace_id, "--bootstrap-servers", bootstrap]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    shown = " ".join(["ebpf-apm", *command[len(EBPF_APM) :]])
    return (
        f"the slowest request ({duration_ns / 1e6:.1f} ms), its trace as\n\n  {shown}\n\n"
        f"shows it:\n\n{out.stdout or out.stderr}"
    )


def write_targets() -> Path:
    """The agent's targets file: both services by executable name, the user service's
    handler and its slow step as named functions."""
    path = LOG_DIR / "targets.yaml"
    path.write_text(
        "targets:\n"
        "  - name: userservice\n"
        "    select: {exeNames: [userservice]}\n"
        f"    functions: [{json.dumps(HANDLER)}, {json.dumps(SLOW_STEP)}]\n"
        "  - name: profileservice\n"
        "    select: {exeNames: [profileservice]}\n"
    )
    return path


def listen() -> str:
    """127.0.0.1:8080 if it is free, else any free port (the dashboard prints which)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", DASHBOARD_PORT))
        except OSError:
            return "127.0.0.1:0"
    return f"127.0.0.1:{DASHBOARD_PORT}"


def wrap(text: str) -> str:
    width = min(100, shutil.get_terminal_size().columns)
    return textwrap.fill(text, width, subsequent_indent="  ", break_on_hyphens=False)


def query_later() -> list[str]:
    """The command for a later look, as it is typed."""
    script = Path(sys.executable).parent / "ebpf-apm"
    command = [str(script)] if script.exists() else EBPF_APM
    return [*command, "query", "--storage", STORAGE, "--since", "15m"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration",
        type=float,
        default=float(os.environ.get("DEMO_SECONDS", 0)),
        help="stop after this many seconds of traffic (default: DEMO_SECONDS, else Ctrl-C)",
    )
    args = parser.parse_args()
    binaries = build_services()
    for stale in (DATABASE, Path(f"{DATABASE}-wal"), Path(f"{DATABASE}-shm")):
        stale.unlink(missing_ok=True)  # each demo stores its own run
    demo = Demo(args.duration)
    signal.signal(signal.SIGTERM, lambda *_: demo.stop.set())
    failed: ChildFailed | None = None
    trace = ""
    database = DemoDatabase()
    with EmbeddedBroker(port=0) as broker:
        demo.screen.note(f"broker: {broker.bootstrap_servers} (Tansu, in memory)")
        threads: list[threading.Thread] = []
        try:
            host, port = demo.start(binaries, database, broker.bootstrap_servers)
            threads = send_traffic(host, port, demo.traffic_stop)
            demo.screen.note(f"traffic: {CLIENTS} clients on /api/user/{{id}} and /health")
            with contextlib.suppress(KeyboardInterrupt):
                demo.run()
            try:
                demo.flush(threads)
                trace = slowest_trace(demo, broker.bootstrap_servers)
            except KeyboardInterrupt:
                demo.notes.put("not waiting for the last window")
        except KeyboardInterrupt:
            pass
        except ChildFailed as exc:
            failed = exc
        finally:
            demo.traffic_stop.set()
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the stop is already under way
            demo.print_notes()
            demo.screen.finish()
            stopped = demo.children.stop_all(STOP_TIMEOUT_S)
            database.remove()
    names = ", ".join(f"{child.name} {child.pid} ({how})" for child, how in stopped)
    print("\n" + wrap(f"stopped by pid, newest first: {names}, broker"))
    agent = next((c for c, _ in stopped if c.name == "agent"), None)
    totals = agent.last_line_with("totals:") if agent else None
    if totals:
        print(wrap(f"agent {short(totals)}"))
    if failed is not None:
        log = failed.child.log_path
        print(f"\nerror: {failed}; the end of its log {log}:", file=sys.stderr)
        print("".join(failed.child.tail), file=sys.stderr)
        return 1
    if not DATABASE.exists():
        print("\nstopped before the aggregator stored a window: nothing to look at later")
        return 0
    if trace:
        print("\n" + trace)
    command = query_later()
    dashboard = [*command[:-5], "dashboard", "--storage", STORAGE]
    print("\nfor a later look at the stored windows: the dashboard,\n\n  " + " ".join(dashboard)
          + "\n\nand the query:\n\n  " + " ".join(command) + "\n")  # fmt: skip
    return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
