"""`ebpf-apm dashboard` as a process, and its page's operations table read back.

    with dashboard(storage) as (base_url, printed_line): ...
    rows = table_rows(html)                        # without a browser
    check_rows_equal_query(rows, query_json)       # the page shows what query --json prints

A row is the `tr.op`'s data- attributes (workload, operation, count, p50, p90, p99,
rate-per-s, errors, error-share) and each cell's text as `text-<class>`, as the browser
tests read them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import aiohttp
import pytest

from ebpf_apm.consumers.range_figures import format_ms

EBPF_APM = [sys.executable, "-m", "ebpf_apm.cli"]


@contextlib.contextmanager
def dashboard(storage: str, *flags: str) -> Iterator[tuple[str, str]]:
    """`ebpf-apm dashboard` on a free port: its base URL and the line it printed."""
    process = subprocess.Popen(
        [*EBPF_APM, "dashboard", "--storage", storage, "--listen", "127.0.0.1:0", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None and process.stderr is not None
        line = process.stdout.readline()
        if not line.startswith("dashboard: http://"):
            process.kill()
            pytest.fail(f"the dashboard did not start: {line!r} {process.stderr.read()}")
        yield line.split()[1], line
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        status = process.wait(15)
        _, errors = process.communicate()
        assert status == 0, errors


def get_page(url: str) -> tuple[int, str]:
    async def get() -> tuple[int, str]:
        async with aiohttp.ClientSession() as session, session.get(url) as answer:
            return answer.status, await answer.text()

    return asyncio.run(get())


def check_rows_equal_query(rows: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """The page's table (data- attributes and the text shown) is query --json's list."""
    assert [(r["workload"], r["operation"]) for r in rows] == [
        (e["workload"], e["operation"]) for e in expected
    ]
    for row, e in zip(rows, expected, strict=True):
        for name in ("count", "p50", "p90", "p99"):
            assert int(row[name]) == e[name], (row, name)
            shown = str(e[name]) if name == "count" else format_ms(e[name])
            assert row[f"text-{name}"] == shown, (row, name)
        assert float(row["rate-per-s"]) == e["rate_per_s"]
        assert row["text-rate"] == f"{e['rate_per_s']:.2f}/s"
        if e["errors"] is None:
            assert (row["errors"], row["error-share"], row["text-errors"]) == ("", "", "-")
        else:
            assert int(row["errors"]) == e["errors"]
            assert float(row["error-share"]) == e["error_share"]
            assert row["text-errors"] == f"{e['error_share'] * 100:.1f}%"


class _TableRows(HTMLParser):
    """The tr.op rows of the page: data- attributes and cell texts, as READ_PAGE has them."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if tag == "tr" and "op" in found.get("class", "").split():
            self.rows.append({k[5:]: v for k, v in found.items() if k.startswith("data-")})
        elif tag == "td" and self.rows:
            self._cell = "text-" + found.get("class", "").split()[0]
            self.rows[-1][self._cell] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self.rows[-1][self._cell] += data


def table_rows(html: str) -> list[dict[str, str]]:
    parser = _TableRows()
    parser.feed(html)
    return parser.rows
