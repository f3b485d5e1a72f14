"""`ebpf-apm alert --rules rules.yaml`: rules over closed windows -> apm.alerts.

    apm.latency (consumer group; Avro) -> AlertEngine (alert_rules: buffers windows,
      evaluates them in order) -> transitions -> apm.alerts (Avro, key rule/series,
      acknowledged) -> commit offsets

The aggregator closes all series of a window together, but they sit on different partitions
of apm.latency; an error-rate rule needs them all. So a window is evaluated once windows two
lengths newer have arrived, or once the input has been quiet for --settle (the usual case
live: windows close every --window). Offsets are committed when nothing is pending.

Rule state (streaks, which alerts fire) lives in memory: after a restart a rule needs its
`for` windows again, and an alert that was firing fires again if the condition still holds.
This is the only module of the service that imports aiokafka.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from consumers.alert_rules import AlertEngine, Rule, RulesError, Transition, load_rules
from consumers.service_loop import run_until_stopped
from consumers.time_spec import parse_duration_ns
from producer.kafka_publisher import (
    add_bootstrap_argument,
    bootstrap_servers,
    describe_error,
    ensure_topics,
    parse_bootstrap_servers,
    quiet_aiokafka_logs,
)
from schemas.avro_codec import AvroDecodeError, codec

log = logging.getLogger(__name__)


class AlertServiceError(Exception):
    exit_code = 1


@dataclass(frozen=True)
class AlertConfig:
    bootstrap_servers: str
    rules: list[Rule]
    rules_path: str
    group: str = "ebpf-apm-alert"
    latency_topic: str = "apm.latency"
    alerts_topic: str = "apm.alerts"
    settle_ns: int = 1_000_000_000
    from_beginning: bool = False


class AlertService:
    def __init__(self, config: AlertConfig) -> None:
        self.config = config
        self.engine = AlertEngine(config.rules)
        self.latency_codec = codec("latency.avsc")
        self.alert_codec = codec("alert.avsc")
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.transitions = 0
        self.skipped = 0

    async def start(self) -> None:
        config = self.config
        quiet_aiokafka_logs()
        try:
            await ensure_topics(config.bootstrap_servers, {config.alerts_topic: 1})
            self.producer = AIOKafkaProducer(
                bootstrap_servers=config.bootstrap_servers,
                client_id="ebpf-apm-alert",
                acks="all",
                enable_idempotence=False,
            )
            await self.producer.start()
            self.consumer = AIOKafkaConsumer(
                config.latency_topic,
                bootstrap_servers=config.bootstrap_servers,
                group_id=config.group,
                client_id="ebpf-apm-alert",
                enable_auto_commit=False,
                auto_offset_reset="earliest" if config.from_beginning else "latest",
            )
            await self.consumer.start()
        except KafkaError as exc:
            raise AlertServiceError(
                f"cannot reach Kafka at {config.bootstrap_servers}: {describe_error(exc)}; "
                "start one with `ebpf-apm broker` or set --bootstrap-servers"
            ) from exc
        log.info(
            "evaluating %d rules from %s on %s, publishing to %s",
            len(config.rules),
            config.rules_path,
            config.latency_topic,
            config.alerts_topic,
        )

    async def close(self) -> None:
        for client in (self.consumer, self.producer):
            if client is not None:
                try:
                    await client.stop()
                except KafkaError as exc:
                    log.warning("stopping a Kafka client: %s", describe_error(exc))

    async def run(self, stop: asyncio.Event) -> None:
        assert self.consumer is not None
        last_input = time.monotonic_ns()
        newest_start: int | None = None
        window_ns = 0
        uncommitted = False
        while not stop.is_set():
            try:
                batches = await self.consumer.getmany(timeout_ms=200)
            except KafkaError as exc:
                raise AlertServiceError(
                    f"reading {self.config.latency_topic} failed: {describe_error(exc)}"
                ) from exc
            for records in batches.values():
                for record in records:
                    try:
                        window = self.latency_codec.decode(record.value or b"")
                    except AvroDecodeError as exc:
                        self.skipped += 1
                        log.warning(
                            "skipping %s partition %d offset %d: %s",
                            record.topic,
                            record.partition,
                            record.offset,
                            exc,
                        )
                        continue
                    self.engine.add(window)
                    start = int(window["window_start_ns"])
                    window_ns = int(window["window_end_ns"]) - start
                    newest_start = start if newest_start is None else max(newest_start, start)
            now = time.monotonic_ns()
            if batches:
                last_input = now
                uncommitted = True
                if newest_start is not None:
                    await self.publish(self.engine.evaluate(newest_start - 2 * window_ns + 1))
            elif self.engine.pending_windows and now - last_input >= self.config.settle_ns:
                await self.publish(self.engine.evaluate())
            if uncommitted and not self.engine.pending_windows:
                await self._commit()
                uncommitted = False

    async def publish(self, transitions: list[Transition]) -> None:
        if not transitions:
            return
        assert self.producer is not None
        try:
            futures = [
                await self.producer.send(
                    self.config.alerts_topic,
                    value=self.alert_codec.encode(t.as_record()),
                    key=t.key.encode(),
                )
                for t in transitions
            ]
            await asyncio.gather(*futures)
        except KafkaError as exc:
            raise AlertServiceError(
                f"publishing {len(transitions)} alert transitions to {self.config.alerts_topic} "
                f"failed: {describe_error(exc)}; check the broker, then restart"
            ) from exc
        self.transitions += len(transitions)
        for t in transitions:
            log.info("%s", t.message())

    async def _commit(self) -> None:
        assert self.consumer is not None
        try:
            await self.consumer.commit()
        except KafkaError as exc:
            log.warning("committing offsets failed, will retry: %s", describe_error(exc))


async def serve(config: AlertConfig, stop: asyncio.Event) -> None:
    service = AlertService(config)
    try:
        await service.start()
        await service.run(stop)
    finally:
        await service.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rules", required=True, metavar="FILE", help="rules file (YAML)")
    parser.add_argument("--check", action="store_true", help="only check the rules file, then exit")
    add_bootstrap_argument(parser)
    parser.add_argument("--group", default="ebpf-apm-alert", help="Kafka consumer group")
    parser.add_argument("--latency-topic", default="apm.latency", help="input windows")
    parser.add_argument("--alerts-topic", default="apm.alerts", help="output transitions")
    parser.add_argument(
        "--settle",
        default="1s",
        help="evaluate pending windows after this long without input (default: 1s)",
    )
    parser.add_argument(
        "--from-beginning",
        action="store_true",
        help="a new group starts at the oldest window kept (default: at new windows)",
    )


def run(args: argparse.Namespace) -> int:
    """Runs until SIGINT/SIGTERM: 0; 2 bad rules or flags; 1 Kafka failure."""
    try:
        rules = load_rules(args.rules)
    except RulesError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(
            f"error: fix {args.rules} and run again (see `ebpf-apm alert --help`)", file=sys.stderr
        )
        return exc.exit_code
    if args.check:
        print(f"{args.rules}: {len(rules)} rules, all valid")
        return 0
    bootstrap = bootstrap_servers(args.bootstrap_servers)
    try:
        parse_bootstrap_servers(bootstrap)
        settle_ns = parse_duration_ns(args.settle)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = AlertConfig(
        bootstrap_servers=bootstrap,
        rules=rules,
        rules_path=args.rules,
        group=args.group,
        latency_topic=args.latency_topic,
        alerts_topic=args.alerts_topic,
        settle_ns=settle_ns,
        from_beginning=args.from_beginning,
    )

    return run_until_stopped(lambda stop: serve(config, stop), (AlertServiceError,))


if __name__ == "__main__":  # the same as `ebpf-apm alert`
    from producer.cli import main

    sys.exit(main(["alert", *sys.argv[1:]]))
