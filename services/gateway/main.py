"""The gateway service: HTTP on one NATS connection, until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

from chorus.config import Settings
from chorus.connection import connect
from chorus.gateway import create_app, listen
from chorus.gateway import serve as serve_http
from chorus.gateway.options import GatewayOptions

log = logging.getLogger("chorus.gateway")

GRACE_S = 10  # for requests in flight at shutdown (waits for runs answer 202 at once)


async def serve(settings: Settings, host: str, port: int, options: GatewayOptions) -> int:
    with listen(host, port) as sock:
        nc = await connect(settings, "gateway", service=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        bound_host, bound_port = sock.getsockname()[:2]
        log.info(
            "gateway listening",
            extra={
                "host": bound_host,
                "port": bound_port,
                "auth": options.keys is not None,
                "allowed_hosts": sorted(options.allowed_hosts),
            },
        )
        app = create_app(nc, settings, options, stopping=stop)
        try:
            await serve_http(app, sock, stop, grace=GRACE_S)
        finally:
            await nc.close()
    log.info("gateway stopped")
    return 0
