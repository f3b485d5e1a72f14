"""`ebpf-apm tail TOPIC`: print what is flowing on a topic, one line per event.

No consumer group: all partitions are assigned directly, so tailing never moves a real
consumer's offsets and needs no group coordinator. Each topic has a decoder (Kafka message
value -> dicts, one per event) and a one-line formatter in `TOPICS`; a new topic plugs in
with one entry there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from ebpf_apm import runner
from ebpf_apm.consumers.errors import ConsumerConfigError
from ebpf_apm.consumers.kafka_io import TopicReader
from ebpf_apm.kafka import topics
from ebpf_apm.kafka.connection import add_connection_arguments, connection_from_args
from ebpf_apm.kafka.errors import describe_error
from ebpf_apm.schemas.avro_codec import codec
from ebpf_apm.schemas.event_batch import (
    decode_net_batch,
    decode_span_batch,
    iter_events,
    iter_net_events,
)

Event = dict[str, Any]
# value -> events. Raise ValueError (e.g. BatchDecodeError) for a value it cannot read.
Decoder = Callable[[bytes], Iterator[Event]]
# (event, Kafka timestamp in ms) -> one readable line.
LineFormatter = Callable[[Event, int], str]


def _clock(timestamp_ms: int) -> str:
    # Span times are CLOCK_BOOTTIME; the record's timestamp (set by the agent when it
    # published the batch) is the wall-clock time a reader can relate to.
    if timestamp_ms < 0:
        return "--:--:--.---"
    return datetime.fromtimestamp(timestamp_ms / 1000).strftime("%H:%M:%S.%f")[:-3]


def _duration(ns: int) -> str:
    if ns < 1_000_000:
        return f"{ns / 1e3:.1f} µs"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.1f} ms"
    return f"{ns / 1e9:.2f} s"


def generic_line(event: Event, timestamp_ms: int) -> str:
    fields = " ".join(f"{k}={v}" for k, v in event.items() if v is not None)
    return f"{_clock(timestamp_ms)} {fields}"


def span_line(event: Event, timestamp_ms: int) -> str:
    """`12:00:01.123 node/pid  main.(*server).handleSleep  53.2 ms  GET /sleep 200`."""
    parts = [
        f"{_clock(timestamp_ms)} {event['node']}/{event['pid']}",
        str(event["func"]),
        _duration(int(event["duration_ns"])),
    ]
    if event.get("http_method") is not None:
        parts.append(f"{event['http_method']} {event['http_path']} {event['http_status']}")
    if event.get("k8s_pod"):
        parts.append(f"[{event.get('k8s_namespace') or '-'}/{event['k8s_pod']}]")
    return "  ".join(parts)


def _uprobe_events(value: bytes) -> Iterator[Event]:
    return iter_events(decode_span_batch(value))


def _kprobe_events(value: bytes) -> Iterator[Event]:
    return iter_net_events(decode_net_batch(value))


def _joined_spans(value: bytes) -> Iterator[Event]:
    yield codec("span.avsc").decode(value)  # AvroDecodeError is a ValueError


@dataclass(frozen=True)
class TopicFormat:
    decode: Decoder
    line: LineFormatter = generic_line


# Topic name -> how to read it; a new topic plugs in with one entry here.
TOPICS: dict[str, TopicFormat] = {
    topics.SPAN_EVENTS: TopicFormat(_uprobe_events, span_line),
    topics.NET_EVENTS: TopicFormat(_kprobe_events),
    topics.SPANS: TopicFormat(_joined_spans, span_line),
    topics.LATENCY: TopicFormat(  # the sketch shown as hex
        lambda value: iter(
            [
                {
                    k: v.hex() if isinstance(v, bytes) else v
                    for k, v in codec("latency.avsc").decode(value).items()
                }
            ]
        )
    ),
    topics.ALERTS: TopicFormat(lambda value: iter([codec("alert.avsc").decode(value)])),
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topic", metavar="TOPIC", help=f"one of: {', '.join(sorted(TOPICS))}")
    parser.add_argument(
        "--from-beginning",
        action="store_true",
        help="start at the oldest retained message (default: only new messages)",
    )
    parser.add_argument(
        "--max", type=_positive_int, metavar="N", help="exit after printing N events"
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="S",
        help="exit once no message arrived for S seconds (default: run until Ctrl-C)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per event")
    add_connection_arguments(parser)


class _Printer:
    def __init__(self, fmt: TopicFormat, as_json: bool, out: TextIO) -> None:
        self._fmt = fmt
        self._json = as_json
        self._out = out

    def event(self, event: Event, timestamp_ms: int) -> None:
        if self._json:
            line = json.dumps(event, ensure_ascii=False, default=str)
        else:
            line = self._fmt.line(event, timestamp_ms)
        # Flushed per line so that `tail | grep` and tests see events as they come.
        self._out.write(line + "\n")
        self._out.flush()


async def _tail(args: argparse.Namespace, reader: TopicReader, printer: _Printer) -> int:
    fmt = TOPICS[args.topic]
    # aiokafka logs each failed connection; the one error TopicReader raises says it better.
    aiokafka_log = logging.getLogger("aiokafka")
    level = aiokafka_log.level
    aiokafka_log.setLevel(logging.CRITICAL)
    try:
        await reader.start(args.from_beginning)
    finally:
        aiokafka_log.setLevel(level)
    start = "beginning" if args.from_beginning else "end"
    count = f"{len(reader.partitions)} partition{'s' if len(reader.partitions) != 1 else ''}"
    print(
        f"tailing {args.topic} on {reader.connection} ({count}, from the {start}); Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    loop = asyncio.get_running_loop()
    last_message = loop.time()
    printed = 0
    while True:
        wait_s = 1.0
        if args.timeout is not None:
            wait_s = min(wait_s, last_message + args.timeout - loop.time())
            if wait_s <= 0:
                return 0
        records = await reader.poll(max(1, int(wait_s * 1000)))
        if not records:
            continue
        last_message = loop.time()
        for record in records:
            try:
                if record.value is None:
                    raise ValueError("empty message (tombstone)")
                # Decoded fully before printing: a batch is shown whole or not at all.
                events = list(fmt.decode(record.value))
            except Exception as exc:  # any decoder failure: report the message, go on
                print(
                    f"warning: skipping the message at {record.topic} partition "
                    f"{record.partition} offset {record.offset}: {describe_error(exc)}",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            for event in events:
                printer.event(event, record.timestamp)
                printed += 1
                if args.max is not None and printed >= args.max:
                    return 0


def _silence_stdout() -> None:
    # The reader went away (`| head`): point stdout at /dev/null so that the interpreter's
    # final flush does not print a second BrokenPipeError.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # stdout has no file descriptor (e.g. captured): nothing will flush it


def run(args: argparse.Namespace) -> int:
    """0 after --max events, after --timeout idle seconds or on Ctrl-C; 1 Kafka; 2 usage."""
    fmt = TOPICS.get(args.topic)
    if fmt is None:
        raise ConsumerConfigError(
            f"no decoder for topic {args.topic!r}; known topics: {', '.join(sorted(TOPICS))}"
        )
    reader = TopicReader(connection_from_args(args), args.topic, client_id="ebpf-apm-tail")
    printer = _Printer(fmt, args.json, sys.stdout)

    async def serve(stop: asyncio.Event) -> int:
        tailing = asyncio.create_task(_tail(args, reader, printer))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({tailing, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if tailing.done():
                return tailing.result()
            tailing.cancel()  # Ctrl-C is how an open-ended tail ends
            with contextlib.suppress(asyncio.CancelledError):
                await tailing
            return 0
        finally:
            stopping.cancel()
            await reader.stop()

    try:
        return runner.run(serve)
    except BrokenPipeError:
        _silence_stdout()
        return 0
