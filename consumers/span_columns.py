"""apm.spans messages -> numpy columns, many messages per call (no Python work per span).

Decoding each single-object Avro message with fastavro costs ~10 us, 20x the aggregator's
budget per span. Every message of the topic has the same writer schema (the fingerprint
says so), so this reader walks the fields of all messages together: one varint or string
step moves the read position of every message at once. The plan of steps is derived from
schemas/span.avsc at import, so the reader cannot drift from the contract; a schema change
it cannot read (a new kind of field) fails at import with the field named.
tests/test_span_columns.py checks it against fastavro on random records.

A message the reader cannot read (wrong header or fingerprint, truncated, bad union index,
bytes left over) is marked in `SpanColumns.bad`; the caller decodes it with fastavro for
the error message and sends it to the dead-letter topic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from ebpf_apm.schemas.avro_codec import HEADER_SIZE, AvroDecodeError, codec
from ebpf_apm.schemas.event_batch import MAX_NAME_LEN, MAX_STRING_BYTES
from ebpf_apm.schemas.input_limits import MAX_MESSAGE_BYTES, TimeBounds

# Zero bytes after the last message. A read position is brought back into its message at
# each string field; in between, each number field may read up to 20 bytes past it.
_PAD = 128
_PADDING = bytes(_PAD)


def _header_words(header: bytes) -> tuple[np.uint64, np.uint64]:
    """The 10-byte single-object header as a word and the two bytes after it."""
    word, tail = np.frombuffer(header + bytes(6), dtype="<u8")
    return word, tail


#: (header word, header tail, schema version) of every version a record may be written in:
#: older records lack the fields added since (their "since" in span.avsc), read as null.
_HEADERS = [(*_header_words(codec("span.avsc").header), 0)] + [
    (*_header_words(b"\xc3\x01" + fingerprint), version)
    for fingerprint, (version, _) in codec("span.avsc").older.items()
]

# Fields the aggregator reads; the others are stepped over.
INT_FIELDS = ("end_ns", "duration_ns", "http_status", "rpc_status", "error")
STRING_FIELDS = (
    "exe", "func", "http_method", "http_path", "k8s_namespace", "k8s_workload", "rpc_method",
    "http_host", "db_operation", "db_statement",
)  # fmt: skip

_KINDS = {"string": "string", "long": "varint", "int": "varint"}


def _plan() -> list[tuple[str, str, bool, int]]:
    """(field, "string" | "varint", nullable, since) for each field of span.avsc, in order."""
    plan: list[tuple[str, str, bool, int]] = []
    schema = cast(dict[str, Any], codec("span.avsc").schema)
    for field in schema["fields"]:
        ftype = field["type"]
        nullable = isinstance(ftype, list)
        if nullable:
            if len(ftype) != 2 or ftype[0] != "null":
                raise ImportError(f"span.avsc field {field['name']!r}: unsupported union {ftype}")
            ftype = ftype[1]
        if not isinstance(ftype, str) or ftype not in _KINDS:
            raise ImportError(
                f"span.avsc field {field['name']!r} has type {ftype!r}, which "
                "consumers/span_columns.py cannot read; teach it the type"
            )
        since = int(field.get("since", 1))
        if since > 1 and not nullable:
            raise ImportError(f"span.avsc field {field['name']!r}: an added field must be optional")
        plan.append((field["name"], _KINDS[ftype], nullable, since))
    run = longest = 0
    for _, kind, _, _ in plan:
        run = 0 if kind == "string" else run + 1
        longest = max(longest, run)
    if 20 * longest + 16 > _PAD:
        raise ImportError(f"span.avsc has {longest} numbers in a row: raise _PAD in span_columns")
    names = {name for name, _, _, _ in plan}
    missing = [f for f in (*INT_FIELDS, *STRING_FIELDS) if f not in names]
    if missing:
        raise ImportError(f"span.avsc lacks fields the aggregator reads: {missing}")
    return plan


PLAN = _plan()


@dataclass
class SpanColumns:
    """Columns of n messages. Rows with bad=True hold garbage; callers must mask them."""

    n: int
    bad: np.ndarray  # bool
    ints: dict[str, np.ndarray]  # int64; a null is -1
    starts: dict[str, np.ndarray]  # int64 offset of each string's bytes in buf
    lengths: dict[str, np.ndarray]  # int64 byte length; -1 for null
    buf: np.ndarray  # uint8: all messages, back to back, then zero padding

    def text(self, field: str, row: int) -> str | None:
        """One string field of one row, decoded (UTF-8 errors replaced)."""
        length = int(self.lengths[field][row])
        if length < 0:
            return None
        start = int(self.starts[field][row])
        return self.buf[start : start + length].tobytes().decode("utf-8", "replace")


_U1 = np.uint64(1)
_U7, _U8, _U56 = np.uint64(7), np.uint64(8), np.uint64(56)
_BYTE_SUM = np.uint64(0x0101010101010101)
_TERMINATORS = np.uint64(0x8080808080808080)
# Three steps that squeeze the 7-bit groups of eight little-endian varint bytes together.
_SQUEEZE = [
    (np.uint64(0x7F007F007F007F00), np.uint64(0x007F007F007F007F), np.uint64(1)),
    (np.uint64(0x3FFF00003FFF0000), np.uint64(0x00003FFF00003FFF), np.uint64(2)),
    (np.uint64(0x0FFFFFFF00000000), np.uint64(0x000000000FFFFFFF), np.uint64(4)),
]


def _words(buf: np.ndarray) -> np.ndarray:
    """An unaligned view: words[i] is the little-endian uint64 of buf[i:i+8]."""
    return np.ndarray(shape=(buf.size - 7,), dtype="<u8", buffer=buf, strides=(1,))


def _varints(
    buf: np.ndarray,
    words: np.ndarray,
    pos: np.ndarray,
    bad: np.ndarray,
    present: np.ndarray | None = None,
    *,
    want: bool = True,
) -> np.ndarray | None:
    """The zigzag varint at each pos (int64; None unless `want`), and pos moved past it.

    Rows where `present` is False read nothing (0, pos unchanged). Varints longer than ten
    bytes mark their rows bad.
    """
    first = np.take(buf, pos)
    raw: np.ndarray | None = None
    if not (first & 0x80).any():  # the usual case for lengths, union branches, small ints
        if want:
            raw = first.astype(np.uint64)
        pos += 1 if present is None else present
    else:
        x = words[pos]
        ends = ~x & _TERMINATORS
        low = ends & (~ends + _U1)  # the lowest terminator bit; 0 if none in eight bytes
        if want:
            x &= (low << _U1) - _U1  # only this varint's bytes
            for high, rest, shift in _SQUEEZE:
                x = ((x & high) >> shift) | (x & rest)
            raw = x
        # Continuation bits below the terminator, summed bytewise by one multiplication.
        continued = (((low - _U1) & _TERMINATORS) >> _U7) * _BYTE_SUM >> _U56
        nbytes = continued.astype(np.int64) + 1
        nine = low == 0
        if nine.any():  # nine or ten bytes: full 64-bit values (all rows, for timestamps)
            longer: slice | np.ndarray = slice(None) if nine.all() else np.flatnonzero(nine)
            tail = words[pos[longer] + 8]
            ninth = tail & np.uint64(0xFF)
            more = (ninth & np.uint64(0x80)) != 0
            tenth = (tail >> _U8) & np.uint64(0xFF)
            overlong = more & (tenth > 1)
            if overlong.any():
                bad[np.arange(pos.size)[longer][overlong]] = True
            if raw is not None:
                raw[longer] |= (ninth & np.uint64(0x7F)) << _U56
                raw[longer] |= (tenth & _U1 & -more.astype(np.uint64)) << np.uint64(63)
            nbytes[longer] = 9 + more
        pos += nbytes if present is None else np.where(present, nbytes, 0)
    if raw is None:
        return None
    if present is not None:
        raw = np.where(present, raw, np.uint64(0))
    return (raw >> _U1).astype(np.int64) ^ -(raw & _U1).astype(np.int64)


def decode_spans(values: Sequence[bytes | None]) -> SpanColumns:
    """Read many apm.spans message values at once (None, a tombstone, is a bad row)."""
    data: Sequence[bytes] = (
        [v or b"" for v in values] if None in values else cast(Sequence[bytes], values)
    )
    n = len(data)
    sizes = np.fromiter(map(len, data), dtype=np.int64, count=n)
    ends = np.cumsum(sizes)
    return decode_slices(padded(b"".join(data)), ends - sizes, sizes)


def padded(data: bytes) -> np.ndarray:
    """data, then the zero padding decode_slices reads past the last record, as uint8."""
    return np.frombuffer(data + _PADDING, dtype=np.uint8)  # read-only


def decode_slices(buf: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> SpanColumns:
    """Read the records at buf[starts[i]:starts[i] + sizes[i]] (buf from `padded`; a size
    below 0 is a bad row): the spans of apm.span.batches messages, not copied apart."""
    n = len(starts)
    missing = sizes < 0
    sizes = np.where(missing, 0, sizes)
    ends = starts + sizes
    words = _words(buf)
    bad = (sizes < HEADER_SIZE) | (sizes > MAX_MESSAGE_BYTES)
    first, tail = words[starts], words[starts + 8] & np.uint64(0xFFFF)
    version = np.full(n, -1, dtype=np.int64)  # 0: the newest schema
    for word, tail_word, v in _HEADERS:
        version[(first == word) & (tail == tail_word)] = v
    bad |= (version < 0) | missing
    older = version > 0
    pos = starts + HEADER_SIZE

    ints: dict[str, np.ndarray] = {}
    str_starts: dict[str, np.ndarray] = {}
    str_lengths: dict[str, np.ndarray] = {}
    for name, kind, nullable, since in PLAN:
        present: np.ndarray | None = None
        if nullable:  # the union's branch: one byte, 0 (null) or 2 (zigzag 1)
            branch = np.take(buf, pos)
            there = ~(older & (version < since)) if since > 1 and older.any() else None
            if there is None:
                bad |= (branch != 0) & (branch != 2)
                present = branch == 2
                pos += 1
            else:  # records of an older version end before this field: null, nothing read
                bad |= there & (branch != 0) & (branch != 2)
                present = there & (branch == 2)
                pos += there
        if kind == "varint":
            value = _varints(buf, words, pos, bad, present, want=name in INT_FIELDS)
            if value is not None:
                ints[name] = value if present is None else np.where(present, value, -1)
            continue
        value = _varints(buf, words, pos, bad, present)
        assert value is not None
        # Also catches number fields that ran past the message: then ends - pos < 0.
        wrong = (value < 0) | (value > ends - pos)
        if wrong.any():
            bad |= wrong
            value[wrong] = 0
            np.minimum(pos, ends, out=pos)
        if name in STRING_FIELDS:
            str_starts[name] = pos.copy()
            str_lengths[name] = value if present is None else np.where(present, value, -1)
        pos += value
    bad |= pos != ends
    if bad.any():  # keep garbage rows harmless for callers that index by them
        for column in str_lengths.values():
            column[bad] = -1
    return SpanColumns(n, bad, ints, str_starts, str_lengths, buf)


def explain_bad_span(value: bytes) -> str:
    """Why a message decode_spans marked bad cannot be read (for the dead-letter reason)."""
    span_codec = codec("span.avsc")
    if len(value) > MAX_MESSAGE_BYTES:
        return f"{len(value)} bytes, more than the limit of {MAX_MESSAGE_BYTES}"
    try:
        record = span_codec.decode(value)
    except AvroDecodeError as exc:
        return str(exc)
    extra = len(value) - len(span_codec.encode(record))
    if extra > 0:
        return f"{extra} bytes left over after the span.avsc record"
    return "fastavro reads this message but the columnar reader did not: a bug, please report it"


# What the aggregator rejects of a readable apm.spans record (schemas/span.avsc documents
# the fields; the limits are the event batches', which the join copies into spans).
_STRING_LIMITS = {  # UTF-8 bytes
    "exe": 4 * MAX_NAME_LEN,
    "func": 4 * MAX_NAME_LEN,
    "http_method": MAX_STRING_BYTES,
    "http_path": MAX_STRING_BYTES,
    "k8s_namespace": 4 * MAX_NAME_LEN,
    "k8s_workload": 4 * MAX_NAME_LEN,
}


def check_span_values(columns: SpanColumns, now_ns: int, bounds: TimeBounds) -> dict[int, str]:
    """Rows (not already bad) whose values are out of range -> the reason, in numpy over all
    rows; times outside the bounds around the reader's clock `now_ns` too."""
    good = ~columns.bad
    end, duration = columns.ints["end_ns"], columns.ints["duration_ns"]
    status = columns.ints["http_status"]
    checks = [
        (duration < 0, "negative duration_ns"),
        (end - duration < 0, "span starts before the Unix epoch (end_ns - duration_ns < 0)"),
        (end < now_ns - bounds.max_age_ns,
         f"end_ns older than the maximum age {bounds.max_age_ns // 1_000_000_000} s "
         "(--max-event-age)"),
        (end > now_ns + bounds.max_skew_ns,
         f"end_ns more than the allowed clock skew {bounds.max_skew_ns // 1_000_000_000} s "
         "ahead (--max-clock-skew)"),
        ((status != -1) & (status != 0) & ((status < 100) | (status > 599)),
         "http_status outside 100..599 (0 or null for unknown)"),
    ]  # fmt: skip
    for name, limit in _STRING_LIMITS.items():
        checks.append((columns.lengths[name] > limit, f"{name} longer than {limit} bytes"))
    reasons: dict[int, str] = {}
    for wrong, reason in checks:
        for row in np.flatnonzero(wrong & good).tolist():
            reasons.setdefault(row, f"span record: {reason}")
    return reasons
