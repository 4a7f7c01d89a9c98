"""The agent process: one instance of an agent, until SIGTERM or SIGINT drains it."""

from __future__ import annotations

from chorus.agent.host import AgentHost
from chorus.agent.loader import load_agent
from chorus.config import Settings
from chorus.lifecycle import Shutdown, serve_until_signalled
from chorus.telemetry.metrics import MetricsServer


async def serve(spec: str, settings: Settings, *, instance: str | None = None) -> int:
    """Run the agent `spec` (a YAML file or `package.module:agent`) until signalled; its
    /metrics on CHORUS_METRICS_PORT when set."""
    shutdown = Shutdown()
    host = AgentHost(
        load_agent(spec), settings, instance=instance, on_closed=shutdown.connection_closed
    )
    metrics = MetricsServer(host.metrics.registry).start(
        settings.metrics_port, settings.metrics_host
    )
    try:
        return await serve_until_signalled(host.start, host.stop, shutdown=shutdown)
    finally:
        metrics.stop()
