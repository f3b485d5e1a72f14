"""The event loop every long-running command runs in: uvloop, stopped by SIGINT or SIGTERM.

    run(serve) -> uvloop -> serve(stop) ... SIGTERM/SIGINT -> stop.set() -> serve returns

`serve` gets an `asyncio.Event` that is set on the first signal; it winds down (drains,
flushes, commits) and returns its exit status. A second signal is not special: the service
is already stopping. Errors are not caught here: `ebpf_apm.cli.main` maps `ApmError` to its
message and exit status once, for every command.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

import uvloop

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

Serve = Callable[[asyncio.Event], Awaitable[int | None]]


def run(serve: Serve) -> int:
    """Run `serve(stop)` until it returns; its status (None is 0)."""

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop.set)
        try:
            return int(await serve(stop) or 0)
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)

    return uvloop.run(main())
