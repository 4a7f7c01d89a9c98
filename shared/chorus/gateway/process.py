"""The gateway process: HTTP on one NATS connection, until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.service import Service

from chorus import __version__
from chorus.config import Settings
from chorus.gateway.app import create_app
from chorus.gateway.options import GatewayOptions
from chorus.gateway.server import listen
from chorus.gateway.server import serve as serve_http
from chorus.lifecycle import Shutdown, serve_until_signalled
from chorus.nats.connection import connect
from chorus.subjects import Subjects
from chorus.telemetry.metrics import GatewayInstruments, MetricsServer

log = logging.getLogger("chorus.gateway")

GRACE_S = 10  # for requests in flight at shutdown (waits for runs answer 202 at once)


async def register_service(nc: Client, subjects: Subjects, *, port: int) -> Service:
    """The gateway as a NATS micro service (no endpoints: it serves HTTP), so `$SRV.PING`,
    INFO and STATS show it beside the other roles; `port` is its HTTP port."""
    return await add_service(
        nc,
        name=subjects.role_service("gateway"),
        version=__version__,
        description="Chorus HTTP gateway",
        metadata={"role": "gateway", "port": str(port)},
    )


async def serve(settings: Settings, host: str, port: int, options: GatewayOptions) -> int:
    """Listen on `host:port` (bound first, so a port in use fails at once), then serve."""
    with listen(host, port) as sock:
        stopping = asyncio.Event()
        running: list[tuple[asyncio.Task[None], Client, Service]] = []
        shutdown = Shutdown()
        instruments = GatewayInstruments()
        metrics = MetricsServer(instruments.registry)

        async def start() -> None:
            nc = await connect(
                settings, "gateway", service=True, on_closed=shutdown.connection_closed
            )
            app = create_app(nc, settings, options, stopping=stopping, metrics=instruments)
            serving = asyncio.create_task(serve_http(app, sock, stopping, grace=GRACE_S))
            bound_host, bound_port = sock.getsockname()[:2]
            service = await register_service(nc, settings.subjects, port=bound_port)
            running.append((serving, nc, service))
            metrics.start(settings.metrics_port, settings.metrics_host)
            log.info(
                "gateway listening",
                extra={
                    "host": bound_host,
                    "port": bound_port,
                    "auth": options.keys is not None,
                    "allowed_hosts": sorted(options.allowed_hosts),
                },
            )

        async def stop() -> None:
            stopping.set()
            metrics.stop()
            for serving, nc, service in running:
                await service.stop()
                with contextlib.suppress(Exception):
                    await serving
                await nc.close()
            log.info("gateway stopped")

        return await serve_until_signalled(start, stop, shutdown=shutdown)
