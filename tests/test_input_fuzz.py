"""Hostile input against every decoder: only the documented rejection, bounded memory.

Property-based (hypothesis), derandomized with a fixed number of cases per decoder, so a run
is deterministic and takes a few seconds. Each case starts from a valid message and breaks
it: a field replaced by any msgpack or Avro value, bytes flipped, cut or appended, or bytes
that are no message at all. The decoder must either return something the next stages
process without error, or raise `InputRejected` (its subclasses `BatchDecodeError`,
`AvroDecodeError`); the rules file raises `RulesError`. The largest messages a reader
accepts must decode within a fixed multiple of their size (tracemalloc peak).
"""

from __future__ import annotations

import contextlib
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from join_data import HTTP_FUNC, Net, Span, net_batch, span_batch

from ebpf_apm.consumers.alert_rules import RulesError, parse_rules
from ebpf_apm.consumers.latency_input import read_latency_window
from ebpf_apm.consumers.span_avro import encode_spans
from ebpf_apm.consumers.span_columns import check_span_values, decode_spans, explain_bad_span
from ebpf_apm.consumers.span_joiner import JoinSettings, PartitionJoiner
from ebpf_apm.schemas.avro_codec import codec
from ebpf_apm.schemas.event_batch import (
    MAX_BATCH_EVENTS,
    NET_COLUMNS,
    check_net_times,
    check_span_times,
    decode_net_batch,
    decode_span_batch,
    encode_net_batch,
    encode_span_batch,
)
from ebpf_apm.schemas.input_limits import MAX_MESSAGE_BYTES, InputRejected, TimeBounds

