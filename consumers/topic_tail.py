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

import uvloop
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from producer.kafka_publisher import (
    add_bootstrap_argument,
    bootstrap_servers,
    describe_error,
    parse_bootstrap_servers,
)
from schemas.avro_codec import codec
from schemas.event_batch import decode_net_batch, decode_span_batch, iter_events, iter_net_events

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


# Topic name -> how to read it. Later topics plug in here, e.g.
#   "apm.kprobe.events": TopicFormat(_kprobe_events, span_line),
#   "apm.spans": TopicFormat(avro_decoder("apm.spans")),
TOPICS: dict[str, TopicFormat] = {
    "apm.uprobe.events": TopicFormat(_uprobe_events, span_line),
    "apm.kprobe.events": TopicFormat(_kprobe_events),
    "apm.spans": TopicFormat(_joined_spans, span_line),
    "apm.latency": TopicFormat(  # the sketch shown as hex
        lambda value: iter(
            [
                {
                    k: v.hex() if isinstance(v, bytes) else v
                    for k, v in codec("latency.avsc").decode(value).items()
                }
            ]
        )
    ),
    "apm.alerts": TopicFormat(lambda value: iter([codec("alert.avsc").decode(value)])),
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
    add_bootstrap_argument(parser)


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


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


async def _tail(args: argparse.Namespace, bootstrap: str, printer: _Printer) -> int:
    fmt = TOPICS[args.topic]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id="ebpf-apm-tail",
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest" if args.from_beginning else "latest",
    )
    try:
        try:
            # aiokafka logs each failed connection; the one error below says it better.
            with _quiet_logger("aiokafka"):
                await consumer.start()
                # All-topics listing on purpose: naming the topic in a metadata request makes
                # brokers with auto-creation (Tansu, default Kafka) create it.
                topics = await consumer.topics()
        except KafkaError as exc:
            _error(
                f"cannot reach Kafka at {bootstrap}: {describe_error(exc)}; "
                "start one with `ebpf-apm broker` or set --bootstrap-servers"
            )
            return 1
        partitions = consumer.partitions_for_topic(args.topic) if args.topic in topics else None
        if not partitions:
            have = ", ".join(sorted(t for t in topics if not t.startswith("__"))) or "none"
            _error(
                f"topic {args.topic!r} does not exist on Kafka at {bootstrap} (topics there: "
                f"{have}); it is created when the agent starts publishing"
            )
            return 1
        assigned = [TopicPartition(args.topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        if args.from_beginning:
            await consumer.seek_to_beginning(*assigned)
        else:
            await consumer.seek_to_end(*assigned)
            await _skip_to_high_watermark(consumer, assigned)
        # Resolve the offsets now, so "from the end" means from when tail started, not from
        # whenever the first fetch happens.
        for tp in assigned:
            await consumer.position(tp)
        start = "beginning" if args.from_beginning else "end"
        count = f"{len(assigned)} partition{'s' if len(assigned) != 1 else ''}"
        print(
            f"tailing {args.topic} on {bootstrap} ({count}, from the {start}); Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        return await _print_loop(consumer, args, fmt, printer)
    finally:
        await consumer.stop()


async def _skip_to_high_watermark(
    consumer: AIOKafkaConsumer, assigned: list[TopicPartition], timeout_s: float = 5.0
) -> None:
    """Move each partition past the last message that exists now.

    Tansu 0.6 answers ListOffsets(latest) with the last record batch's base offset + 1, short
    of the end when that batch holds several messages (the agent's usually do); the high
    watermark in a fetch response is right. On Apache Kafka both agree and this costs one
    fetch round trip. Records fetched here predate the start and are not printed.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = set(assigned)
    while pending and loop.time() < deadline:
        await consumer.getmany(*pending, timeout_ms=100)
        for tp in list(pending):
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            if highwater > await consumer.position(tp):
                consumer.seek(tp, highwater)
            pending.discard(tp)


async def _print_loop(
    consumer: AIOKafkaConsumer, args: argparse.Namespace, fmt: TopicFormat, printer: _Printer
) -> int:
    loop = asyncio.get_running_loop()
    last_message = loop.time()
    printed = 0
    while True:
        wait_s = 1.0
        if args.timeout is not None:
            wait_s = min(wait_s, last_message + args.timeout - loop.time())
            if wait_s <= 0:
                return 0
        batches = await consumer.getmany(timeout_ms=max(1, int(wait_s * 1000)))
        if not batches:
            continue
        last_message = loop.time()
        for tp in sorted(batches):
            for record in batches[tp]:
                try:
                    if record.value is None:
                        raise ValueError("empty message (tombstone)")
                    # Decoded fully before printing: a batch is shown whole or not at all.
                    events = list(fmt.decode(record.value))
                except Exception as exc:  # any decoder failure: report the message, go on
                    print(
                        f"warning: skipping the message at {tp.topic} partition {tp.partition} "
                        f"offset {record.offset}: {describe_error(exc)}",
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
        _error(f"no decoder for topic {args.topic!r}; known topics: {', '.join(sorted(TOPICS))}")
        return 2
    bootstrap = bootstrap_servers(args.bootstrap_servers)
    try:
        parse_bootstrap_servers(bootstrap)
    except ValueError as exc:
        _error(str(exc))
        return 2
    printer = _Printer(fmt, args.json, sys.stdout)
    try:
        return uvloop.run(_tail(args, bootstrap, printer))
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how an open-ended tail ends
    except BrokenPipeError:
        _silence_stdout()
        return 0


if __name__ == "__main__":  # the same as `ebpf-apm tail`
    from producer.cli import main

    sys.exit(main(["tail", *sys.argv[1:]]))
