"""Where closed latency windows live: one small interface, SQLite or PostgreSQL behind it.

    store = await open_store("sqlite:///apm.sqlite")   # or postgresql://user@host/db
    await store.write(rows, consumer="ebpf-apm-aggregate", watermark_ns=...)
    rows = await store.rows(since_ns, until_ns, workload=..., operation=...)

One row per series and window, `latency_windows`, keyed by (series, window_start_ns); a
write is one transaction of upserts, so writing the same window again (a replay after a
crash) leaves the same row. The same transaction records the aggregator's watermark
(`aggregate_progress`): after a restart, windows up to it are known to be written.

This is the only module that imports the storage drivers (sqlite3, asyncpg). SQLite runs in
WAL mode with synchronous=FULL: a committed write survives a crash of the process and of
the machine. SQLite calls block the event loop for the few milliseconds a write takes. The
SQLite file and its -wal/-shm companions are created 0600 (owner only).

A store's `url` is the storage URL with its password redacted (`redact_url`): safe for logs,
errors and status lines; the real one is only used to connect. A PostgreSQL store that lost
its connection (server restarted) reconnects on the next call; the failed call raises
`StorageError`, which the aggregator retries with backoff.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from ebpf_apm.consumers.errors import ConsumerConfigError, ConsumerError
from ebpf_apm.consumers.latency_sketch import LatencySketch
from ebpf_apm.consumers.route_template import SeriesKey
from ebpf_apm.consumers.window_aggregator import ClosedWindow

DEFAULT_STORAGE = "sqlite:///ebpf-apm.sqlite"
STORAGE_ENV = "EBPF_APM_STORAGE"
QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)


class StorageError(ConsumerError):
    """Storage failed at run time (exit status 1): unreachable, refused a write, corrupt."""


class StorageConfigError(StorageError, ConsumerConfigError):
    """A storage URL that names no supported backend (exit status 2)."""


@dataclass(frozen=True)
class LatencyRow:
    """One closed window of one series; durations in ns."""

    series: str
    window_start_ns: int
    window_end_ns: int
    workload: str
    operation: str
    status_class: str | None
    count: int
    sum: int
    min: int
    max: int
    p50: int
    p90: int
    p95: int
    p99: int
    p999: int
    sketch: bytes

    @classmethod
    def of(cls, key: SeriesKey, window: ClosedWindow) -> LatencyRow:
        s = window.sketch
        p50, p90, p95, p99, p999 = s.quantile_ns(QUANTILES)
        return cls(
            key.series,
            window.start_ns,
            window.end_ns,
            key.workload,
            key.operation,
            key.status_class,
            s.count,
            s.sum,
            s.min,
            s.max,
            p50,
            p90,
            p95,
            p99,
            p999,
            s.to_bytes(),
        )

    @property
    def key(self) -> SeriesKey:
        return SeriesKey(self.workload, self.operation, self.status_class)

    def load_sketch(self) -> LatencySketch:
        return LatencySketch.from_bytes(self.sketch)

    def values(self) -> tuple[Any, ...]:
        """The columns in COLUMNS order (dataclasses.astuple deep-copies: slow)."""
        return tuple(getattr(self, c) for c in COLUMNS)

    def as_dict(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in COLUMNS}


COLUMNS = [f.name for f in fields(LatencyRow)]
_VALUE_COLUMNS = [c for c in COLUMNS if c not in ("series", "window_start_ns")]


def _schema(blob: str) -> list[str]:
    figures = ",\n".join(
        f"    {c} BIGINT NOT NULL"
        for c in ("count", "sum", "min", "max", "p50", "p90", "p95", "p99", "p999")
    )
    return [
        f"""CREATE TABLE IF NOT EXISTS latency_windows (
    series TEXT NOT NULL,
    window_start_ns BIGINT NOT NULL,
    window_end_ns BIGINT NOT NULL,
    workload TEXT NOT NULL,
    operation TEXT NOT NULL,
    status_class TEXT,
{figures},
    sketch {blob} NOT NULL,
    PRIMARY KEY (series, window_start_ns)
)""",
        "CREATE INDEX IF NOT EXISTS latency_windows_by_start ON latency_windows (window_start_ns)",
        """CREATE TABLE IF NOT EXISTS aggregate_progress (
    consumer TEXT PRIMARY KEY,
    window_ns BIGINT NOT NULL,
    watermark_ns BIGINT NOT NULL
)""",
    ]


def _upsert(placeholders: list[str]) -> str:
    updates = ", ".join(f"{c} = excluded.{c}" for c in _VALUE_COLUMNS)
    return (
        f"INSERT INTO latency_windows ({', '.join(COLUMNS)}) VALUES ({', '.join(placeholders)}) "
        f"ON CONFLICT (series, window_start_ns) DO UPDATE SET {updates}"
    )


def _progress_upsert(p: list[str]) -> str:
    return (
        f"INSERT INTO aggregate_progress (consumer, window_ns, watermark_ns) "
        f"VALUES ({p[0]}, {p[1]}, {p[2]}) ON CONFLICT (consumer) DO UPDATE SET "
        "window_ns = excluded.window_ns, watermark_ns = excluded.watermark_ns"
    )


def _select(p: list[str], workload: bool, operation: bool) -> str:
    where = [f"window_start_ns >= {p[0]}", f"window_start_ns < {p[1]}"]
    if workload:
        where.append(f"workload = {p[len(where)]}")
    if operation:
        where.append(f"operation = {p[len(where)]}")
    return (
        f"SELECT {', '.join(COLUMNS)} FROM latency_windows WHERE {' AND '.join(where)} "
        "ORDER BY series, window_start_ns"
    )


@dataclass(frozen=True)
class Progress:
    window_ns: int
    watermark_ns: int


class LatencyStore(ABC):
    """The interface the services use."""

    url: str

    @abstractmethod
    async def write(
        self, rows: Sequence[LatencyRow], *, consumer: str, window_ns: int, watermark_ns: int
    ) -> None:
        """Upsert rows and record the consumer's watermark, in one durable transaction."""

    @abstractmethod
    async def progress(self, consumer: str) -> Progress | None:
        """The consumer's last recorded window size and watermark, if any."""

    @abstractmethod
    async def series(self) -> list[SeriesKey]:
        """Every series stored (the aggregator's cardinality cap starts from these)."""

    @abstractmethod
    async def rows(
        self,
        since_ns: int,
        until_ns: int,
        *,
        workload: str | None = None,
        operation: str | None = None,
    ) -> list[LatencyRow]:
        """Rows whose window starts in [since_ns, until_ns), by series and start."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise StorageError unless the storage answers a trivial query (readiness)."""

    @abstractmethod
    async def close(self) -> None: ...


