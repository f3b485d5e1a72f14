"""`ebpf-apm dashboard` against stores filled with windows of durations this test draws.

The ground truth is the test's own durations: `query --json` must agree with them (within
the sketch's 1%), the dashboard's table must show exactly what `query --json` prints for the
same range, the chart one point per stored window at that window's percentiles, and the
heatmap every call of every window. A real headless Chromium loads the page and takes a
screenshot; PostgreSQL is read through the same store (plain HTTP there).
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest
from dashboard_harness import (
    EBPF_APM,
    check_rows_equal_query,
    dashboard,
    get_page,
    table_rows,
)
from headless_browser import HeadlessChromium
from PIL import Image

from ebpf_apm import cli
from ebpf_apm.consumers.latency_heatmap import latency_heatmap
from ebpf_apm.consumers.latency_sketch import LatencySketch
from ebpf_apm.consumers.latency_store import LatencyRow, open_store, redact_url
from ebpf_apm.consumers.route_template import SeriesKey
from ebpf_apm.consumers.svg_charts import SERIES
from ebpf_apm.consumers.window_aggregator import ClosedWindow

S = 1_000_000_000
WINDOW = 10 * S
T0 = 1_796_000_000 * S  # a fixed past instant, whole windows
WINDOWS = 20
# workload, operation, status class, median ns, calls per window, windows it skips
SERIES_DRAWN = [
    ("shop", "GET /api/cart/{id}", "2xx", 20e6, 150, ()),
    ("shop", "GET /api/cart/{id}", "5xx", 80e6, 7, (4, 5)),
    ("shop", "GET /api/cart/{id}", "4xx", 5e6, 3, ()),
    ("shop", "GET /health", "2xx", 20e3, 40, tuple(range(0, WINDOWS, 3))),
    ("shop", "main.(*cart).load", None, 12e6, 150, ()),
    ("pay", "POST /pay", "2xx", 50e6, 60, (0, 1, 2, 3)),
]
# Windows 2..19 of 0..19; the range goes on past the stored windows, whose time the rate uses.
SINCE, UNTIL = T0 + 2 * WINDOW, T0 + 25 * WINDOW


def drawn() -> dict[tuple[str, str, str | None, int], np.ndarray]:
    """Durations per series and window start; the ground truth of every test here."""
    rng = np.random.default_rng(13)
    out = {}
    for workload, operation, status, median, calls, skipped in SERIES_DRAWN:
        for w in range(WINDOWS):
            if w in skipped:
                continue
            wave = 1 + 0.6 * math.sin(w / 2.5)
            values = rng.lognormal(math.log(median * wave), 0.6, calls + w).astype(np.int64)
            out[(workload, operation, status, T0 + w * WINDOW)] = values
    return out


def fill(url: str, durations: dict[tuple[str, str, str | None, int], np.ndarray]) -> None:
    rows = []
    for (workload, operation, status, start), values in durations.items():
        sketch = LatencySketch()
        sketch.add(values)
        key = SeriesKey(workload, operation, status)
        rows.append(LatencyRow.of(key, ClosedWindow(0, start, start + WINDOW, sketch)))

    async def write() -> None:
        store = await open_store(url)
        await store.write(rows, consumer="test", window_ns=WINDOW, watermark_ns=0)
        await store.close()

    asyncio.run(write())


def in_range(
    durations: dict[tuple[str, str, str | None, int], np.ndarray], workload: str, operation: str
) -> dict[int, np.ndarray]:
    """The operation's durations per window start, status classes together, in the range."""
    out: dict[int, list[np.ndarray]] = {}
    for (w, op, _, start), values in durations.items():
        if (w, op) == (workload, operation) and SINCE <= start < UNTIL:
            out.setdefault(start, []).append(values)
    return {start: np.sort(np.concatenate(v)) for start, v in sorted(out.items())}


def lower_quantile(values: np.ndarray, q: float) -> int:
    return int(values[math.floor(q * (values.size - 1))])


