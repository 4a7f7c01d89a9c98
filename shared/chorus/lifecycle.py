"""The life of a service process: start, serve until SIGTERM/SIGINT, drain, exit.

A service also ends by itself when its NATS connection is closed for good (nats-py closes
the client after some server errors, e.g. an authorization violation once its user is
removed, or "maximum control line exceeded"; it does not reconnect then). Serving on without
NATS would look alive and do nothing, so the process stops with `EXIT_NATS_CLOSED` and its
supervisor (systemd, Docker, `chorus up`) starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

log = logging.getLogger("chorus.lifecycle")

TERMINATED_BEFORE_READY = 143  # 128 + SIGTERM, as a shell reports it
EXIT_NATS_CLOSED = 70  # EX_SOFTWARE: not a clean stop, so a supervisor restarts us
STOP_AFTER_CLOSED_S = 10.0  # cleaning up without NATS must not hang the exit


class Shutdown:
    """Ends a service from inside. Pass `connection_closed` as `connect(on_closed=...)` and
    this object to `serve_until_signalled(..., shutdown=)`."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.reason = ""
        self.stopping = False  # set once a signal started the stop: a close is then ours

    def connection_closed(self, reason: str) -> None:
        """The NATS client will not reconnect: log once, and make the process exit."""
        if self.stopping or self.requested.is_set():
            return
        self.reason = reason
        log.error(
            f"NATS connection closed for good: {reason}; "
            "exiting so the supervisor restarts this process"
        )
        self.requested.set()


async def serve_until_signalled(
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    *,
    shutdown: Shutdown | None = None,
) -> int:
    """Run `start`, wait for a signal, run `stop`. A signal during `start` (a server that
    refuses us, or is not up yet) ends the process at once instead of being ignored. When
    `shutdown` is requested (the NATS connection closed for good) return EXIT_NATS_CLOSED."""
    shutdown = shutdown or Shutdown()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    starting = asyncio.ensure_future(start())
    signalled = asyncio.ensure_future(stopping.wait())
    failed = asyncio.ensure_future(shutdown.requested.wait())
    try:
        await asyncio.wait({starting, signalled, failed}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
            if failed.done():
                return EXIT_NATS_CLOSED
            log.warning("stopped before it was ready")
            return TERMINATED_BEFORE_READY
        if not (signalled.done() or failed.done()):
            starting.result()  # a start-up error ends the process with its message
        await asyncio.wait({signalled, failed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        signalled.cancel()
        failed.cancel()
    if shutdown.requested.is_set():
        # Without NATS, stopping cannot flush or say goodbye: clean up what can be, briefly.
        try:
            await asyncio.wait_for(stop(), STOP_AFTER_CLOSED_S)
        except Exception as exc:
            log.debug("stop without NATS failed", extra={"error": repr(exc)})
        return EXIT_NATS_CLOSED
    shutdown.stopping = True
    await stop()
    # Stopped cleanly: a repeated SIGTERM arriving while the interpreter exits (after the loop
    # and its handlers are gone) must not turn exit 0 into "killed by a signal".
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    return 0
