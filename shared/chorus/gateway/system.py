"""What the gateway reads about the system: the agent registry and the coordinator's metrics."""

from __future__ import annotations

import asyncio
from typing import Literal

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import KeyDeletedError, KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from chorus.errors import InvalidMessage, NatsUnreachable, NoResponders
from chorus.messages import AgentRecord, HealthReport, Metrics, decode
from chorus.streams import ensure_agents_bucket
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
    """Reads the registry (KV `<prefix>-agents`) and asks the coordinator for its metrics."""

    def __init__(self, nc: Client, subjects: Subjects, *, timeout: float) -> None:
        self.nc = nc
        self.subjects = subjects
        self.timeout = timeout  # for the coordinator: short, health checks must answer fast
        self._registry: KeyValue | None = None

    async def agents(self) -> list[AgentRecord]:
        """Every instance in the registry, by agent name then instance."""
        if self._registry is None:
            self._registry = await ensure_agents_bucket(self.nc.jetstream(), self.subjects)
        try:
            keys = await self._registry.keys()
        except NoKeysError:
            return []
        records = []
        for key in keys:
            try:
                entry = await self._registry.get(key)
            except (KeyNotFoundError, KeyDeletedError):
                continue  # the instance left between listing and reading
            if entry.value:
                records.append(decode(entry.value, AgentRecord))
        return sorted(records, key=lambda r: (r.name, r.instance))

    async def metrics(self) -> Metrics:
        """The coordinator's metrics; NoResponders when no coordinator answers in time."""
        try:
            reply = await self.nc.request(self.subjects.metrics, b"", timeout=self.timeout)
        except (NoRespondersError, NatsTimeout):
            raise NoResponders(
                f"no coordinator answered on {self.subjects.metrics} within {self.timeout}s: "
                "start one with `chorus coordinator` (or `chorus up`)"
            ) from None
        try:
            return decode(reply.data, Metrics)
        except InvalidMessage as exc:
            raise NoResponders(f"the coordinator answered with no metrics: {exc.reason}") from None

    async def health(self) -> HealthReport:
        try:
            async with asyncio.TaskGroup() as group:
                agents = group.create_task(self.agents())
                coordinator = group.create_task(self._coordinator_answers())
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

    async def _coordinator_answers(self) -> bool:
        try:
            await self.metrics()
        except NoResponders:
            return False
        return True
