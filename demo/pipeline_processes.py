"""The demo's child processes, started in order and stopped by pid in the reverse order.

Each child runs in its own session, so a Ctrl-C in the terminal reaches only the demo, which
then stops the children itself, one at a time. A child's stderr is copied to its log file
under build/demo/ and watched: warnings and errors become notes for the screen, and a line
the caller names marks the child ready.
"""

from __future__ import annotations

import ctypes
import re
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

# `2024-05-01 12:00:00,123 INFO producer.agent_command: ` in front of the services' logs
LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ (\w+) [\w.]+: ")


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to the child if the demo dies (even by SIGKILL).
    Tied to the starting thread: children are started from the main thread only."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def short(line: str) -> str:
    """A log line without its time stamp and logger, but with a level worth noticing."""
    match = LOG_PREFIX.match(line)
    if not match:
        return line.rstrip()
    level = match.group(1)
    rest = line[match.end() :].rstrip()
    return rest if level == "INFO" else f"{level}: {rest}"


def describe_exit(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        return signal.Signals(-code).name
    return f"exit {code}"


@dataclass(eq=False)
class Child:
    name: str
    process: subprocess.Popen[str]
    log_path: Path
    stop_signal: signal.Signals
    ready: threading.Event = field(default_factory=threading.Event)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    stopped_by_us: bool = False
    relay: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def last_line_with(self, text: str) -> str | None:
        return next((line for line in reversed(self.tail) if text in line), None)


class Children:
    """The processes the demo started; `note` receives lines worth showing (any thread)."""

    def __init__(self, log_dir: Path, note: Callable[[str], None]) -> None:
        self.log_dir = log_dir
        self.note = note
        self.started: list[Child] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        cwd: Path,
        ready_when: str | None = None,
        echo_until_ready: bool = False,
        stdout: int = subprocess.DEVNULL,
        stop_signal: signal.Signals = signal.SIGTERM,
        user: str | None = None,
    ) -> Child:
        log_path = self.log_dir / f"{name.replace(' ', '-')}.log"
        process = subprocess.Popen(
            argv, cwd=cwd, stdout=stdout, stderr=subprocess.PIPE, text=True,
            start_new_session=True,  # Ctrl-C in the terminal is the demo's to handle
            preexec_fn=_die_with_parent, user=user, group=user,
        )  # fmt: skip
        child = Child(name, process, log_path, stop_signal)
        if ready_when is None:
            child.ready.set()
        child.relay = threading.Thread(
            target=self._relay, args=(child, ready_when, echo_until_ready), daemon=True
        )
        child.relay.start()
        self.started.append(child)
        return child

    def _relay(self, child: Child, ready_when: str | None, echo: bool) -> None:
        stream: IO[str] | None = child.process.stderr
        assert stream is not None
        with child.log_path.open("w") as log, stream:
            for line in stream:
                log.write(line)
                log.flush()
                child.tail.append(line)
                if not child.ready.is_set():
                    if echo:
                        self.note(f"{child.name}: {short(line)}")
                    if ready_when is not None and ready_when in line:
                        child.ready.set()
                elif " WARNING " in line or " ERROR " in line or line.startswith("error"):
                    self.note(f"{child.name}: {short(line)}")
        child.ready.set()  # ended: nobody waits for it any longer

    def failed(self) -> list[Child]:
        """Children that exited without being asked to."""
        return [c for c in self.started if not c.stopped_by_us and c.process.poll() is not None]

    def stop_all(self, timeout_s: float = 10.0) -> list[tuple[Child, str]]:
        """Stop every child, newest first: its stop signal, then SIGKILL after timeout_s."""
        out = []
        for child in reversed(self.started):
            child.stopped_by_us = True
            process = child.process
            if process.poll() is None:
                process.send_signal(child.stop_signal)
                try:
                    process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.note(f"{child.name} (pid {child.pid}) ignored {child.stop_signal.name} "
                              f"for {timeout_s:.0f} s: killing it")  # fmt: skip
                    process.kill()
                    process.wait()
            if child.relay is not None:
                child.relay.join(5)
            out.append((child, describe_exit(process.returncode)))
        return out
