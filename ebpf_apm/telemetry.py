"""Metrics and health of a long-running command: `/metrics`, `/healthz`, `/readyz`.

    --metrics-address HOST:PORT (or $EBPF_APM_METRICS_ADDRESS; off when neither is set)
      /metrics  Prometheus text of this process's one CollectorRegistry
      /healthz  200 while the service's loop turned within `stall_after_s` (liveness)
      /readyz   200 "ready", or 503 with one line per reason it is not (readiness)

A service owns one `MetricsServer`. Its stages add metrics to `server.registry` (or
`register` a custom collector that reads their state at scrape time), call `turned()` each
time their loop turns, and say what readiness needs:
- `require(name, check)`: a cheap synchronous check run on every /readyz request; it returns
  None when fine, else the reason ("no partitions assigned").
- `probe(name, check)`: an async check of something outside the process (the broker, the
  database), run in the background every `probe_interval_s` with a timeout; /readyz reports
  its last answer, so a hung dependency never makes the probe itself hang.
Each probe's last answer is also a metric: `ebpf_apm_dependency_up{service,dependency}`.

Without an address the server serves nothing, but the registry, the checks and the
heartbeat still work, so services need no second code path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from ebpf_apm.errors import InputError

if TYPE_CHECKING:  # aiohttp's server is imported only when something is served
    from aiohttp import web

log = logging.getLogger(__name__)

METRICS_ADDRESS_ENV = "EBPF_APM_METRICS_ADDRESS"
DEFAULT_METRICS_PORT = 9464  # the port the deploy/ manifests name `metrics`

# Counters would each carry a `_created` timestamp series: noise for every dashboard here.
disable_created_metrics()

Check = Callable[[], str | None]
Probe = Callable[[], Awaitable[str | None]]


class MetricsAddressError(InputError):
    """--metrics-address (or its environment variable) is not HOST:PORT (exit status 2)."""


def parse_metrics_address(address: str) -> tuple[str, int]:
    """ "0.0.0.0:9464" -> ("0.0.0.0", 9464); "[::]:9464" -> ("::", 9464); port 0 picks one."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise MetricsAddressError(
            f"bad metrics address {address!r}: expected HOST:PORT, e.g. "
            f"0.0.0.0:{DEFAULT_METRICS_PORT} (--metrics-address or ${METRICS_ADDRESS_ENV})"
        )
    return host.strip("[]") or "0.0.0.0", int(port)


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        default=None,
        help="serve Prometheus /metrics, /healthz and /readyz here (default: "
        f"${METRICS_ADDRESS_ENV}; off when neither is set)",
    )


def metrics_address_from_args(args: argparse.Namespace) -> str | None:
    """The flag, else $EBPF_APM_METRICS_ADDRESS, else None (off); validated."""
    address = args.metrics_address or os.environ.get(METRICS_ADDRESS_ENV) or None
    if address is not None:
        parse_metrics_address(address)
    return address


