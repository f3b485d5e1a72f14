"""A real PostgreSQL 15 server for the tests (Debian's postgresql package), one per session.

`initdb` into a fresh directory, then `postgres` on a free port of 127.0.0.1 with trust
authentication and fsync off (a test server; the crash tests kill our processes, not the
machine). PostgreSQL refuses to run as root, so under root (CI) the server runs as the
`postgres` user of the package, in a directory that user owns outside pytest's private
temporary tree. The server is stopped by pid at the end of the session (SIGINT: fast
shutdown; SIGKILL if it lingers), and the kernel stops it if pytest itself dies.

Fixtures: `postgres_server` (session: the server) and `postgres_url` (a new empty database
per test, as a postgresql:// URL). Outage tests start a `PostgresServer` of their own and
`pause()`/`resume()` it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
SERVER_USER = "postgres"  # the unprivileged user PostgreSQL runs as under root


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> Callable[[], None]:
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: runs after the user switch

    return preexec


class PostgresServer:
    def __init__(self) -> None:
        self.port = _free_port()
        self.superuser = "apm"
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._user: str | None = None

    def _run_as(self) -> dict[str, object]:
        return {"user": self._user, "group": self._user} if self._user else {}

    def start(self) -> PostgresServer:
        try:
            return self._start()
        except BaseException:
            self.stop()  # no server or directory left behind, whatever failed
            raise

    def _start(self) -> PostgresServer:
        for tool in ("initdb", "postgres"):
            if not (PG_BIN / tool).exists():
                pytest.fail(
                    f"{PG_BIN / tool} not found: install Debian's postgresql package "
                    "(`make setup` does) or set PG_BIN to PostgreSQL 15's bin directory"
                )
        # /tmp: reachable by the server's user whatever $TMPDIR is, and short enough for the
        # Unix socket path (about 100 bytes at most).
        base = "/tmp" if os.access("/tmp", os.W_OK) else None
        self._dir = Path(tempfile.mkdtemp(prefix="ebpf-apm-pg-", dir=base))
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam(SERVER_USER)
            except KeyError:
                pytest.fail(
                    f"running as root and there is no {SERVER_USER!r} user to run PostgreSQL "
                    "as: install Debian's postgresql package, which creates it"
                )
            self._user = SERVER_USER
            os.chown(self._dir, account.pw_uid, account.pw_gid)
        data = self._dir / "data"
        initdb = subprocess.run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                self.superuser,
                "--auth=trust",
                "--no-locale",
                "--encoding=UTF8",
                "--no-sync",
            ],
            capture_output=True,
            cwd=self._dir,
            **self._run_as(),  # type: ignore[call-overload]
        )
        if initdb.returncode != 0:
            self.stop()
            pytest.fail(f"initdb failed ({initdb.returncode}):\n{initdb.stderr.decode()}")
        self._launch()
        return self

    def _launch(self) -> None:
        assert self._dir is not None
        data = self._dir / "data"
        log = (self._dir / "server.log").open("ab")
        if self._user:
            os.chown(self._dir / "server.log", pwd.getpwnam(self._user).pw_uid, -1)
        self._process = subprocess.Popen(
            [
                str(PG_BIN / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.port),
                "-k",
                str(self._dir),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=50",
                "-c",
                "shared_buffers=32MB",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self._dir,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
            **self._run_as(),  # type: ignore[call-overload]
        )
        log.close()
        self._wait_ready()

    def pause(self) -> None:
        """Stop the server (fast shutdown: clients are disconnected), keeping its data."""
        self._shut_down()

    def resume(self) -> None:
        """Start the paused server again on the same port and data."""
        self._launch()

    def _log_tail(self) -> str:
        assert self._dir is not None
        with contextlib.suppress(OSError):
            return (self._dir / "server.log").read_text(errors="replace")[-3000:]
        return "(no log)"

    def _wait_ready(self, timeout_s: float = 30.0) -> None:
        import asyncpg

        async def ping() -> None:
            conn = await asyncpg.connect(self.url("postgres"), timeout=2)
            await conn.close()

        deadline = time.monotonic() + timeout_s
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                tail = self._log_tail()
                self.stop()
                pytest.fail(f"PostgreSQL exited with {self._process.returncode}:\n{tail}")
            try:
                asyncio.run(ping())
                return
            except (OSError, asyncpg.PostgresError, TimeoutError):
                if time.monotonic() > deadline:
                    tail = self._log_tail()
                    self.stop()
                    pytest.fail(f"PostgreSQL did not accept connections in {timeout_s} s:\n{tail}")
                time.sleep(0.1)

    def url(self, database: str) -> str:
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import asyncpg

        name = f"t_{uuid.uuid4().hex[:12]}"

        async def create() -> None:
            conn = await asyncpg.connect(self.url("postgres"), timeout=10)
            try:
                await conn.execute(f"CREATE DATABASE {name}")
            finally:
                await conn.close()

        asyncio.run(create())
        return self.url(name)

    def stop(self) -> None:
        self._shut_down()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _shut_down(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGINT)  # fast shutdown
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database()
