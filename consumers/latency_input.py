"""What the alert service reads of an apm.latency message: a checked window, or the reason.

One place for the apm.latency reader: the Avro decode (schemas/avro_codec.py), then the
values an alert rule relies on. A window from the far future would make every later real
window look old to the alert engine and mute its rules, so its times must lie within the
`TimeBounds` of the reader's clock. Everything rejected raises `InputRejected`.
"""

from __future__ import annotations

from typing import Any

from ebpf_apm.consumers.alert_rules import STATUS_CLASSES
from ebpf_apm.schemas.avro_codec import codec
from ebpf_apm.schemas.event_batch import MAX_NAME_LEN, MAX_STRING_BYTES
from ebpf_apm.schemas.input_limits import InputRejected, TimeBounds

MAX_WINDOW_NS = 24 * 3600 * 1_000_000_000
# series = workload|operation|status; operation = method and route.
MAX_SERIES_LEN = 3 * (2 * MAX_NAME_LEN + MAX_STRING_BYTES)
_QUANTILES = ("min", "p50", "p90", "p95", "p99", "p999", "max")


def read_latency_window(value: bytes | None, now_ns: int, bounds: TimeBounds) -> dict[str, Any]:
    """The checked window of a message value; InputRejected says why not."""
    if value is None:
        raise InputRejected("empty message (no value)")
    window = codec("latency.avsc").decode(value)
    for name, limit in (
        ("series", MAX_SERIES_LEN),
        ("workload", MAX_NAME_LEN * 2),
        ("operation", MAX_NAME_LEN + MAX_STRING_BYTES),
    ):
        if len(window[name]) > limit:
            raise InputRejected(f"{name} longer than {limit} characters")
    status = window["status_class"]
    if status is not None and status not in STATUS_CLASSES:
        raise InputRejected(
            f"status_class {status[:20]!r} is not one of {', '.join(STATUS_CLASSES)}"
        )
    start, end = window["window_start_ns"], window["window_end_ns"]
    if not 0 < end - start <= MAX_WINDOW_NS:
        raise InputRejected(
            f"window [{start}, {end}) is empty or longer than {MAX_WINDOW_NS // 10**9} s"
        )
    bounds.check(start, end, now_ns, "window time")
    if window["count"] < 1 or window["sum"] < 0:
        raise InputRejected(f"count {window['count']} / sum {window['sum']}: not a window of spans")
    durations = [window[q] for q in _QUANTILES]
    if durations[0] < 0 or durations != sorted(durations):
        raise InputRejected(
            "durations out of order: min <= p50 <= p90 <= p95 <= p99 <= p999 <= max must hold"
        )
    return window
