"""The life of a service process: start, serve until SIGTERM/SIGINT, drain, exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

log = logging.getLogger("chorus.lifecycle")

TERMINATED_BEFORE_READY = 143  # 128 + SIGTERM, as a shell reports it


async def serve_until_signalled(
    start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]
) -> int:
    """Run `start`, wait for a signal, run `stop`. A signal during `start` (a server that
    refuses us, or is not up yet) ends the process at once instead of being ignored."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    starting = asyncio.ensure_future(start())
    signalled = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        log.warning("stopped before it was ready")
        return TERMINATED_BEFORE_READY
    signalled_early = signalled.done()
    if not signalled_early:
        starting.result()  # a start-up error ends the process with its message
    else:
        signalled.cancel()
    await stopping.wait()
    await stop()
    # Stopped cleanly: a repeated SIGTERM arriving while the interpreter exits (after the loop
    # and its handlers are gone) must not turn exit 0 into "killed by a signal".
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    return 0