def _row(values: Sequence[Any]) -> LatencyRow:
    out = list(values)
    out[-1] = bytes(out[-1])
    return LatencyRow(*out)


def _create_private(path: str) -> None:
    """Create the database file 0600 if it does not exist (SQLite would create it 0644 under
    the usual umask); SQLite gives its -wal and -shm files the database file's mode."""
    if path == ":memory:" or path.startswith("file:"):
        return
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def _set_up(db: sqlite3.Connection, patience_s: float = 10.0) -> None:
    """WAL mode and the schema. Two processes opening a new file at once (aggregate members
    started together) can both be refused the switch to WAL at once: SQLite answers "database
    is locked" at once, without waiting (a deadlock otherwise), so try again for a while."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=10000")
            for statement in _schema("BLOB"):
                db.execute(statement)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class SqliteStore(LatencyStore):
    def __init__(self, url: str, path: str) -> None:
        self.url = redact_url(url)
        self.path = path
        try:
            _create_private(path)
            self._db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
            _set_up(self._db)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(
                f"cannot open SQLite database {path!r} ({self.url}): {exc}; check that the "
                "directory exists and is writable"
            ) from exc

    def _fail(self, action: str, exc: Exception) -> StorageError:
        return StorageError(f"SQLite {self.path!r}: {action} failed: {exc}")

    async def write(
        self, rows: Sequence[LatencyRow], *, consumer: str, window_ns: int, watermark_ns: int
    ) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(_upsert(["?"] * len(COLUMNS)), [r.values() for r in rows])
                self._db.execute(_progress_upsert(["?"] * 3), (consumer, window_ns, watermark_ns))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._fail(f"writing {len(rows)} windows", exc) from exc

    async def progress(self, consumer: str) -> Progress | None:
        try:
            found = self._db.execute(
                "SELECT window_ns, watermark_ns FROM aggregate_progress WHERE consumer = ?",
                (consumer,),
            ).fetchone()
        except sqlite3.Error as exc:
            raise self._fail("reading progress", exc) from exc
        return Progress(*found) if found else None

    async def series(self) -> list[SeriesKey]:
        try:
            found = self._db.execute(
                "SELECT DISTINCT workload, operation, status_class FROM latency_windows"
            ).fetchall()
        except sqlite3.Error as exc:
            raise self._fail("listing series", exc) from exc
        return [SeriesKey(*r) for r in found]

    async def rows(
        self,
        since_ns: int,
        until_ns: int,
        *,
        workload: str | None = None,
        operation: str | None = None,
    ) -> list[LatencyRow]:
        args: list[Any] = [since_ns, until_ns]
        args += [v for v in (workload, operation) if v is not None]
        query = _select(["?"] * 4, workload is not None, operation is not None)
        try:
            return [_row(r) for r in self._db.execute(query, args).fetchall()]
        except sqlite3.Error as exc:
            raise self._fail("reading windows", exc) from exc

    async def ping(self) -> None:
        try:
            self._db.execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise self._fail("ping", exc) from exc

    async def close(self) -> None:
        self._db.close()


def _postgres_errors() -> tuple[type[BaseException], ...]:
    """What asyncpg raises when the server refuses or goes away (a closed connection is an
    InterfaceError, not a PostgresError)."""
    import asyncpg  # only the PostgreSQL backend needs it

    return (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class PostgresStore(LatencyStore):
    def __init__(self, url: str, connection: Any, timeout_s: float) -> None:
        self.url = redact_url(url)
        self._real_url = url  # only to connect again: never printed
        self._timeout_s = timeout_s
        self._closed = False
        self._db: Any = connection

    @classmethod
    async def connect(cls, url: str, timeout_s: float = 10.0) -> PostgresStore:
        import asyncpg  # only the PostgreSQL backend needs it

        try:
            connection = await asyncpg.connect(url, timeout=timeout_s)
        except _postgres_errors() as exc:
            raise StorageError(
                f"cannot connect to PostgreSQL at {redact_url(url)}: {type(exc).__name__}: "
                f"{exc}; check that the server runs and the URL's user, password and database"
            ) from exc
        try:
            async with connection.transaction():
                # Several aggregators may start at once: serialise the CREATE ... IF NOT EXISTS.
                await connection.execute("SELECT pg_advisory_xact_lock(4242)")
                for statement in _schema("BYTEA"):
                    await connection.execute(statement)
        except asyncpg.PostgresError as exc:
            await connection.close()
            raise StorageError(
                f"cannot create the tables in PostgreSQL at {redact_url(url)}: {exc}; "
                "the user needs CREATE on the database"
            ) from exc
        return cls(url, connection, timeout_s)

    async def _connection(self) -> Any:
        """The open connection; a new one when the last was lost (server restarted)."""
        import asyncpg

        if self._db.is_closed():
            if self._closed:  # by close(): the store is done, not the server away
                raise asyncpg.InterfaceError("the store was closed")
            self._db = await asyncpg.connect(self._real_url, timeout=self._timeout_s)
        return self._db

    async def _lost(self) -> None:
        """Drop a connection a failure may have left unusable: the next call reconnects."""
        with contextlib.suppress(*_postgres_errors()):
            await self._db.close(timeout=1)
        self._db.terminate()

    def _fail(self, action: str, exc: BaseException) -> StorageError:
        return StorageError(f"PostgreSQL {self.url}: {action} failed: {type(exc).__name__}: {exc}")

    async def write(
        self, rows: Sequence[LatencyRow], *, consumer: str, window_ns: int, watermark_ns: int
    ) -> None:
        marks = [f"${i + 1}" for i in range(len(COLUMNS))]
        try:
            db = await self._connection()
            async with db.transaction():
                if rows:
                    await db.executemany(_upsert(marks), [r.values() for r in rows])
                await db.execute(
                    _progress_upsert(["$1", "$2", "$3"]), consumer, window_ns, watermark_ns
                )
        except _postgres_errors() as exc:
            await self._lost()
            raise self._fail(f"writing {len(rows)} windows", exc) from exc

    async def progress(self, consumer: str) -> Progress | None:
        found = await self._fetch(
            "reading progress",
            "SELECT window_ns, watermark_ns FROM aggregate_progress WHERE consumer = $1",
            consumer,
        )
        return Progress(*found[0]) if found else None

    async def series(self) -> list[SeriesKey]:
        found = await self._fetch(
            "listing series",
            "SELECT DISTINCT workload, operation, status_class FROM latency_windows",
        )
        return [SeriesKey(*r) for r in found]

    async def rows(
        self,
        since_ns: int,
        until_ns: int,
        *,
        workload: str | None = None,
        operation: str | None = None,
    ) -> list[LatencyRow]:
        args: list[Any] = [since_ns, until_ns]
        args += [v for v in (workload, operation) if v is not None]
        query = _select(["$1", "$2", "$3", "$4"], workload is not None, operation is not None)
        return [_row(r) for r in await self._fetch("reading windows", query, *args)]

    async def _fetch(self, action: str, query: str, *args: Any) -> list[Any]:
        try:
            return list(await (await self._connection()).fetch(query, *args))
        except _postgres_errors() as exc:
            await self._lost()
            raise self._fail(action, exc) from exc

    async def ping(self) -> None:
        import asyncpg

        try:  # reconnects after a lost connection, so readiness comes back with the server
            await (await self._connection()).fetchval("SELECT 1", timeout=2.0)
        except asyncpg.InterfaceError as exc:
            # One connection serves the aggregator too: asyncpg refuses a second operation
            # while one is under way, before sending anything. A busy connection is alive.
            if "another operation is in progress" in str(exc):
                return
            raise self._fail("ping", exc) from exc
        except _postgres_errors() as exc:
            raise self._fail("ping", exc) from exc

    async def close(self) -> None:
        self._closed = True
        await self._db.close()


_SECRET_PARAMETERS = ("password", "passfile", "sslpassword", "sslkey")


def redact_url(url: str) -> str:
    """The storage URL with its secrets replaced by ***: `user:password@` and `?password=`
    (and the other credential parameters libpq takes). The one way a storage URL is shown."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not parseable as a URL: show nothing of it that could be secret
        return "<unparseable storage URL>"
    netloc = parts.netloc
    if password is not None:
        user_info, _, host = netloc.rpartition("@")
        user = user_info.split(":", 1)[0]
        netloc = f"{user}:***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMETERS for k, _ in pairs):
            redacted = [(k, "***" if k.lower() in _SECRET_PARAMETERS else v) for k, v in pairs]
            query = urlencode(redacted, safe="*/:")
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # geturl() would rewrite sqlite:///x as sqlite:/x
    return parts._replace(netloc=netloc, query=query).geturl()


def sqlite_path(url: str) -> str:
    """sqlite:///relative/file, sqlite:////absolute/file, sqlite:///:memory:."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise StorageConfigError(
            f"bad SQLite URL {url!r}: expected sqlite:///relative/path or sqlite:////absolute/path"
        )
    return unquote(url[len(prefix) :])


def storage_url(given: str | None) -> str:
    """--storage, else $EBPF_APM_STORAGE, else the embedded default."""
    return given or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


async def open_store(url: str, *, create: bool = True) -> LatencyStore:
    """The store at url; with create=False a SQLite file that does not exist is an error."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        path = sqlite_path(url)
        if not create and path != ":memory:" and not os.path.exists(path):
            raise StorageError(
                f"no SQLite database at {path!r} ({url}): run `ebpf-apm aggregate` to create "
                "it, or point --storage (or $EBPF_APM_STORAGE) at the aggregator's storage"
            )
        return SqliteStore(url, path)
    if scheme in ("postgresql", "postgres"):
        return await PostgresStore.connect(url)
    raise StorageConfigError(
        f"unsupported storage URL {redact_url(url)!r}: use sqlite:///path (embedded) or "
        "postgresql://user[:password]@host[:port]/database"
    )
