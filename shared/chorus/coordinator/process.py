"""The coordinator process: registry, health, routing and durable dispatch until SIGTERM."""

from __future__ import annotations

from nats.aio.client import Client

from chorus.config import Settings
from chorus.coordinator.service import Coordinator
from chorus.lifecycle import Shutdown, serve_until_signalled
from chorus.nats.connection import connect
from chorus.telemetry.metrics import MetricsServer


async def serve(settings: Settings) -> int:
    """Run the coordinator until signalled; its /metrics on CHORUS_METRICS_PORT when set."""
    running: list[tuple[Coordinator, Client, MetricsServer]] = []

    shutdown = Shutdown()

    async def start() -> None:
        nc = await connect(
            settings, "coordinator", service=True, on_closed=shutdown.connection_closed
        )
        coordinator = Coordinator(nc, settings)
        metrics = MetricsServer(coordinator.dispatch_metrics.registry)
        running.append((coordinator, nc, metrics))
        metrics.start(settings.metrics_port, settings.metrics_host)
        await coordinator.start()

    async def stop() -> None:
        for coordinator, nc, metrics in running:
            await coordinator.stop()
            metrics.stop()
            # Subscriptions are gone already; drain() can hang on JetStream pull inboxes.
            await nc.flush(timeout=5)
            await nc.close()

    return await serve_until_signalled(start, stop, shutdown=shutdown)
