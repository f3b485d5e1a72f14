"""The dashboard's one page as HTML text: the range form, a table of operations per workload,
and for the chosen operation its p50/p90/p99 chart and latency heatmap (consumers/svg_charts).

Every figure in a table row is also in the row's data- attributes, unformatted, exactly as
`ebpf-apm query --json` prints it; every name is escaped. No script runs on the page.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from urllib.parse import urlencode

from ebpf_apm.consumers.latency_heatmap import Heatmap
from ebpf_apm.consumers.range_figures import RangeFigures, TimeRange, WindowPoint, format_ms
from ebpf_apm.consumers.svg_charts import heatmap_chart, latency_chart
from ebpf_apm.consumers.trace_tree import TraceNode, span_name, walk, walk_with_depth

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 24px 24px; color: #1a202c;
       background: #ffffff; }
header { display: flex; align-items: baseline; gap: 24px; flex-wrap: wrap;
         border-bottom: 3px solid #2b6cb0; padding: 12px 0; margin-bottom: 8px; }
h1 { font-size: 20px; margin: 0; color: #2b6cb0; }
h2 { font-size: 16px; margin: 20px 0 6px; }
form input { width: 11em; }
.storage, .note, .range { color: #4a5568; }
.trace td.span { white-space: nowrap; }
.trace td.bar { width: 480px; padding: 4px 0; }
.trace .bar div { height: 12px; background: #2b6cb0; min-width: 1px; }
.trace tr.client .bar div { background: #d69e2e; }
.trace tr.internal .bar div { background: #718096; }
.error { background: #fff5f5; border: 1px solid #c53030; color: #9b2c2c; padding: 8px 12px; }
table { border-collapse: collapse; min-width: 900px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e2e8f0; text-align: right; }
th { background: #edf2f7; }
th:first-child, td:first-child { text-align: left; }
tr.chosen td { background: #ebf4ff; }
td.errors.some { color: #c53030; font-weight: 600; }
a { color: #2b6cb0; text-decoration: none; }
svg text { font: 11px system-ui, sans-serif; fill: #4a5568; }
"""


@dataclass(frozen=True)
class Choice:
    """The operation whose charts the page shows, and its stored windows."""

    figures: RangeFigures
    points: Sequence[WindowPoint]
    heatmap: Heatmap


@dataclass(frozen=True)
class PageView:
    storage: str  # redacted
    since: str  # as typed
    until: str
    span: TimeRange | None  # None when the range could not be read
    results: Sequence[RangeFigures] = ()
    choice: Choice | None = None
    problem: str | None = None


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _link(view: PageView, r: RangeFigures) -> str:
    query = {"since": view.since, "until": view.until, "workload": r.workload}
    query["operation"] = r.operation
    return "?" + urlencode(query)


def _share(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.1f}%"


def _row(view: PageView, r: RangeFigures) -> str:
    f = r.figures
    chosen = view.choice is not None and view.choice.figures == r
    data = {
        "workload": r.workload,
        "operation": r.operation,
        **{k: str(f[k]) for k in ("count", "p50", "p90", "p99")},
        "rate-per-s": repr(r.rate_per_s),
        "errors": "" if r.errors is None else str(r.errors),
        "error-share": "" if r.error_share is None else repr(r.error_share),
    }
    attrs = " ".join(f'data-{k}="{escape(v)}"' for k, v in data.items())
    some = " some" if r.errors else ""
    cells = [
        f'<td class="operation"><a href="{escape(_link(view, r))}">{escape(r.operation)}</a></td>',
        f'<td class="rate">{r.rate_per_s:.2f}/s</td>',
        f'<td class="errors{some}">{_share(r.error_share)}</td>',
        f'<td class="count">{f["count"]}</td>',
        *(f'<td class="{k}">{format_ms(f[k])}</td>' for k in ("p50", "p90", "p99")),
    ]
    return f'<tr class="op{" chosen" if chosen else ""}" {attrs}>{"".join(cells)}</tr>'


def _tables(view: PageView) -> list[str]:
    if not view.results:
        return ['<p class="note">no stored windows in this range</p>']
    head = (
        "<tr><th>operation</th><th>rate</th><th>errors (5xx)</th><th>count</th>"
        "<th>p50 ms</th><th>p90 ms</th><th>p99 ms</th></tr>"
    )
    out = []
    workloads = sorted({r.workload for r in view.results})
    for workload in workloads:
        rows = [_row(view, r) for r in view.results if r.workload == workload]
        out.append(
            f'<section class="workload" data-workload="{escape(workload)}">'
            f"<h2>{escape(workload)}</h2><table>{head}{''.join(rows)}</table></section>"
        )
    return out