class MetricsServer:
    """One per process: the registry, the health and readiness state, the HTTP endpoint."""

    def __init__(
        self,
        service: str,
        address: str | None,
        *,
        stall_after_s: float = 60.0,
        probe_interval_s: float = 2.0,
        probe_timeout_s: float = 2.0,
    ) -> None:
        self.service = service
        self.address = address
        self.registry = CollectorRegistry()
        self.stall_after_s = stall_after_s
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.bound: tuple[str, int] | None = None  # where it listens, once started
        self._checks: dict[str, Check] = {}
        self._probes: dict[str, Probe] = {}
        self._probe_answers: dict[str, str | None] = {}
        self._failing: set[str] = set()  # probes whose last answer was a failure (logged)
        self._turned_at: float | None = None
        self._runner: web.AppRunner | None = None
        self._probing: asyncio.Task[None] | None = None
        self._dependency_up = Gauge(
            "ebpf_apm_dependency_up",
            "1 while the last probe of a dependency (kafka, storage) answered in time",
            ["service", "dependency"],
            registry=self.registry,
        )

    # -- what the service tells it -----------------------------------------------------------

    def register(self, collector: Collector) -> None:
        """Add a custom collector (read at each scrape) to this process's registry."""
        self.registry.register(collector)

    def turned(self) -> None:
        """The service's loop went round once (liveness)."""
        self._turned_at = time.monotonic()

    def require(self, name: str, check: Check) -> None:
        self._checks[name] = check

    def probe(self, name: str, check: Probe) -> None:
        """An outside dependency; not ready until its first probe answered."""
        self._probes[name] = check
        self._probe_answers[name] = f"{name}: not probed yet"

    # -- what it answers ---------------------------------------------------------------------

    def live(self) -> str | None:
        """None while alive, else why not."""
        if self._turned_at is None:
            return None  # starting: connecting may take long, readiness says so
        idle = time.monotonic() - self._turned_at
        if idle > self.stall_after_s:
            return f"{self.service}: its loop has not turned for {idle:.0f} s"
        return None

    def not_ready(self) -> list[str]:
        """Every reason the service is not ready (empty: ready)."""
        reasons = [answer for answer in self._probe_answers.values() if answer]
        if self._turned_at is None:
            reasons.append(f"{self.service}: starting (its loop has not turned yet)")
        for name, check in self._checks.items():
            try:
                answer = check()
            except Exception as exc:  # a check that breaks must not break the endpoint
                answer = f"{name}: check failed: {exc!r}"
            if answer:
                reasons.append(answer)
        live = self.live()
        if live:
            reasons.append(live)
        return reasons

    # -- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        # Always: probes may be added after the start (by the service's own wiring).
        self._probing = asyncio.create_task(self._probe_forever())
        if self.address is None:
            return
        from aiohttp import web  # noqa: PLC0415 (costly; `--help` and unserved runs skip it)

        host, port = parse_metrics_address(self.address)
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise MetricsAddressError(
                f"cannot serve metrics on {self.address}: {exc.strerror or exc}; pick a free "
                "port with --metrics-address HOST:PORT"
            ) from exc
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.bound = sockets[0].getsockname()[:2] if sockets else (host, port)
        log.info("metrics on http://%s:%d/metrics (/healthz, /readyz)", *self._url_host())

    def _url_host(self) -> tuple[str, int]:
        assert self.bound is not None
        host, port = self.bound
        return (f"[{host}]" if ":" in host else host), port

    async def stop(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probing
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._probe_once(name) for name in list(self._probes)))
            await asyncio.sleep(self.probe_interval_s)

    async def _probe_once(self, name: str) -> None:
        # The probe gets probe_timeout_s for its own, better worded, timeout; this one only
        # keeps a probe that ignores it from stalling the others.
        limit = self.probe_timeout_s + 1.0
        try:
            answer = await asyncio.wait_for(self._probes[name](), limit)
            answer = answer and f"{name}: {answer}"
        except TimeoutError:
            answer = f"{name}: no answer within {limit:g} s"
        except Exception as exc:
            answer = f"{name}: {exc}"
        failing = name in self._failing
        if answer and not failing:
            log.warning("not ready: %s", answer)
            self._failing.add(name)
        elif answer is None and failing:
            log.info("%s answers again", name)
            self._failing.discard(name)
        self._probe_answers[name] = answer
        self._dependency_up.labels(self.service, name).set(0 if answer else 1)

    # -- HTTP --------------------------------------------------------------------------------

    async def _metrics(self, _: web.Request) -> web.Response:
        from aiohttp import web  # noqa: PLC0415 (loaded by start(): a dictionary lookup)

        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        from aiohttp import web  # noqa: PLC0415

        reason = self.live()
        if reason:
            return web.Response(status=503, text=f"not alive: {reason}\n")
        return web.Response(text="alive\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        from aiohttp import web  # noqa: PLC0415

        reasons = self.not_ready()
        if reasons:
            return web.Response(status=503, text="".join(f"not ready: {r}\n" for r in reasons))
        return web.Response(text="ready\n")
