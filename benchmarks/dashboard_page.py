"""Time to serve the dashboard's page, beside `query --json`'s work on the same range.

A SQLite store is filled with --workloads x --operations x 2 status classes series over
--windows windows of 10 s (sketches of lognormal durations). Then, in rounds:

  (a) baseline: what `ebpf-apm query --json` does for the range: read the rows, merge the
      sketches per operation (range_figures.read_rows + summarise), dump the JSON;
  (b) the page: an HTTP GET of the dashboard (aiohttp, in this process, on 127.0.0.1) for
      the same range: the same work, plus the chosen operation's windows, its heatmap and
      the HTML and SVG.

Prints the median of each and their ratio; exit status 1 only if the page fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
from aiohttp import web

from ebpf_apm.consumers.dashboard_service import Dashboard
from ebpf_apm.consumers.latency_sketch import LatencySketch
from ebpf_apm.consumers.latency_store import LatencyRow, open_store
from ebpf_apm.consumers.range_figures import TimeRange, read_rows, summarise
from ebpf_apm.consumers.route_template import SeriesKey
from ebpf_apm.consumers.window_aggregator import ClosedWindow
from ebpf_apm.kafka.connection import KafkaConnection

S = 1_000_000_000
WINDOW = 10 * S


async def fill(url: str, workloads: int, operations: int, windows: int, t0: int) -> int:
    rng = np.random.default_rng(1)
    store = await open_store(url)
    rows = 0
    for w in range(windows):
        batch = []
        for k in range(workloads):
            for o in range(operations):
                for status, calls in (("2xx", 200), ("5xx", 5)):
                    sketch = LatencySketch()
                    median = 1e6 * (1 + o) * (1 + 0.3 * math.sin(w / 5))
                    sketch.add(rng.lognormal(math.log(median), 0.7, calls).astype(np.int64))
                    key = SeriesKey(f"workload-{k}", f"GET /api/route{o}/{{id}}", status)
                    start = t0 + w * WINDOW
                    batch.append(LatencyRow.of(key, ClosedWindow(0, start, start + WINDOW, sketch)))
        await store.write(batch, consumer="bench", window_ns=WINDOW, watermark_ns=0)
        rows += len(batch)
    await store.close()
    return rows


async def bench(args: argparse.Namespace, directory: Path) -> int:
    url = f"sqlite:///{directory / 'bench.sqlite'}"
    t0 = (time.time_ns() // WINDOW - args.windows - 1) * WINDOW
    rows = await fill(url, args.workloads, args.operations, args.windows, t0)
    span = TimeRange(t0, t0 + args.windows * WINDOW)
    since, until = str(span.since_ns // S), str(span.until_ns // S)
    runner = web.AppRunner(Dashboard(url, KafkaConnection("127.0.0.1:9092")).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    page = f"http://127.0.0.1:{port}/?since={since}&until={until}"
    query_s, page_s = [], []
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(args.rounds):
                started = time.perf_counter()
                text = json.dumps([r.as_json(False) for r in summarise(await read_rows(url, span))])
                query_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                async with session.get(page) as answer:
                    html = await answer.text()
                    if answer.status != 200:
                        print(f"the page answered {answer.status}: {html[:500]}")
                        return 1
                page_s.append(time.perf_counter() - started)
    finally:
        await runner.cleanup()
    series = args.workloads * args.operations * 2
    print(f"store: {rows} windows ({series} series x {args.windows} windows of 10 s), SQLite")
    print(f"baseline, query --json's work: {statistics.median(query_s) * 1e3:8.1f} ms "
          f"({len(text) // 1024} KiB of JSON)")  # fmt: skip
    print(f"dashboard page (HTTP GET):     {statistics.median(page_s) * 1e3:8.1f} ms "
          f"({len(html) // 1024} KiB of HTML and SVG)")  # fmt: skip
    print(f"page / query: {statistics.median(page_s) / statistics.median(query_s):.2f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", type=int, default=10)
    parser.add_argument("--operations", type=int, default=10)
    parser.add_argument("--windows", type=int, default=90, help="of 10 s (default: 15 min)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ebpf-apm-dashboard-bench-") as directory:
        return asyncio.run(bench(args, Path(directory)))


if __name__ == "__main__":
    raise SystemExit(main())
