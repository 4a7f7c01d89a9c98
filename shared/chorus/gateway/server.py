"""Serving the gateway with uvicorn, inside an event loop the caller owns."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from chorus.errors import ConfigError


class GatewayServer(uvicorn.Server):
    """uvicorn's server without its own signal handling.

    uvicorn would take SIGTERM/SIGINT itself and raise the signal again once it has shut
    down, killing the process before the NATS connection is closed; the caller owns them.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound now: a port in use is a clear error before anything runs,
    and port 0 gives a free port whose number is known before the server starts."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        raise ConfigError(
            f"the gateway cannot listen on {host}:{port}: {exc.strerror or exc}; choose "
            "another with --host/--port (CHORUS_GATEWAY_HOST, CHORUS_GATEWAY_PORT)"
        ) from None


async def serve(app: ASGIApp, sock: socket.socket, stop: asyncio.Event, *, grace: int) -> None:
    """Serve on `sock` until `stop` is set, then give requests in flight `grace` seconds."""
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # the process's own logging (JSON lines) applies
        access_log=False,  # chorus.gateway logs every request itself, with its route
        lifespan="off",
        ws="none",
        timeout_graceful_shutdown=grace,
    )
    server = GatewayServer(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([serving, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        stopped.cancel()
        await asyncio.wait_for(serving, grace + 5)
