"""Processes the agent tests start: Go servers, the agent itself, and a topic reader.

Everything here ends only the processes it started, by pid.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EBPF_APM = [sys.executable, "-m", "ebpf_apm.cli"]


@dataclass
class GoServer:
    process: subprocess.Popen[str]
    host: str
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


@contextmanager
def go_server(binary: Path, addr: str = "127.0.0.1:0") -> Iterator[GoServer]:
    process = subprocess.Popen([str(binary), "-addr", addr], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().split()
        assert line and line[0] == "LISTEN", f"server printed {line!r}"
        host, port = line[1].rsplit(":", 1)
        yield GoServer(process, host.strip("[]"), int(port))
    finally:
        end_process(process)


def end_process(process: subprocess.Popen[str], timeout: float = 10) -> None:
    """SIGTERM to a process a test started (SIGKILL after `timeout`), then close its pipes."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pipe in (process.stdout, process.stdin):
        if pipe:
            pipe.close()


class Agent:
    """`ebpf-apm agent` as a child process, with its log collected from stderr.

    `command` runs another installation of the command (the installed-wheel test's)."""

    def __init__(self, args: list[str], command: list[str] = EBPF_APM, cwd: Path = ROOT) -> None:
        self.process = subprocess.Popen(
            [*command, "agent", *args],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if "tracing " in line and "process(es)" in line:
                self._ready.set()
        self._ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 60) -> None:
        assert self._ready.wait(timeout), f"agent not ready after {timeout}s:\n{self.log}"
        assert self.process.poll() is None, f"agent exited {self.process.returncode}:\n{self.log}"

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"agent did not exit within {timeout}s:\n{self.log}") from None
        self._reader.join(5)
        self._close_pipe()
        return code

    def _close_pipe(self) -> None:
        if self.process.stderr is not None and not self._reader.is_alive():
            self.process.stderr.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        self._close_pipe()


def run_agent_to_exit(
    args: list[str], timeout: float = 60, user: str | None = None
) -> tuple[int, str]:
    """Run the agent to its end; `user` runs it as that unprivileged user instead of root."""
    prefix = (
        ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", "--inh-caps=-all"]
        if user
        else []
    )
    result = subprocess.run(
        [*prefix, *EBPF_APM, "agent", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result.returncode, result.stderr


def read_spans(bootstrap: str, pid: int, expected: int, timeout: float = 20) -> list[dict]:
    """Spans of one process from apm.uprobe.events, read with `ebpf-apm tail --json`."""
    deadline = time.monotonic() + timeout
    spans: list[dict] = []
    while True:
        result = subprocess.run(
            [
                *EBPF_APM,
                "tail",
                "apm.uprobe.events",
                "--from-beginning",
                "--json",
                "--timeout",
                "2",
                "--bootstrap-servers",
                bootstrap,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        # The agent creates the topic once the broker is reachable: until then, wait.
        if result.returncode != 0 and "does not exist" in result.stderr:
            assert time.monotonic() < deadline, result.stderr
            time.sleep(0.5)
            continue
        assert result.returncode == 0, result.stderr
        spans = [e for e in map(json.loads, result.stdout.splitlines()) if e["pid"] == pid]
        if len(spans) >= expected or time.monotonic() > deadline:
            return spans
        time.sleep(0.5)


@dataclass
class Request:
    rid: int
    method: str
    path: str
    query: str
    sleep_ms: int
    status: int
    start_ns: int = 0
    end_ns: int = 0
    got_status: int = 0
    headers: dict[str, str] | None = None  # sent with the request


def plan_requests(count: int, seed: int = 7, deep_every: int = 5) -> list[Request]:
    """A known mix: sleeping handlers (goroutines migrate across the sleep) and deep
    recursion (the goroutine stack is grown and copied) with odd statuses and methods."""
    rng = random.Random(seed)
    requests = []
    for rid in range(count):
        method = rng.choice(["GET", "GET", "POST", "PUT"])
        ms = rng.randint(3, 30)
        if rid % deep_every == 0:
            requests.append(Request(rid, method, f"/deep/{rid}", f"depth=2000&ms={ms}", ms, 200))
        else:
            status = rng.choice([200, 200, 201, 404, 503])
            requests.append(
                Request(rid, method, f"/sleep/{rid}", f"ms={ms}&status={status}", ms, status)
            )
    return requests


def send_concurrently(server: GoServer, requests: list[Request], clients: int = 16) -> None:
    """`clients` keep-alive connections share the requests; records client-side times."""
    queue = list(reversed(requests))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client() -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    req = queue.pop()
                req.start_ns = time.time_ns()
                conn.request(
                    req.method,
                    f"{req.path}?{req.query}",
                    body=b"" if req.method != "GET" else None,
                    headers=req.headers or {},
                )
                response = conn.getresponse()
                response.read()
                req.end_ns = time.time_ns()
                req.got_status = response.status
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(r.got_status == r.status for r in requests)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- Raw HTTP/1.1 clients that count every byte on the wire ----------------------------

CHUNKED_END = 5  # "0\r\n\r\n", written by net/http after the handler returns


@dataclass
class Exchange:
    request: bytes
    response_bytes: int = 0
    start_ns: int = 0
    end_ns: int = 0


@dataclass
class Connection:
    local_port: int = 0
    exchanges: list[Exchange] = field(default_factory=list)


def read_chunked_response(stream) -> int:
    """Read one chunked HTTP/1.1 response; returns how many bytes it took on the wire."""
    total = 0
    while True:  # status line and headers
        line = stream.readline()
        total += len(line)
        if line in (b"\r\n", b""):
            break
    while True:
        size_line = stream.readline()
        total += len(size_line)
        size = int(size_line.strip(), 16)
        data = stream.read(size + 2)
        total += len(data)
        if size == 0:
            return total


def run_client(host: str, port: int, conn: Connection, count: int, seed: int) -> None:
    rng = random.Random(seed)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.connect((host, port))
        conn.local_port = sock.getsockname()[1]
        stream = sock.makefile("rb")
        for i in range(count):
            sizes = ",".join(str(rng.randint(1, 6000)) for _ in range(rng.randint(1, 4)))
            path = f"/chunks/{seed}-{i}?sizes={sizes}&ms={rng.randint(1, 8)}"
            request = f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()
            exchange = Exchange(request, start_ns=time.clock_gettime_ns(time.CLOCK_BOOTTIME))
            sock.sendall(request)
            exchange.response_bytes = read_chunked_response(stream)
            exchange.end_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
            conn.exchanges.append(exchange)
        stream.close()
