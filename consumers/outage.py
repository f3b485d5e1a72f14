"""Riding out a broker or database outage: backoff with jitter, one log line per state change.

    storage = Outage("storage postgresql://apm:***@db/apm")
    await storage.retry("writing 12 windows", lambda: store.write(rows, ...), stop)

    working --failure--> waiting ("waiting for <what>: <reason>; retrying")  logged once
    waiting --failure--> waiting (sleep: exponential backoff, full jitter)   not logged
    waiting --success--> working ("<what> is back after N s")                logged once

A consumer never exits because Kafka or storage went away: it waits, says once what it is
waiting for, and goes on where it was. Nothing is committed while it waits, so a stop
(SIGTERM) during an outage loses nothing either: the next start reads that input again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ebpf_apm.consumers.errors import ConsumerError

log = logging.getLogger(__name__)

T = TypeVar("T")


class StoppedWhileWaiting(ConsumerError):
    """The service was asked to stop during an outage (exit status 1; nothing committed)."""


class Outage:
    """The state of one dependency (Kafka, storage) as a service sees it."""

    def __init__(
        self,
        what: str,
        *,
        first_delay_s: float = 0.2,
        max_delay_s: float = 10.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.what = what
        self._first_delay_s = first_delay_s
        self._max_delay_s = max_delay_s
        self._jitter = jitter
        self._delay_s = first_delay_s
        self.since: float | None = None  # time.monotonic() of the first failure, while waiting
        self.reason = ""
        self.outages = 0  # how many times it went away
        self.waited_s = 0.0  # total time spent waiting, over the service's life

    @property
    def waiting(self) -> bool:
        return self.since is not None

    def failed(self, reason: str) -> float:
        """Note a failure; the delay before the next try (backoff with full jitter)."""
        self.reason = reason
        if self.since is None:
            self.since = time.monotonic()
            self.outages += 1
            log.warning("waiting for %s: %s; retrying with backoff", self.what, reason)
        delay = self._delay_s * (0.5 + self._jitter() / 2)
        self._delay_s = min(self._delay_s * 2, self._max_delay_s)
        return delay

    def recovered(self) -> None:
        """Note a success; logs once when it ends an outage."""
        self._delay_s = self._first_delay_s
        if self.since is not None:
            waited = time.monotonic() - self.since
            self.waited_s += waited
            self.since = None
            log.info("%s is back after %.1f s", self.what, waited)

    async def retry(
        self,
        action: str,
        attempt: Callable[[], Awaitable[T]],
        stop: asyncio.Event,
        retriable: tuple[type[BaseException], ...] = (ConsumerError,),
    ) -> T:
        """`attempt()` until it succeeds; raises StoppedWhileWaiting if `stop` is set first."""
        while True:
            try:
                result = await attempt()
            except retriable as exc:
                if isinstance(exc, StoppedWhileWaiting):
                    raise
                delay = self.failed(str(exc))  # our errors say what failed, on what
                if await stopped_within(stop, delay):
                    raise StoppedWhileWaiting(
                        f"stopped while waiting for {self.what} ({self.reason}) before "
                        f"{action}; nothing past it was committed: the next start reads that "
                        "input again"
                    ) from exc
                continue
            self.recovered()
            return result


async def stopped_within(stop: asyncio.Event, delay_s: float) -> bool:
    """Wait delay_s, or less if `stop` is set first; whether it was."""
    try:
        await asyncio.wait_for(stop.wait(), delay_s)
    except TimeoutError:
        return False
    return True
