"""The dashboard's web server: one page, read from storage on every request.

    GET /?since=15m&until=now[&workload=W&operation=OP]
      -> read_rows(storage, range) -> summarise -> the operations table   (range_figures)
                                   -> window_points -> chart and heatmap  (svg_charts)
    GET /healthz -> "ok"

Each request opens the store, reads the range and closes it, so a page always shows what is
stored now, and a storage server that restarts is simply read again by the next request. The
range is spelt as for `ebpf-apm query`; a bad one is answered 400, storage that cannot be read
503 (a stored sketch that cannot be, 500), each with the reason on the page. The chosen
operation defaults to the busiest one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from aiohttp import web

from ebpf_apm.consumers.dashboard_page import Choice, PageView, render
from ebpf_apm.consumers.errors import ConsumerConfigError, ConsumerError
from ebpf_apm.consumers.latency_heatmap import latency_heatmap
from ebpf_apm.consumers.latency_store import LatencyRow, StorageError, redact_url
from ebpf_apm.consumers.range_figures import (
    RangeFigures,
    TimeRange,
    read_rows,
    summarise,
    window_points,
)

log = logging.getLogger(__name__)

DEFAULT_SINCE, DEFAULT_UNTIL = "15m", "now"


def choose(
    rows: list[LatencyRow], results: list[RangeFigures], workload: str | None, operation: str | None
) -> Choice | None:
    """The operation asked for, else the busiest one; with its windows and their heatmap."""
    chosen = next(
        (r for r in results if (r.workload, r.operation) == (workload, operation)),
        max(results, key=lambda r: r.figures["count"], default=None),
    )
    if chosen is None:
        return None
    key = (chosen.workload, chosen.operation)
    points = window_points([r for r in rows if (r.workload, r.operation) == key])
    return Choice(chosen, points, latency_heatmap([p.sketch for p in points]))


class Dashboard:
    def __init__(self, storage_url: str) -> None:
        self.storage_url = storage_url
        self.shown_storage = redact_url(storage_url)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.page)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def page(self, request: web.Request) -> web.Response:
        since = request.query.get("since", DEFAULT_SINCE)
        until = request.query.get("until", DEFAULT_UNTIL)
        blank = PageView(self.shown_storage, since, until, None)
        try:
            span = TimeRange.parse(since, until, time.time_ns())
        except ConsumerConfigError as exc:
            return self._html(replace(blank, problem=str(exc)), 400)
        try:
            rows = await read_rows(self.storage_url, span)
            results = summarise(rows)
            choice = choose(
                rows, results, request.query.get("workload"), request.query.get("operation")
            )
        except ConsumerError as exc:  # storage unreadable (503), or a sketch in it (500)
            log.warning("cannot show %s: %s", request.path_qs, exc)
            status = 503 if isinstance(exc, StorageError) else 500
            return self._html(replace(blank, span=span, problem=str(exc)), status)
        return self._html(replace(blank, span=span, results=results, choice=choice))

    @staticmethod
    def _html(view: PageView, status: int = 200) -> web.Response:
        return web.Response(text=render(view), status=status, content_type="text/html")