def query_json(storage: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [*EBPF_APM, "query", "--storage", storage, "--json",
         "--since", str(SINCE // S), "--until", str(UNTIL // S)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def page_url(base: str, **chosen: str) -> str:
    return base + "?" + urlencode({"since": str(SINCE // S), "until": str(UNTIL // S), **chosen})


def check_query_against_truth(
    expected: list[dict[str, Any]], durations: dict[tuple[str, str, str | None, int], np.ndarray]
) -> None:
    for e in expected:
        windows = in_range(durations, e["workload"], e["operation"])
        values = np.sort(np.concatenate(list(windows.values())))
        assert (e["count"], e["windows"]) == (values.size, len(windows))
        starts = [k[3] for k in durations if k[0] == e["workload"] and SINCE <= k[3] < UNTIL]
        stored_s = (max(starts) + WINDOW - min(starts)) / S  # the workload's stored time
        assert e["rate_per_s"] == values.size / stored_s
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            exact = lower_quantile(values, q)
            assert abs(e[name] - exact) <= 0.01 * exact, (e, name, exact)
        statuses = {k[2] for k in durations if k[:2] == (e["workload"], e["operation"])}
        if statuses == {None}:
            assert e["errors"] is None and e["error_share"] is None
        else:
            errors = sum(
                v.size
                for (w, op, status, start), v in durations.items()
                if (w, op, status) == (e["workload"], e["operation"], "5xx")
                and SINCE <= start < UNTIL
            )
            assert e["errors"] == errors and e["error_share"] == errors / values.size


# The page's table and chosen operation, read in the browser: every row's data- attributes
# and the text of its cells; every chart point and heatmap cell.
READ_PAGE = """(() => {
  const rows = [...document.querySelectorAll('tr.op')].map(tr => {
    const row = {};
    for (const a of tr.attributes) if (a.name.startsWith('data-')) row[a.name.slice(5)] = a.value;
    for (const td of tr.querySelectorAll('td')) row['text-' + td.className.split(' ')[0]] =
      td.textContent;
    return row;
  });
  const chosen = document.querySelector('section.chosen-operation');
  const points = {};
  for (const name of ['p50', 'p90', 'p99'])
    points[name] = [...document.querySelectorAll('svg.latency-chart circle.point.' + name)]
      .map(c => [c.dataset.startNs, c.dataset.ns]);
  const cells = [...document.querySelectorAll('svg.latency-heatmap rect.cell')]
    .map(r => [r.dataset.startNs, r.dataset.band, r.dataset.count]);
  return {rows, chosen: chosen && {...chosen.dataset}, points, cells};
})()"""


def check_charts(page: dict[str, Any], windows: dict[int, np.ndarray]) -> None:
    """One point per stored window, at its percentiles; every call in the heatmap."""
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        points = [(int(a), int(b)) for a, b in page["points"][name]]
        assert [start for start, _ in points] == list(windows), name
        for (_, shown), values in zip(points, windows.values(), strict=True):
            exact = lower_quantile(values, q)
            assert abs(shown - exact) <= 0.01 * exact, (name, shown, exact)
    per_window: dict[int, int] = {}
    for start, _, count in page["cells"]:
        per_window[int(start)] = per_window.get(int(start), 0) + int(count)
    assert per_window == {start: v.size for start, v in windows.items()}


def screenshot_check(png: bytes) -> None:
    """Not blank: many colours, none covering nearly everything, the three lines drawn."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=image.width * image.height)
    assert colours is not None
    assert len(colours) >= 50, f"only {len(colours)} colours"
    most = max(count for count, _ in colours)
    assert most < 0.95 * image.width * image.height
    present = {rgb for _, rgb in colours}
    for name, hex_colour in SERIES:
        rgb = tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
        assert rgb in present, f"no {name} line ({hex_colour}) in the screenshot"


@pytest.mark.integration
def test_the_page_in_a_browser_shows_what_query_prints(tmp_path: Path) -> None:
    durations = drawn()
    storage = f"sqlite:///{tmp_path / 'apm.sqlite'}"
    fill(storage, durations)
    expected = query_json(storage)
    check_query_against_truth(expected, durations)
    assert [(e["workload"], e["operation"]) for e in expected] == [
        ("pay", "POST /pay"),
        ("shop", "GET /api/cart/{id}"),
        ("shop", "GET /health"),
        ("shop", "main.(*cart).load"),
    ]

    async def look(base: str) -> None:
        async with HeadlessChromium(tmp_path) as browser:
            for workload, operation in (("shop", "GET /health"), ("shop", "GET /api/cart/{id}")):
                await browser.open(page_url(base, workload=workload, operation=operation))
                page = await browser.evaluate(READ_PAGE)
                check_rows_equal_query(page["rows"], expected)
                assert page["chosen"]["workload"] == workload
                assert page["chosen"]["operation"] == operation
                windows = in_range(durations, workload, operation)
                assert int(page["chosen"]["windows"]) == len(windows)
                check_charts(page, windows)
            (tmp_path / "dashboard.png").write_bytes(png := await browser.screenshot())
            screenshot_check(png)
            # A bad range: the reason on the page, nothing else.
            await browser.open(base + "?since=yesterday")
            problem = await browser.evaluate("document.querySelector('.error').textContent")
            assert "bad time 'yesterday'" in problem
            assert await browser.evaluate("document.querySelectorAll('tr.op').length") == 0

    with dashboard(storage) as (base, _):
        asyncio.run(look(base))
        # Storage gone while it runs: the reason and what to do, answered 503.
        for path in tmp_path.glob("apm.sqlite*"):
            path.unlink()
        status, html = get_page(page_url(base))
        assert status == 503 and "run `ebpf-apm aggregate` to create it" in html
        assert table_rows(html) == []


@pytest.mark.integration
def test_postgres_storage_and_no_password_printed(postgres_url: str) -> None:
    durations = drawn()
    # Trust authentication ignores the password: it is there to be hidden.
    storage = postgres_url.replace("://apm@", "://apm:s3cret-pw@") + "?password=other-secret"
    fill(storage, durations)
    expected = query_json(storage)
    check_query_against_truth(expected, durations)

    with dashboard(storage) as (base, line):
        status, html = get_page(page_url(base))
    assert status == 200
    check_rows_equal_query(table_rows(html), expected)
    for text in (line, html):
        assert "s3cret-pw" not in text and "other-secret" not in text
    assert redact_url(storage) in line and "apm:***@" in line and "password=***" in line


def test_heatmap_holds_every_call_in_its_band() -> None:
    rng = np.random.default_rng(5)
    windows = [rng.lognormal(math.log(m), 1.0, 500 + 37 * i).astype(np.int64)
               for i, m in enumerate((2e4, 3e6, 9e7))]  # fmt: skip
    windows[0][:11] = 0  # zero durations land in the lowest band
    sketches = []
    for values in windows:
        sketch = LatencySketch()
        sketch.add(values)
        sketches.append(sketch)
    heatmap = latency_heatmap(sketches, bands=12)
    edges = np.array(heatmap.edges_ns)
    assert len(edges) - 1 <= 12 and np.all(np.diff(edges) > 0)
    for values, column in zip(windows, heatmap.counts, strict=True):
        truth = [int(np.sum((values > edges[b]) & (values <= edges[b + 1])))
                 for b in range(len(edges) - 1)]  # fmt: skip
        truth[0] += int(np.sum(values == 0))
        assert column == truth and sum(column) == values.size


def test_bad_flags_and_storage_say_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["dashboard", "--listen", "8080"]) == 2
    assert "bad --listen '8080': expected HOST:PORT" in capsys.readouterr().err
    assert cli.main(["dashboard", "--storage", "mysql://u:secret@db/apm"]) == 2
    err = capsys.readouterr().err
    assert "unsupported storage URL 'mysql://u:***@db/apm'" in err and "secret" not in err
    assert cli.main(["dashboard", "--storage", f"sqlite:///{tmp_path / 'none.sqlite'}"]) == 1
    assert "run `ebpf-apm aggregate` to create it" in capsys.readouterr().err
