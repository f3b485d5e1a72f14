"""The demo's database: a throwaway PostgreSQL 15 cluster (Debian's postgresql package, which
`make setup` installs) with a `users` table the user service reads and updates.

`initdb` into a fresh directory under /tmp, then `postgres` on a free port of 127.0.0.1 with
trust authentication (a demo server, reachable only from this machine). PostgreSQL refuses
to run as root, so under root it runs as the package's `postgres` user. The demo starts and
stops the server like its other children (by pid); `remove()` deletes the directory.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
SERVER_USER = "postgres"
USERS = 500


class DemoDatabase:
    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.dir = Path(tempfile.mkdtemp(prefix="ebpf-apm-demo-pg-", dir="/tmp"))
        self.user: str | None = None
        if os.geteuid() == 0:
            account = pwd.getpwnam(SERVER_USER)  # KeyError: no postgresql package
            os.chown(self.dir, account.pw_uid, account.pw_gid)
            self.user = SERVER_USER

    @property
    def url(self) -> str:
        return f"postgresql://demo@127.0.0.1:{self.port}/demo?sslmode=disable"

    def initdb(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise FileNotFoundError(
                f"{PG_BIN / 'initdb'} not found: run `make setup` (it installs Debian's "
                "postgresql package) or set PG_BIN to PostgreSQL 15's bin directory"
            )
        subprocess.run(
            [str(PG_BIN / "initdb"), "-D", str(self.dir / "data"), "-U", "demo",
             "--auth=trust", "--no-locale", "--encoding=UTF8", "--no-sync"],
            cwd=self.dir, check=True, capture_output=True, user=self.user, group=self.user,
        )  # fmt: skip

    def server_argv(self) -> list[str]:
        """The server's command line (run it as `self.user`; SIGINT is a fast shutdown)."""
        data, port = str(self.dir / "data"), str(self.port)
        return [str(PG_BIN / "postgres"), "-D", data, "-p", port, "-k", str(self.dir),
                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]  # fmt: skip

    def seed(self, timeout_s: float = 30.0) -> None:
        """Wait for the server, then create and fill the users table."""
        import asyncio

        import asyncpg

        async def create() -> None:
            admin = await asyncpg.connect(self.url.replace("/demo?", "/postgres?"), timeout=2)
            try:
                await admin.execute("CREATE DATABASE demo")
            finally:
                await admin.close()
            conn = await asyncpg.connect(self.url, timeout=2)
            try:
                await conn.execute(
                    "CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL, "
                    "visits int NOT NULL DEFAULT 0)"
                )
                # Every 17th user is missing: the service answers 404 for them.
                rows = [(i, f"user-{i}") for i in range(1, USERS + 1) if i % 17]
                await conn.copy_records_to_table("users", records=rows, columns=["id", "name"])
            finally:
                await conn.close()

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                asyncio.run(create())
                return
            except (OSError, asyncpg.CannotConnectNowError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
