"""Latency storage: SQLite and a real PostgreSQL behind one interface, identical rows."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from ebpf_apm.consumers.latency_sketch import LatencySketch
from ebpf_apm.consumers.latency_store import (
    LatencyRow,
    LatencyStore,
    Progress,
    StorageConfigError,
    StorageError,
    open_store,
    redact_url,
)
from ebpf_apm.consumers.route_template import SeriesKey
from ebpf_apm.consumers.window_aggregator import ClosedWindow
from ebpf_apm.kafka.embedded_broker import free_port

EBPF_APM = [sys.executable, "-m", "ebpf_apm.cli"]

pytestmark = pytest.mark.integration
# The PostgreSQL fixtures, until tests/conftest.py shares them with every module.

S = 1_000_000_000
T0 = 1_700_000_000 * S
KEYS = [
    SeriesKey("shop/api", "GET /api/user/{id}", "2xx"),
    SeriesKey("shop/api", "GET /api/user/{id}", "5xx"),
    SeriesKey("shop/api", "main.(*userService).handleGetUser", None),
    SeriesKey("billing", "POST /invoice|x", "2xx"),
]


def make_rows(seed: int, windows: int = 3) -> list[LatencyRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for w in range(windows):
        for key in KEYS:
            sketch = LatencySketch()
            sketch.add(np.round(rng.lognormal(15, 1.2, int(rng.integers(1, 5000)))).astype(int))
            window = ClosedWindow(0, T0 + w * 10 * S, T0 + (w + 1) * 10 * S, sketch)
            rows.append(LatencyRow.of(key, window))
    return rows


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'latency.sqlite'}"
    return str(request.getfixturevalue("postgres_url"))


def run(scenario: Callable[[LatencyStore], object], url: str) -> object:
    async def main() -> object:
        store = await open_store(url)
        try:
            result = scenario(store)
            assert asyncio.iscoroutine(result)
            return await result
        finally:
            await store.close()

    return asyncio.run(main())


def test_write_read_upsert_and_progress(store_url: str) -> None:
    first, second = make_rows(1), make_rows(2)

    async def scenario(store: LatencyStore) -> None:
        assert await store.progress("agg") is None
        await store.write(first, consumer="agg", window_ns=10 * S, watermark_ns=T0 + 30 * S)
        assert await store.rows(T0, T0 + 30 * S) == sorted(
            first, key=lambda r: (r.series, r.window_start_ns)
        )
        # The same windows again (a replay): replaced, not added.
        await store.write(second, consumer="agg", window_ns=10 * S, watermark_ns=T0 + 31 * S)
        again = await store.rows(T0, T0 + 30 * S)
        assert again == sorted(second, key=lambda r: (r.series, r.window_start_ns))
        assert await store.progress("agg") == Progress(10 * S, T0 + 31 * S)
        assert await store.progress("other") is None
        assert sorted(await store.series()) == sorted(KEYS)
        # [since, until) on the window start, and the filters.
        middle = await store.rows(T0 + 10 * S, T0 + 20 * S)
        assert {r.window_start_ns for r in middle} == {T0 + 10 * S}
        assert len(middle) == len(KEYS)
        only = await store.rows(T0, T0 + 30 * S, workload="billing", operation="POST /invoice|x")
        assert [r.key for r in only] == [KEYS[3]] * 3
        assert await store.rows(T0, T0 + 30 * S, workload="nobody") == []
        await store.write([], consumer="agg", window_ns=10 * S, watermark_ns=T0 + 40 * S)
        assert await store.progress("agg") == Progress(10 * S, T0 + 40 * S)
        sketch = again[0].load_sketch()
        assert sketch.count == again[0].count

    run(scenario, store_url)


def test_sqlite_and_postgresql_store_identical_rows(tmp_path: Path, postgres_url: str) -> None:
    rows = make_rows(3, windows=5)
    results = []
    for url in (f"sqlite:///{tmp_path / 'a.sqlite'}", postgres_url):

        async def scenario(store: LatencyStore) -> list[LatencyRow]:
            await store.write(rows[:7], consumer="c", window_ns=10 * S, watermark_ns=1)
            await store.write(rows, consumer="c", window_ns=10 * S, watermark_ns=2)
            return await store.rows(0, 2**62)

        results.append(run(scenario, url))
    assert results[0] == results[1]
    assert len(results[0]) == len(rows)  # type: ignore[arg-type]


def test_bad_urls_say_what_to_use(tmp_path: Path) -> None:
    with pytest.raises(StorageConfigError, match="sqlite:///path"):
        asyncio.run(open_store("mysql://x/y"))
    with pytest.raises(StorageConfigError, match="bad SQLite URL"):
        asyncio.run(open_store("sqlite:/relative.db"))
    with pytest.raises(StorageError, match="run `ebpf-apm aggregate`"):
        asyncio.run(open_store(f"sqlite:///{tmp_path / 'missing.sqlite'}", create=False))
    with pytest.raises(StorageError, match="directory exists"):
        asyncio.run(open_store(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.sqlite'}"))
    nobody = f"postgresql://apm:secret@127.0.0.1:{free_port()}/x"
    with pytest.raises(StorageError, match="cannot connect") as info:
        asyncio.run(open_store(nobody))
    assert "secret" not in str(info.value)


def test_ping_answers_while_the_store_is_open_and_fails_once_it_is_closed(store_url: str) -> None:
    """Readiness asks `ping()` every few seconds, also while the aggregator writes."""

    async def main() -> None:
        store = await open_store(store_url)
        try:
            await store.ping()
            # A write under way on the same connection: the ping does not get in its way.
            await asyncio.gather(
                store.write(make_rows(3), consumer="ping", window_ns=10 * S, watermark_ns=T0),
                store.ping(),
            )
            assert len(await store.rows(T0, T0 + 100 * S)) == len(make_rows(3))
        finally:
            await store.close()
        with pytest.raises(StorageError, match="ping failed"):
            await store.ping()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://apm:s3cret@db:5432/apm", "postgresql://apm:***@db:5432/apm"),
        (
            "postgresql://apm@db/apm?sslmode=require&password=s3cret",
            "postgresql://apm@db/apm?sslmode=require&password=***",
        ),
        ("postgres://u:p%40ss@h/d?PassWord=s3cret", "postgres://u:***@h/d?PassWord=***"),
        ("postgresql://:s3cret@h/d", "postgresql://:***@h/d"),
        ("postgresql://apm@db/apm", "postgresql://apm@db/apm"),
        ("sqlite:///relative.sqlite", "sqlite:///relative.sqlite"),
        ("sqlite:////var/lib/apm.sqlite", "sqlite:////var/lib/apm.sqlite"),
        (
            "postgres://db/apm?PassWord=x&application_name=a",
            "postgres://db/apm?PassWord=***&application_name=a",
        ),
        ("postgresql://[::1/apm", "<unparseable storage URL>"),
    ],
)
def test_redact_url_hides_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_storage_urls_are_redacted_where_printed(tmp_path: Path, postgres_url: str) -> None:
    # A server that refuses the password: the error names the URL, not the secret.
    parts = urlsplit(postgres_url)
    wrong = f"postgresql://nobody:s3cret@{parts.hostname}:{parts.port}/x?password=s3cret2"
    with pytest.raises(StorageError) as refused:
        asyncio.run(open_store(wrong))
    assert "s3cret" not in str(refused.value)
    assert f"nobody:***@{parts.hostname}:{parts.port}/x?password=***" in str(refused.value)
    with pytest.raises(StorageConfigError) as unsupported:
        asyncio.run(open_store("mysql://root:s3cret@db/apm"))
    assert "s3cret" not in str(unsupported.value)

    # Trust authentication: the server ignores the password we add.
    secret_url = postgres_url.replace("@", ":s3cret@", 1) + "?password=s3cret"

    async def shown_url() -> str:
        store = await open_store(secret_url)
        try:
            return store.url
        finally:
            await store.close()

    assert "s3cret" not in asyncio.run(shown_url())
    done = subprocess.run(  # nothing stored yet: `query` says where it looked
        [*EBPF_APM, "query", "--storage", secret_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "no windows between" in done.stderr
    assert "s3cret" not in done.stdout + done.stderr, done.stderr


def test_sqlite_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "private.sqlite"

    async def write() -> None:
        store = await open_store(f"sqlite:///{path}")
        try:
            await store.write(make_rows(1, windows=1), consumer="c", window_ns=S, watermark_ns=T0)
            modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
        finally:
            await store.close()
        assert modes == {
            p: 0o600 for p in ("private.sqlite", "private.sqlite-wal", "private.sqlite-shm")
        }

    old = os.umask(0o022)  # the usual umask: SQLite alone would create 0644
    try:
        asyncio.run(write())
    finally:
        os.umask(old)


_OPEN_AT_ONCE = """
import sys, time
from ebpf_apm.consumers.latency_store import SqliteStore
until = float(sys.argv[2])
while time.time() < until:
    pass
SqliteStore(sys.argv[1], sys.argv[1][len("sqlite:///"):])
"""


def test_members_opening_a_new_sqlite_file_at_once_all_succeed(tmp_path: Path) -> None:
    # Aggregate members started together: each switches the new file to WAL; SQLite refuses
    # all but one at once ("database is locked"), and the store tries again.
    for attempt in range(5):
        url = f"sqlite:///{tmp_path / f'at-once-{attempt}.sqlite'}"
        start = str(time.time() + 1.0)
        members = [
            subprocess.Popen(
                [sys.executable, "-c", _OPEN_AT_ONCE, url, start],
                stderr=subprocess.PIPE,
            )
            for _ in range(4)
        ]
        for member in members:
            _, err = member.communicate(timeout=60)
            assert member.returncode == 0, err.decode()
