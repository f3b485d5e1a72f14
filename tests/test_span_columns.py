"""The columnar apm.spans reader against fastavro, on random records and broken messages."""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from ebpf_apm.consumers.span_columns import (
    INT_FIELDS,
    STRING_FIELDS,
    decode_spans,
    explain_bad_span,
)
from ebpf_apm.schemas.avro_codec import codec

SPAN = codec("span.avsc")
INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)


def random_text(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return ""
    if kind == 1:  # past 63 bytes: a two-byte length
        return "x" * rng.randrange(60, 300)
    if kind == 2:
        return "".join(rng.choice("äö€𝄞/é") for _ in range(rng.randrange(1, 12)))
    return "".join(rng.choice("abcdef0123456789/._-{}") for _ in range(rng.randrange(1, 40)))


def random_long(rng: random.Random, bounds: tuple[int, int] = INT64) -> int:
    kind = rng.randrange(5)
    if kind == 0:
        return rng.choice((bounds[0], bounds[1], 0, -1, 1, 63, 64, -64, -65))
    if kind == 1 and bounds == INT64:
        return rng.randrange(1_600_000_000_000_000_000, 1_900_000_000_000_000_000)
    bits = rng.choice((6, 13, 20, 27, 34, 41, 48, 55, 62))
    return max(bounds[0], min(bounds[1], rng.randrange(-(2**bits), 2**bits)))


def random_span(rng: random.Random) -> dict[str, Any]:
    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.4 else value

    return {
        "span_id": f"{rng.getrandbits(128):032x}",
        "node": random_text(rng),
        "pid": random_long(rng, INT32),
        "exe": random_text(rng),
        "tid": random_long(rng, INT32),
        "goid": maybe(random_long(rng)),
        "func": random_text(rng),
        "start_ns": random_long(rng),
        "end_ns": random_long(rng),
        "duration_ns": random_long(rng),
        "http_method": maybe(random_text(rng)),
        "http_path": maybe(random_text(rng)),
        "http_status": maybe(random_long(rng, INT32)),
        "k8s_namespace": maybe(random_text(rng)),
        "k8s_pod": maybe(random_text(rng)),
        "k8s_container": maybe(random_text(rng)),
        "k8s_workload": maybe(random_text(rng)),
        "bytes_sent": random_long(rng),
        "bytes_received": random_long(rng),
        "net_sends": random_long(rng, INT32),
        "net_recvs": random_long(rng, INT32),
        "span_kind": maybe(random_text(rng)),
        "rpc_method": maybe(random_text(rng)),
        "rpc_status": maybe(random_long(rng, INT32)),
        "http_host": maybe(random_text(rng)),
        "db_system": maybe(random_text(rng)),
        "db_operation": maybe(random_text(rng)),
        "db_statement": maybe(random_text(rng)),
        "error": maybe(rng.randrange(2)),  # 0 or 1, as the join writes it
    }


def assert_row_matches(columns: Any, row: int, expected: dict[str, Any]) -> None:
    for field in INT_FIELDS:
        want = expected[field]
        assert columns.ints[field][row] == (-1 if want is None else want), (field, row)
    for field in STRING_FIELDS:
        assert columns.text(field, row) == expected[field], (field, row)


def test_random_records_read_as_fastavro_reads_them() -> None:
    rng = random.Random(4)
    spans = [random_span(rng) for _ in range(3000)]
    values = [SPAN.encode(s) for s in spans]
    for chunk in (values, values[:1], values[1:2]):
        columns = decode_spans(chunk)
        assert not columns.bad.any()
        for row, value in enumerate(chunk):
            assert_row_matches(columns, row, SPAN.decode(value))


def test_broken_messages_are_marked_and_their_neighbours_read() -> None:
    rng = random.Random(9)
    spans = [random_span(rng) for _ in range(8)]
    good = [SPAN.encode(s) for s in spans]
    other_schema = codec("latency.avsc").header + good[0][10:]
    broken: dict[str, bytes | None] = {
        "empty": b"",
        "header only": good[1][:10],
        "truncated": good[2][:-1],
        "one byte more": good[3] + b"\x00",
        "other schema": other_schema,
        "no marker": b"\x00\x01" + good[4][2:],
        "bad union branch": None,
        "overlong varint": None,
    }
    # The dead-letter reason of each: what the aggregator's `reason` header says.
    no_marker = "not Avro single-object encoding (no 0xC3 0x01 marker)"
    versions = [SPAN.fingerprint.hex(), *(f.hex() for f in SPAN.older)]
    reasons = {
        "empty": no_marker,
        "header only": "bad Avro body for span.avsc: EOFError",
        "truncated": "bad Avro body for span.avsc: EOFError",  # the last field is a number
        "one byte more": "1 bytes left over after the span.avsc record",
        "other schema": (
            f"writer schema fingerprint {other_schema[2:10].hex()} is not span.avsc "
            f"(any of its versions: {', '.join(versions)})"
        ),
        "no marker": no_marker,
        "bad union branch": "bad Avro body for span.avsc: IndexError: list index out of range",
        "overlong varint": "bad Avro body for span.avsc: EOFError",
    }
    plain = dict(spans[5], goid=None)
    encoded = SPAN.encode(plain)
    branch = _goid_branch_offset(plain)
    assert encoded[branch] == 0
    broken["bad union branch"] = encoded[:branch] + b"\x04" + encoded[branch + 1 :]
    broken["overlong varint"] = encoded[:branch] + b"\x02" + b"\xff" * 11 + b"\x00"
    values: list[bytes] = []
    expected: list[dict[str, Any] | None] = []
    for i, (_, value) in enumerate(broken.items()):
        assert value is not None
        values += [good[i % len(good)], value]
        expected += [spans[i % len(spans)], None]
    columns = decode_spans(values)
    for row, want in enumerate(expected):
        if want is None:
            name = list(broken)[row // 2]
            assert columns.bad[row], name
            assert explain_bad_span(values[row]) == reasons[name], name
        else:
            assert not columns.bad[row]
            assert_row_matches(columns, row, want)


def _goid_branch_offset(span: dict[str, Any]) -> int:
    """Byte offset of the goid union's branch in span's encoding: the first byte that
    differs between goid null and goid 0."""
    null, zero = SPAN.encode(dict(span, goid=None)), SPAN.encode(dict(span, goid=0))
    return next(i for i, (a, b) in enumerate(zip(null, zero, strict=False)) if a != b)


def test_garbage_never_raises() -> None:
    rng = np.random.default_rng(3)
    header = SPAN.header
    values = [
        header + rng.integers(0, 256, rng.integers(0, 200), dtype=np.uint8).tobytes()
        for _ in range(2000)
    ]
    columns = decode_spans(values)
    for row in np.flatnonzero(~columns.bad).tolist():  # rare accidental valid records
        assert_row_matches(columns, row, SPAN.decode(values[row]))
    assert columns.bad.sum() > 1900


def test_tombstones_are_bad_rows() -> None:
    value = SPAN.encode(random_span(random.Random(1)))
    columns = decode_spans([None, value, None])
    assert columns.bad.tolist() == [True, False, True]
    assert_row_matches(columns, 1, SPAN.decode(value))