def _charts(choice: Choice) -> list[str]:
    r = choice.figures
    name = f"{escape(r.workload)} / {escape(r.operation)}"
    return [
        f'<section class="chosen-operation" data-workload="{escape(r.workload)}" '
        f'data-operation="{escape(r.operation)}" data-windows="{len(choice.points)}">',
        f"<h2>{name}: p50, p90, p99 per window ({len(choice.points)} windows)</h2>",
        latency_chart(choice.points),
        f"<h2>{name}: calls per window and latency</h2>",
        heatmap_chart(choice.points, choice.heatmap),
        "</section>",
    ]


def render(view: PageView) -> str:
    range_text = f"{_when(view.span.since_ns)} to {_when(view.span.until_ns)}" if view.span else ""
    form = (
        f'<form method="get">since <input name="since" value="{escape(view.since)}"> until '
        f'<input name="until" value="{escape(view.until)}"> <button>show</button></form>'
    )
    trace_form = (
        '<form method="get" action="trace">trace <input name="id" placeholder="trace id" '
        f'size="32"><input type="hidden" name="since" value="{escape(view.since)}"> '
        "<button>show</button></form>"
    )
    body = [
        f"<header><h1>ebpf-apm</h1>{form}{trace_form}<span class='range'>{range_text}</span>"
        f"<span class='storage'>{escape(view.storage)}</span></header>",
    ]
    if view.problem:
        body.append(f'<p class="error">{escape(view.problem)}</p>')
    if view.span is not None and not view.problem:
        body += _tables(view)
        if view.choice is not None:
            body += _charts(view.choice)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>ebpf-apm dashboard</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


@dataclass(frozen=True)
class TraceView:
    """One trace's spans as a tree (consumers/trace_view.py), or why it cannot be shown."""

    trace_id: str  # as typed
    since: str
    kafka: str  # where the spans were read
    roots: Sequence[TraceNode] = ()
    problem: str | None = None


def _trace_rows(roots: Sequence[TraceNode]) -> list[str]:
    starts = [n.span["start_ns"] for n in walk(roots)]
    ends = [n.span["end_ns"] for n in walk(roots)]
    origin, total = min(starts), max(max(ends) - min(starts), 1)
    rows = []
    for node, depth in walk_with_depth(roots):
        s = node.span
        kind = s.get("span_kind") or "internal"
        left = (s["start_ns"] - origin) / total * 100
        width = max(s["duration_ns"] / total * 100, 0.1)
        note = " (parent not found)" if node.orphan else ""
        data = {
            "span-id": s["span_id"],
            "parent-span-id": s.get("parent_span_id") or "",
            "kind": kind,
            "start-ns": s["start_ns"],
            "duration-ns": s["duration_ns"],
        }
        attrs = " ".join(f'data-{k}="{escape(str(v))}"' for k, v in data.items())
        rows.append(
            f'<tr class="span {escape(kind)}" {attrs}>'
            f'<td class="offset">{(s["start_ns"] - origin) / 1e6:.3f}</td>'
            f'<td class="duration">{s["duration_ns"] / 1e6:.3f}</td>'
            f'<td class="span" style="padding-left:{10 + 18 * depth}px">{escape(kind)} '
            f"<b>{escape(span_name(s))}</b>{escape(note)}</td>"
            f'<td class="where">{escape(str(s.get("k8s_workload") or s.get("exe") or ""))} '
            f"{escape(str(s.get('pid')))}</td>"
            f'<td class="bar"><div style="margin-left:{left:.3f}%;width:{width:.3f}%"></div></td>'
            "</tr>"
        )
    return rows


def render_trace(view: TraceView) -> str:
    """The trace page: each span a row, nested by parent, with a bar on the trace's time."""
    back = '<a href="./">operations</a>'
    body = [f"<header><h1>ebpf-apm</h1>{back}<span class='storage'>trace "
            f"{escape(view.trace_id)} from {escape(view.kafka)}</span></header>"]  # fmt: skip
    if view.problem:
        body.append(f'<p class="error">{escape(view.problem)}</p>')
    elif not view.roots:
        body.append(f'<p class="note">no span of this trace in apm.spans since '
                    f"{escape(view.since)}</p>")  # fmt: skip
    else:
        head = ("<tr><th>start ms</th><th>duration ms</th><th>span</th><th>process</th>"
                "<th>time</th></tr>")  # fmt: skip
        rows = "".join(_trace_rows(view.roots))
        body.append(f'<table class="trace" data-trace-id="{escape(view.trace_id)}">'
                    f"{head}{rows}</table>")  # fmt: skip
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>trace {escape(view.trace_id)}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
