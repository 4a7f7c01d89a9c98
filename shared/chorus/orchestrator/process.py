"""The orchestrator process: takes runs from the queue and drives them until SIGTERM."""

from __future__ import annotations

from collections.abc import Sequence

from nats.aio.client import Client

from chorus.config import Settings
from chorus.lifecycle import Shutdown, serve_until_signalled
from chorus.nats.connection import connect
from chorus.orchestrator.service import Orchestrator
from chorus.telemetry.metrics import MetricsServer
from chorus.workflows.processors import load_processors


async def serve(
    settings: Settings, *, durable_tasks: bool = True, processor_modules: Sequence[str] = ()
) -> int:
    """Run an orchestrator until signalled; its /metrics on CHORUS_METRICS_PORT when set."""
    running: list[tuple[Orchestrator, Client, MetricsServer]] = []
    processors = load_processors(processor_modules)  # a bad module stops us before connecting

    shutdown = Shutdown()

    async def start() -> None:
        nc = await connect(
            settings, "orchestrator", service=True, on_closed=shutdown.connection_closed
        )
        orchestrator = Orchestrator(
            nc, settings, durable_tasks=durable_tasks, processors=processors
        )
        metrics = MetricsServer(orchestrator.metrics.registry)
        running.append((orchestrator, nc, metrics))
        metrics.start(settings.metrics_port, settings.metrics_host)
        await orchestrator.start()

    async def stop() -> None:
        for orchestrator, nc, metrics in running:
            await orchestrator.stop()
            metrics.stop()
            await nc.flush(timeout=5)
            await nc.close()

    return await serve_until_signalled(start, stop, shutdown=shutdown)
