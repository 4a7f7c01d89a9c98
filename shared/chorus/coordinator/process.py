"""The coordinator process: registry, health, routing and durable dispatch until SIGTERM."""

from __future__ import annotations

from nats.aio.client import Client

from chorus.config import Settings
from chorus.coordinator.service import Coordinator
from chorus.lifecycle import Shutdown, serve_until_signalled
from chorus.nats.connection import connect


async def serve(settings: Settings) -> int:
    running: list[tuple[Coordinator, Client]] = []

    shutdown = Shutdown()

    async def start() -> None:
        nc = await connect(
            settings, "coordinator", service=True, on_closed=shutdown.connection_closed
        )
        coordinator = Coordinator(nc, settings)
        running.append((coordinator, nc))
        await coordinator.start()

    async def stop() -> None:
        for coordinator, nc in running:
            await coordinator.stop()
            # Subscriptions are gone already; drain() can hang on JetStream pull inboxes.
            await nc.flush(timeout=5)
            await nc.close()

    return await serve_until_signalled(start, stop, shutdown=shutdown)
