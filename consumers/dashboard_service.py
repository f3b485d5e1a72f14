"""The dashboard's web server: one page, read from storage on every request.

    GET /?since=15m&until=now[&workload=W&operation=OP]
      -> read_rows(storage, range) -> summarise -> the operations table   (range_figures)
                                   -> window_points -> chart and heatmap  (svg_charts)
    GET /trace?id=TRACE_ID&since=15m
      -> read_trace(apm.spans on Kafka, since) -> build_tree -> the trace page  (trace_view)
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

from ebpf_apm.consumers.dashboard_page import Choice, PageView, TraceView, render, render_trace
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
from ebpf_apm.consumers.trace_tree import build_tree, parse_trace_id
from ebpf_apm.consumers.trace_view import read_trace
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.errors import describe_error

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
    def __init__(self, storage_url: str, kafka: KafkaConnection) -> None:
        self.storage_url = storage_url
        self.shown_storage = redact_url(storage_url)
        self.kafka = kafka  # where the trace page reads apm.spans

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.page)
        app.router.add_get("/trace", self.trace)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def trace(self, request: web.Request) -> web.Response:
        """One trace as a tree, read from apm.spans: 400 a bad id or range, 503 Kafka away."""
        typed = request.query.get("id", "")
        since = request.query.get("since", DEFAULT_SINCE)
        view = TraceView(typed, since, str(self.kafka))
        try:
            trace_id = parse_trace_id(typed)
            span = TimeRange.parse(since, DEFAULT_UNTIL, time.time_ns())
        except (ValueError, ConsumerConfigError) as exc:
            return self._trace_html(replace(view, problem=str(exc)), 400)
        try:
            spans = await read_trace(
                self.kafka, trace_id, span.since_ns // 1_000_000, span.until_ns // 1_000_000
            )
        except Exception as exc:  # Kafka away or the topic missing: say so, keep serving
            log.warning("cannot read trace %s: %s", trace_id, exc)
            problem = f"cannot read apm.spans: {describe_error(exc)}"
            return self._trace_html(replace(view, problem=problem), 503)
        return self._trace_html(replace(view, trace_id=trace_id, roots=build_tree(spans)))

    @staticmethod
    def _trace_html(view: TraceView, status: int = 200) -> web.Response:
        return web.Response(text=render_trace(view), status=status, content_type="text/html")

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
