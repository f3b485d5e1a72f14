"""How the command lines spell durations (`10s`, `250ms`, `15m`) and points in time
(`now`, `15m` for 15 minutes ago, `2024-05-01T12:00:00Z`, epoch seconds). Pure: the current
time is an argument."""

from __future__ import annotations

import argparse
import os
import re
from datetime import UTC, datetime, timedelta

from ebpf_apm.schemas.input_limits import DEFAULT_MAX_AGE_NS, DEFAULT_MAX_SKEW_NS, TimeBounds

_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
    "d": 86_400_000_000_000,
}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ns|us|µs|ms|s|m|h|d)?\s*")


def parse_duration_ns(text: str, default_unit: str = "s") -> int:
    """`10s` -> 10_000_000_000; a bare number is in `default_unit`. ValueError if bad."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(
            f"bad duration {text!r}: expected a number and a unit, e.g. 10s, 250ms, 15m, 2h "
            f"(units: {', '.join(_UNITS_NS)})"
        )
    number, unit = match.groups()
    return round(float(number) * _UNITS_NS[unit or default_unit])


def parse_time_ns(text: str, now_ns: int) -> int:
    """`now`, a duration ago (`15m`), an ISO 8601 time (UTC unless it says) or epoch seconds
    with a fraction (`1714564800.5`) -> Unix epoch ns."""
    text = text.strip()
    if text == "now":
        return now_ns
    if _DURATION.fullmatch(text) and not re.fullmatch(r"[\d.]+", text):
        return now_ns - parse_duration_ns(text)
    if re.fullmatch(r"\d{9,}(\.\d*)?", text):
        return round(float(text) * 1e9) if "." in text else int(text) * 1_000_000_000
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"bad time {text!r}: expected now, a duration ago (15m, 2h), an ISO 8601 time "
            "(2024-05-01T12:00:00Z) or Unix epoch seconds"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1_000


def format_duration_ns(ns: int) -> str:
    """10_000_000_000 -> `10s` (for messages)."""
    for unit in ("d", "h", "m", "s", "ms", "us"):
        if ns >= _UNITS_NS[unit] and ns % _UNITS_NS[unit] == 0:
            return f"{ns // _UNITS_NS[unit]}{unit}"
    return f"{ns}ns"


# -- how far from the wall clock input times may be (schemas/input_limits.py) --------------

MAX_EVENT_AGE_ENV = "EBPF_APM_MAX_EVENT_AGE"
MAX_CLOCK_SKEW_ENV = "EBPF_APM_MAX_CLOCK_SKEW"


def add_time_bounds_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-event-age",
        default=os.environ.get(MAX_EVENT_AGE_ENV) or format_duration_ns(DEFAULT_MAX_AGE_NS),
        metavar="DURATION",
        help="input with times older than this is dead-lettered (default: "
        f"${MAX_EVENT_AGE_ENV}, else {format_duration_ns(DEFAULT_MAX_AGE_NS)})",
    )
    parser.add_argument(
        "--max-clock-skew",
        default=os.environ.get(MAX_CLOCK_SKEW_ENV) or format_duration_ns(DEFAULT_MAX_SKEW_NS),
        metavar="DURATION",
        help="input with times further than this in the future is dead-lettered (default: "
        f"${MAX_CLOCK_SKEW_ENV}, else {format_duration_ns(DEFAULT_MAX_SKEW_NS)})",
    )


def time_bounds_from_args(args: argparse.Namespace) -> TimeBounds:
    """The bounds the flags give; ValueError naming the flag for a bad value."""
    values = {}
    for flag, text in (
        ("--max-event-age", args.max_event_age),
        ("--max-clock-skew", args.max_clock_skew),
    ):
        try:
            values[flag] = parse_duration_ns(text)
        except ValueError as exc:
            raise ValueError(f"{flag}: {exc}") from None
    if values["--max-event-age"] <= 0:
        raise ValueError(f"--max-event-age {args.max_event_age}: must be positive")
    return TimeBounds(values["--max-event-age"], values["--max-clock-skew"])
