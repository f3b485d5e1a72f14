"""The consumers' outage policy: backoff with jitter, one log line per state change."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ebpf_apm.consumers.errors import ConsumerConfigError, ConsumerError
from ebpf_apm.consumers.outage import Outage, StoppedWhileWaiting

LOGGER = "ebpf_apm.consumers.outage"


def test_backoff_doubles_to_its_cap_within_the_jitter() -> None:
    low = Outage("x", first_delay_s=1.0, max_delay_s=8.0, jitter=lambda: 0.0)
    high = Outage("x", first_delay_s=1.0, max_delay_s=8.0, jitter=lambda: 1.0)
    assert [low.failed("r") for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert [high.failed("r") for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    high.recovered()
    assert high.failed("r") == 1.0  # a new outage starts from the first delay


def test_retry_logs_once_when_waiting_starts_and_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    outage = Outage("storage db", first_delay_s=0.01, max_delay_s=0.02)
    attempts = 0

    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts <= 5:
            raise ConsumerError(f"refused ({attempts})")
        return "written"

    assert asyncio.run(outage.retry("writing", flaky, asyncio.Event())) == "written"
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 2, messages
    assert messages[0] == "waiting for storage db: refused (1); retrying with backoff"
    assert messages[1].startswith("storage db is back after ")
    assert (attempts, outage.outages, outage.waiting) == (6, 1, False)


def test_a_stop_while_waiting_gives_up_without_success() -> None:
    outage = Outage("Kafka at k:9092", first_delay_s=10.0)

    async def scenario() -> None:
        stop = asyncio.Event()

        async def refused() -> None:
            asyncio.get_running_loop().call_later(0.05, stop.set)
            raise ConsumerError("no broker")

        await outage.retry("publishing 3 windows", refused, stop)

    with pytest.raises(StoppedWhileWaiting, match="before publishing 3 windows; nothing past"):
        asyncio.run(scenario())


def test_errors_outside_the_retriable_family_are_raised_at_once() -> None:
    async def bad_setting() -> None:
        raise ValueError("not an outage")

    with pytest.raises(ValueError):
        asyncio.run(Outage("x").retry("y", bad_setting, asyncio.Event(), (ConsumerConfigError,)))