S = 1_000_000_000
NOW = 1_750_000_000 * S
T0 = NOW - 5 * S
BOUNDS = TimeBounds()
CASES = 400
FUZZ = settings(
    max_examples=CASES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Peak Python memory while decoding one message, as a multiple of the largest message a
# reader accepts (4 MiB): the issue measured 73x a 1 MB message of empty maps.
MEMORY_FACTOR = 4

K8S = {"k8s_namespace": "shop", "k8s_pod": "api-1", "k8s_container": "api", "k8s_workload": "api"}
SPANS = [
    Span(HTTP_FUNC, T0, T0 + 900, tid=7, goid=40, http=("GET", "/a/1", 200)),
    Span("main.handle", T0 + 100, T0 + 800, tid=8, goid=40),
]
VALID_SPANS = encode_span_batch(span_batch("node-a", 4242, SPANS, k8s=K8S))
VALID_NET = encode_net_batch(net_batch("node-a", 4242, [Net(T0 + 500, 1200, True, tid=8, goid=40)]))


def _with_flush(value: bytes) -> bytes:
    message = msgpack.unpackb(value)
    message["http"]["flushed_ns"] = np.array([T0 + 950], dtype="<i8").tobytes()
    return msgpack.packb(message, use_bin_type=True)


VALID_SPANS = _with_flush(VALID_SPANS)

# Any value msgpack can carry, nested a little.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=64),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(message: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in message.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out.extend(_paths(value, (*prefix, key)))
    return out


def _replace(message: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    copy = msgpack.unpackb(msgpack.packb(message, use_bin_type=True))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return copy


def _mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """Broken versions of a valid msgpack batch."""
    message = msgpack.unpackb(valid)
    paths = _paths(message)

    def field(data: tuple[int, Any]) -> bytes:
        path = paths[data[0] % len(paths)]
        return msgpack.packb(_replace(message, path, data[1]), use_bin_type=True)

    return st.one_of(
        st.tuples(st.integers(0, 1000), values).map(field),
        _byte_mutations(valid),
        st.binary(max_size=256),
    )


def _byte_mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    def flip(data: tuple[int, int]) -> bytes:
        at = data[0] % len(valid)
        return valid[:at] + bytes([data[1]]) + valid[at + 1 :]

    return st.one_of(
        st.integers(0, len(valid) - 1).map(lambda cut: valid[:cut]),
        st.tuples(st.integers(0, 10_000), st.integers(0, 255)).map(flip),
        st.binary(min_size=1, max_size=64).map(lambda tail: valid + tail),
    )


def _join_and_encode(add: Callable[[PartitionJoiner], None]) -> None:
    """What the join does with an accepted batch: must not fail on anything decoded."""
    joiner = PartitionJoiner(JoinSettings(event_time_at_most_now=True), NOW)
    add(joiner)
    encode_spans(joiner.advance(NOW + 3600 * S))


@FUZZ
@given(_mutations(VALID_SPANS))
def test_span_batch_decoder_only_rejects(value: bytes) -> None:
    try:
        batch = decode_span_batch(value)
        check_span_times(batch, NOW, BOUNDS)
    except InputRejected:
        return
    _join_and_encode(lambda joiner: joiner.add_spans(batch, None, NOW))


@FUZZ
@given(_mutations(VALID_NET))
def test_net_batch_decoder_only_rejects(value: bytes) -> None:
    try:
        batch = decode_net_batch(value)
        check_net_times(batch, NOW, BOUNDS)
    except InputRejected:
        return
    _join_and_encode(lambda joiner: joiner.add_net(batch, NOW))


def test_the_crafted_batches_of_the_issue_are_rejected() -> None:
    """Each of these passed the old checks and then crashed or pinned the join."""
    message = msgpack.unpackb(VALID_SPANS)
    far = np.array([1 << 62, 1 << 62], dtype="<i8").tobytes()
    crafted = {
        "k8s is a list": _replace(message, ("k8s",), ["a", "b"]),
        "integer methods": _replace(message, ("http", "method"), [1]),
        "pid 2**64-1": _replace(message, ("pid",), (1 << 64) - 1),
        "n = inf": _replace(message, ("n",), float("inf")),
        "end near 2**62": _replace(message, ("cols", "end_ns"), far),
        "flushed near 2**62": _replace(
            message, ("http", "flushed_ns"), np.array([1 << 62], "<i8").tobytes()
        ),
    }
    for what, broken in crafted.items():
        with pytest.raises(InputRejected):
            batch = decode_span_batch(msgpack.packb(broken, use_bin_type=True))
            check_span_times(batch, NOW, BOUNDS)
        assert what  # (named for the failure message)


def _valid_span_records() -> list[bytes]:
    joiner = PartitionJoiner(JoinSettings(), NOW)
    joiner.add_spans(span_batch("node-a", 4242, SPANS, k8s=K8S), None, NOW)
    return encode_spans(joiner.advance(NOW + 3600 * S)).values


VALID_SPAN_RECORDS = _valid_span_records()


@FUZZ
@given(st.lists(st.one_of(*(_byte_mutations(v) for v in VALID_SPAN_RECORDS)), max_size=6))
def test_span_record_reader_only_marks_bad_rows(broken: list[bytes]) -> None:
    values = [*VALID_SPAN_RECORDS, *broken]
    columns = decode_spans(values)
    assert not columns.bad[: len(VALID_SPAN_RECORDS)].any()
    reasons = check_span_values(columns, NOW, BOUNDS)
    assert all(row >= len(VALID_SPAN_RECORDS) for row in reasons)
    for row in np.flatnonzero(columns.bad).tolist():
        assert explain_bad_span(values[row])


LATENCY = codec("latency.avsc")
VALID_WINDOW: dict[str, Any] = {
    "series": "shop/api|GET /a/{id}|2xx",
    "workload": "shop/api",
    "operation": "GET /a/{id}",
    "status_class": "2xx",
    "window_start_ns": NOW - 20 * S,
    "window_end_ns": NOW - 10 * S,
    "count": 3,
    "sum": 30,
    "min": 5,
    "max": 15,
    "p50": 10,
    "p90": 15,
    "p95": 15,
    "p99": 15,
    "p999": 15,
    "sketch": b"LSK1",
}
LONGS = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)


def _window_field(data: tuple[int, Any, Any]) -> bytes:
    name = list(VALID_WINDOW)[data[0] % len(VALID_WINDOW)]
    old = VALID_WINDOW[name]
    new = data[1] if isinstance(old, int) else data[2]
    if isinstance(old, bytes):
        new = new.encode()
    return LATENCY.encode({**VALID_WINDOW, name: new})


@FUZZ
@given(
    st.one_of(
        st.tuples(st.integers(0, 100), LONGS, st.text(max_size=40)).map(_window_field),
        _byte_mutations(LATENCY.encode(VALID_WINDOW)),
        st.binary(max_size=128),
    )
)
def test_latency_reader_only_rejects(value: bytes) -> None:
    try:
        window = read_latency_window(value, NOW, BOUNDS)
    except InputRejected:
        return
    assert window["window_start_ns"] < window["window_end_ns"] <= NOW + BOUNDS.max_skew_ns


def test_a_far_future_window_is_rejected() -> None:
    """It would make every later real window look old and mute the alert rules."""
    future = {**VALID_WINDOW, "window_start_ns": NOW + 3600 * S, "window_end_ns": NOW + 3610 * S}
    with pytest.raises(InputRejected, match="in the future"):
        read_latency_window(LATENCY.encode(future), NOW, BOUNDS)
    assert read_latency_window(LATENCY.encode(VALID_WINDOW), NOW, BOUNDS)["count"] == 3


RULE_LINES = [
    "rules:",
    "  - name: slow",
    "    metric: p99",
    "    above: 250ms",
    "    below: 1s",
    "    workload: shop/*",
    "    operation: 'GET /a/*'",
    "    status_class: 5xx",
    "    error_classes: [4xx, 5xx]",
    "    for: 3",
    "    resolve_after: 0",
    "    min_count: -1",
    "    metric: error_rate",
    "    above: 5%",
    "    above: nan",
    "    above: .inf",
    "  - &a {name: x, metric: count, above: 1}",
    "  - *a",
    "  - [1, 2]",
    "    name: {a: b}",
    "    ? [complex]",
    "    : key",
    "!!python/object:os.system x",
    "---",
    "\t",
]


@FUZZ
@given(
    st.one_of(
        st.lists(st.sampled_from(RULE_LINES), max_size=14).map("\n".join),
        st.text(max_size=200),
    )
)
def test_rules_file_reader_only_rejects(text: str) -> None:
    try:
        rules = parse_rules(text)
    except RulesError as exc:
        assert exc.problems
        return
    assert rules and all(rule.name for rule in rules)


# -- memory for the largest messages a reader accepts ----------------------------------------


def _peak(decode: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        with contextlib.suppress(InputRejected):
            decode()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _largest_batches() -> dict[str, bytes]:
    many = ["ab"] * MAX_BATCH_EVENTS
    n = MAX_MESSAGE_BYTES // sum(dtype.itemsize for dtype in NET_COLUMNS.values()) - 100
    assert n < MAX_BATCH_EVENTS
    base = msgpack.unpackb(VALID_SPANS)
    columns = {
        name: np.zeros(n, dtype=dtype).tobytes() for name, dtype in NET_COLUMNS.items()
    }  # fmt: skip
    net = {**msgpack.unpackb(VALID_NET), "n": n, "cols": columns}
    return {
        "empty maps": msgpack.packb([{}] * (MAX_MESSAGE_BYTES - 8)),
        "nested lists": msgpack.packb({"v": 1, "x": [[["ab"] * 1000] * 8] * 8}),
        "short strings": msgpack.packb({**base, "funcs": many, "x": [many] * 5}),
        "largest columns": msgpack.packb(net, use_bin_type=True),
        "too large": bytes(MAX_MESSAGE_BYTES + 1),
    }


@pytest.mark.parametrize("name", list(_largest_batches()))
def test_decoding_the_largest_batches_takes_bounded_memory(name: str) -> None:
    value = _largest_batches()[name]
    assert len(value) <= MAX_MESSAGE_BYTES + 1
    for decode in (decode_span_batch, decode_net_batch):
        peak = _peak(lambda: decode(value))  # noqa: B023 (called at once)
        assert peak < MEMORY_FACTOR * MAX_MESSAGE_BYTES, f"{name}: {peak / 2**20:.1f} MiB"


def test_reading_the_largest_avro_messages_takes_bounded_memory() -> None:
    huge = {**VALID_WINDOW, "series": "x" * (MAX_MESSAGE_BYTES - 200)}
    value = LATENCY.encode(huge)
    peak = _peak(lambda: read_latency_window(value, NOW, BOUNDS))
    assert peak < MEMORY_FACTOR * MAX_MESSAGE_BYTES
    spans = [VALID_SPAN_RECORDS[0]] * (MAX_MESSAGE_BYTES // len(VALID_SPAN_RECORDS[0]))
    tracemalloc.start()
    try:
        decode_spans(spans)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Columns of every field per message: a fixed multiple of the bytes read.
    assert peak < 2 * MEMORY_FACTOR * MAX_MESSAGE_BYTES
