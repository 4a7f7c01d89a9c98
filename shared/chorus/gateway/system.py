"""What the gateway reads about the system: the agent registry and the coordinator's metrics."""

from __future__ import annotations

import asyncio
from typing import Literal

from nats.aio.client import Client

from chorus.client.system import SystemClient
from chorus.errors import NatsUnreachable
from chorus.gateway.bodies import HealthReport
from chorus.messages import AgentRecord, Metrics
from chorus.subjects import Subjects

ConnectionState = Literal["connected", "reconnecting", "closed"]


def connection_state(nc: Client) -> ConnectionState:
    if nc.is_connected:
        return "connected"
    return "closed" if nc.is_closed else "reconnecting"


def nats_unreachable(nc: Client) -> NatsUnreachable:
    return NatsUnreachable(
        f"the gateway is not connected to NATS ({connection_state(nc)}); check that "
        "nats-server is running and NATS_URL points at it, then retry"
    )


def require_connected(nc: Client) -> None:
    """Fail at once while NATS is away: a request now would wait for its whole timeout."""
    if not nc.is_connected:
        raise nats_unreachable(nc)


class SystemView:
    """The gateway's health report, from the registry and the coordinator's answer."""

    def __init__(self, nc: Client, subjects: Subjects, *, timeout: float) -> None:
        self.system = SystemClient(nc, subjects, timeout=timeout)

    async def agents(self) -> list[AgentRecord]:
        return await self.system.agents()

    async def metrics(self) -> Metrics:
        return await self.system.metrics()

    async def health(self) -> HealthReport:
        try:
            async with asyncio.TaskGroup() as group:
                agents = group.create_task(self.system.agents())
                coordinator = group.create_task(self.system.coordinator_answers())
        except ExceptionGroup as failed:
            # Answer with the error itself (a NATS failure becomes a 503), not the group.
            raise failed.exceptions[0] from None
        healthy = sum(1 for a in agents.result() if a.health == "healthy")
        up = coordinator.result()
        return HealthReport(
            status="ok" if up and healthy else "degraded",
            nats="connected",
            coordinator="ok" if up else "unreachable",
            healthy_agents=healthy,
            agents=agents.result(),
        )
