"""One trace's spans as a tree: what `ebpf-apm query --trace` prints and the dashboard's
trace page draws (the spans are read by consumers/trace_view.py).

A span whose parent is not among the trace's spans (not traced, outside the range, or not
yet joined) is a root, marked "parent not found". A replayed span (the join emits at least
once) is shown once. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Span = Mapping[str, Any]

TRACE_ID = re.compile(r"[0-9a-f]{32}")


def parse_trace_id(text: str) -> str:
    """The 32 lowercase hex digits of a W3C trace id; ValueError names what is wrong."""
    trace_id = text.strip().lower()
    if not TRACE_ID.fullmatch(trace_id) or set(trace_id) == {"0"}:
        raise ValueError(
            f"--trace {text!r} is not a trace id: 32 hex digits, not all zero "
            "(as `ebpf-apm tail apm.spans --json` shows them in trace_id)"
        )
    return trace_id


@dataclass
class TraceNode:
    span: Span
    children: list[TraceNode] = field(default_factory=list)
    orphan: bool = False  # has a parent id that is not among the trace's spans


def build_tree(spans: Iterable[Span]) -> list[TraceNode]:
    """The trace's roots, each with its descendants; siblings ordered by start time."""
    nodes: dict[str, TraceNode] = {}
    for span in spans:
        nodes.setdefault(str(span["span_id"]), TraceNode(span))  # a replay: the first copy
    roots: list[TraceNode] = []
    for node in nodes.values():
        parent_id = node.span.get("parent_span_id")
        parent = nodes.get(parent_id) if parent_id else None
        if parent is None or parent is node:
            node.orphan = bool(parent_id)
            roots.append(node)
        else:
            parent.children.append(node)

    def by_start(items: list[TraceNode]) -> None:
        items.sort(key=lambda n: (n.span["start_ns"], str(n.span["span_id"])))
        for item in items:
            by_start(item.children)

    by_start(roots)
    return roots


def span_name(span: Span) -> str:
    """What the span did, in the words of its protocol."""
    if span.get("rpc_method"):
        return f"gRPC {span['rpc_method']} {_grpc_status(span.get('rpc_status'))}"
    if span.get("db_operation") or span.get("db_statement"):
        system = span.get("db_system") or "sql"
        text = span.get("db_statement") or span.get("db_operation")
        return f"{system} {text}"
    if span.get("http_method"):
        host = span.get("http_host")
        target = f"{host}{span.get('http_path') or ''}" if host else span.get("http_path")
        return f"{span['http_method']} {target} {span.get('http_status') or '-'}"
    return str(span.get("func") or "?")


def _grpc_status(code: object) -> str:
    return "-" if code is None else str(code)


def render(roots: list[TraceNode]) -> str:
    """Indented lines: offset from the trace's start, duration, kind, name, process."""
    if not roots:
        return ""
    origin = min(_all_starts(roots))
    lines: list[str] = []

    def walk(node: TraceNode, depth: int) -> None:
        s = node.span
        kind = s.get("span_kind") or "internal"
        where = s.get("k8s_workload") or s.get("exe") or ""
        note = "  (parent not found)" if node.orphan else ""
        lines.append(
            f"{(s['start_ns'] - origin) / 1e6:>10.3f} ms  {s['duration_ns'] / 1e6:>10.3f} ms  "
            f"{'  ' * depth}{kind:<8} {span_name(s)}  [{where} pid {s.get('pid')}]{note}"
        )
        for child in node.children:
            walk(child, depth + 1)

    lines.append(f"{'start':>13}  {'duration':>13}  kind     span")
    for root in roots:
        walk(root, 0)
    return "\n".join(lines)


def as_json(roots: list[TraceNode]) -> list[dict[str, Any]]:
    """Each root as its span's fields plus `children` (the same shape, nested)."""
    return [{**dict(n.span), "children": as_json(n.children)} for n in roots]


def _all_starts(nodes: list[TraceNode]) -> Iterable[int]:
    for node in nodes:
        yield int(node.span["start_ns"])
        yield from _all_starts(node.children)


def walk_with_depth(roots: Sequence[TraceNode], depth: int = 0) -> Iterator[tuple[TraceNode, int]]:
    """Every node, parents before children, with its depth (roots: 0)."""
    for node in roots:
        yield node, depth
        yield from walk_with_depth(node.children, depth + 1)


def walk(roots: Sequence[TraceNode]) -> Iterator[TraceNode]:
    for node, _ in walk_with_depth(roots):
        yield node
