"""Runs a consumer service on uvloop until SIGINT or SIGTERM asks it to stop."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable


def run_until_stopped(
    serve: Callable[[asyncio.Event], Awaitable[None]],
    failures: tuple[type[Exception], ...],
) -> int:
    """0 once `serve` returns after a stop request; a failure's `exit_code` (with its message
    on stderr) when `serve` raises one of `failures`."""
    import uvloop

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    try:
        uvloop.run(main())
    except failures as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 1))
    return 0
