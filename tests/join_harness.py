"""Running and watching the join against a real broker: join processes, their logs, and
`apm.spans` read the way an outside subscriber reads it (fastavro and the schema file)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fastavro
import fastavro.schema

REPO = Path(__file__).resolve().parent.parent
SPAN_SCHEMA_FILE = REPO / "schemas" / "span.avsc"
# Live traffic on a loaded machine: leave delays room.
LIVE = ["--allowed-lateness-ms", "2000", "--idle-advance-ms", "1000", "--stats-interval-s", "1"]


def outside_decoder() -> Any:
    """What a subscriber without this project needs: fastavro and the schema file."""
    schema = fastavro.schema.load_schema(str(SPAN_SCHEMA_FILE))
    canonical = fastavro.schema.to_parsing_canonical_form(schema)
    fingerprint = int(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"), 16)
    header = b"\xc3\x01" + fingerprint.to_bytes(8, "little")

    def decode(value: bytes) -> dict[str, Any]:
        assert value[:10] == header, "not single-object Avro of schemas/span.avsc"
        record = fastavro.schemaless_reader(io.BytesIO(value[10:]), schema, None)
        assert isinstance(record, dict)
        return record

    return decode


def start_join(bootstrap: str, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """`ebpf-apm join` in a child process, logging to `log`."""
    flags = ["--bootstrap-servers", bootstrap, "--session-timeout-ms", "6000", *LIVE, *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ebpf_apm.cli", "join", *flags],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=out,
        )


def stop_service(process: subprocess.Popen[bytes], name: str, log: Path) -> None:
    """SIGTERM a consumer service this test started (SIGKILL after 30 s); it must have
    exited 0, else the assertion shows its log."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, f"{name} exited {process.returncode}:\n{log.read_text()}"


def assigned(log: Path) -> list[list[int]]:
    lines = [ln for ln in log.read_text().splitlines() if "assigned partitions" in ln]
    return [json.loads(ln.rsplit("assigned partitions ", 1)[1]) for ln in lines]


def acknowledged(log: Path) -> int:
    """Spans the instance has seen acknowledged, from its latest stats line."""
    found = re.findall(r"out \d+ spans \((\d+) acknowledged\)", log.read_text())
    return int(found[-1]) if found else 0


def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
