"""The dashboard's two charts as plain SVG text, built on the server (no script, no library):

    latency_chart(points)        p50/p90/p99 of one operation, one point per stored window
    heatmap_chart(points, map)   calls per window and latency band, from the stored sketches

Both share one time axis: a window spans its start to its end. Points carry their figures in
data- attributes and a <title> (the browser's tooltip), so what is drawn can be read back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape

from ebpf_apm.consumers.latency_heatmap import Heatmap
from ebpf_apm.consumers.range_figures import WindowPoint, format_ms

WIDTH, HEIGHT = 900, 250
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 24, 30
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
SERIES = (("p50", "#2b6cb0"), ("p90", "#dd8a1a"), ("p99", "#c53030"))
# Few calls to many: pale yellow, orange, deep red.
HEAT_STOPS = ((255, 237, 160), (253, 141, 60), (189, 0, 38))


def tick_ms(ns: float) -> str:
    """An axis label: 0 ms, 2.5 ms, 150 ms, 0.016 ms."""
    return f"{ns / 1e6:.4g} ms"


def clock(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%H:%M:%S")


def _step(top: float) -> float:
    """A round grid step (1, 2 or 5 times a power of ten) giving about four lines."""
    raw = max(top, 1.0) / 4
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


class TimeAxis:
    def __init__(self, points: Sequence[WindowPoint]) -> None:
        self.start = points[0].start_ns
        self.span = max(points[-1].end_ns - self.start, 1)

    def x(self, ns: int) -> float:
        return LEFT + (ns - self.start) / self.span * PLOT_W

    def labels(self, points: Sequence[WindowPoint]) -> list[str]:
        every = max(1, math.ceil(len(points) / 6))
        return [
            f'<text class="tick" x="{self.x(p.start_ns):.1f}" y="{HEIGHT - 10}" '
            f'text-anchor="middle">{clock(p.start_ns)}</text>'
            for p in points[::every]
        ]


def _svg(kind: str, body: list[str], label: str) -> str:
    return (
        f'<svg class="{kind}" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
        f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(label)}">\n' + "\n".join(body) + "\n</svg>"
    )


def latency_chart(points: Sequence[WindowPoint]) -> str:
    """Lines through one point per window, at the window's middle."""
    axis = TimeAxis(points)
    step = _step(max(p.p99 for p in points))
    top = max(step, math.ceil(max(p.p99 for p in points) / step) * step)

    def y(ns: float) -> float:
        return TOP + PLOT_H * (1 - ns / top)

    body = [f'<rect x="{LEFT}" y="{TOP}" width="{PLOT_W}" height="{PLOT_H}" fill="#fbfbfd"/>']
    for i in range(int(round(top / step)) + 1):
        v = i * step
        body.append(
            f'<line x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
            'stroke="#dde1e6"/>'
            f'<text class="tick" x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end">'
            f"{tick_ms(v)}</text>"
        )
    body += axis.labels(points)
    for n, (name, colour) in enumerate(SERIES):
        xy = [(axis.x((p.start_ns + p.end_ns) // 2), y(getattr(p, name))) for p in points]
        body.append(
            f'<polyline class="line {name}" fill="none" stroke="{colour}" stroke-width="2" '
            f'points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in xy)}"/>'
        )
        body += [
            f'<circle class="point {name}" cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour}" '
            f'data-start-ns="{p.start_ns}" data-ns="{getattr(p, name)}"><title>{name} '
            f"{format_ms(getattr(p, name))} ms, window {clock(p.start_ns)}</title></circle>"
            for p, (a, b) in zip(points, xy, strict=True)
        ]
        body.append(
            f'<rect x="{LEFT + 10 + 80 * n}" y="6" width="14" height="4" fill="{colour}"/>'
            f'<text class="legend" x="{LEFT + 28 + 80 * n}" y="12">{name}</text>'
        )
    return _svg("latency-chart", body, "p50, p90 and p99 per window")


def heat_colour(count: int, most: int) -> str:
    """Log scale, so one busy band does not wash out the rest."""
    t = math.log1p(count) / math.log1p(most) if most > 0 else 0.0
    low, high = (HEAT_STOPS[0], HEAT_STOPS[1]) if t < 0.5 else (HEAT_STOPS[1], HEAT_STOPS[2])
    f = t * 2 if t < 0.5 else t * 2 - 1
    r, g, b = (round(a + (z - a) * f) for a, z in zip(low, high, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap_chart(points: Sequence[WindowPoint], heatmap: Heatmap) -> str:
    """A column per window, a row per latency band (fastest at the bottom)."""
    axis = TimeAxis(points)
    bands = len(heatmap.edges_ns) - 1
    row_h = PLOT_H / bands
    body = [f'<rect x="{LEFT}" y="{TOP}" width="{PLOT_W}" height="{PLOT_H}" fill="#fbfbfd"/>']
    label_every = max(1, math.ceil(bands / 6))
    for b in range(0, bands + 1, label_every):
        yb = TOP + PLOT_H - b * row_h
        body.append(
            f'<text class="tick" x="{LEFT - 6}" y="{yb + 4:.1f}" text-anchor="end">'
            f"{tick_ms(heatmap.edges_ns[b])}</text>"
        )
    body += axis.labels(points)
    most = heatmap.most
    for p, column in zip(points, heatmap.counts, strict=True):
        x0, x1 = axis.x(p.start_ns), axis.x(p.end_ns)
        for b, count in enumerate(column):
            if count == 0:
                continue
            low, high = heatmap.edges_ns[b], heatmap.edges_ns[b + 1]
            body.append(
                f'<rect class="cell" x="{x0:.1f}" y="{TOP + PLOT_H - (b + 1) * row_h:.1f}" '
                f'width="{max(x1 - x0 - 1, 1):.1f}" height="{max(row_h - 1, 1):.1f}" '
                f'fill="{heat_colour(count, most)}" data-start-ns="{p.start_ns}" '
                f'data-band="{b}" data-count="{count}"><title>{count} calls of '
                f"{format_ms(round(low))}-{format_ms(round(high))} ms, window "
                f"{clock(p.start_ns)}</title></rect>"
            )
    return _svg("latency-heatmap", body, "calls per window and latency band")
