"""The coordinator's records: the registry, status notices, durable task outcomes and attempts,
dead letters, metrics."""

from __future__ import annotations

from typing import Literal

import msgspec

from chorus.messages.agents import InstanceState, Result, Task
from chorus.messages.codec import Message, Usage, now

Health = Literal["healthy", "unhealthy", "dead"]
BreakerState = Literal["closed", "open", "half_open"]
# What an agent status notice says: a health, or that the instance came up, left (it said it
# stopped), or was forgotten (dead long enough to be dropped from the registry).
StatusChange = Literal["up", "healthy", "unhealthy", "dead", "left", "forgotten"]


class AgentRecord(Message, tag="agent_record"):
    """One instance in the registry (KV `<prefix>-agents`, key = instance id)."""

    instance: str
    name: str
    capabilities: list[str]
    health: Health
    state: InstanceState  # as the instance last said
    in_flight: int
    max_concurrency: int
    processed: int
    failed: int
    success_rate: float
    mean_latency_ms: float
    last_seen: float
    started_at: float
    breaker: BreakerState = "closed"
    usage: Usage = Usage()
    # The instance's heartbeat interval (seconds; 0: not known, an entry of an older
    # version): readers judge `last_seen` by it (chorus.client.system.judged_health).
    interval_s: float = 0.0


class AgentStatusChange(Message, tag="agent_status"):
    """Published by the coordinator on `<prefix>.status.<instance>.<health>`."""

    instance: str
    name: str
    health: StatusChange
    previous: StatusChange | Literal[""]  # "" when the instance just came up
    time: float = msgspec.field(default_factory=now)


class AttemptError(msgspec.Struct, frozen=True, kw_only=True):
    attempt: int
    code: str
    reason: str
    instance: str = ""
    time: float = msgspec.field(default_factory=now)


class AttemptLog(Message, tag="attempt_log"):
    task_id: str
    errors: list[AttemptError] = []


class TaskOutcome(Message, tag="task_outcome"):
    """The one recorded outcome of a durable task (KV `<prefix>-tasks`, key `outcome.<id>`).

    `waiting` is not final: the task is parked for the approvals in `waiting_for` (until
    `waiting_until`, ISO 8601), and the outcome of its resumption replaces this one
    (compare-and-set); `completed` and `failed` are written once and stand."""

    task_id: str
    status: Literal["completed", "failed", "waiting"]
    result: Result | None = None
    errors: list[AttemptError] = []
    attempts: int = 1
    time: float = msgspec.field(default_factory=now)
    waiting_for: list[str] = []
    waiting_until: str = ""

    @property
    def final(self) -> bool:
        return self.status != "waiting"


class DeadLetter(Message, tag="dead_letter"):
    """A task that failed every attempt, stored on `<prefix>.dlq.<target>`."""

    task: Task
    target: str
    errors: list[AttemptError]
    time: float = msgspec.field(default_factory=now)


class AgentMetrics(msgspec.Struct, frozen=True, kw_only=True):
    instance: str
    name: str
    health: Health
    load: int
    max_concurrency: int
    success_rate: float
    mean_latency_ms: float
    breaker: BreakerState


class MetricSample(msgspec.Struct, frozen=True, array_like=True):
    """One series of a metric family: its sample name (`<family>_bucket`, `_sum`, ...),
    labels and value."""

    name: str
    labels: dict[str, str]
    value: float


class MetricFamily(msgspec.Struct, frozen=True, kw_only=True):
    """One Prometheus metric family, as `prometheus_client` collects it."""

    name: str
    type: str  # counter | gauge | histogram | summary | info | stateset | unknown
    help: str
    samples: list[MetricSample] = []


class Metrics(Message, tag="metrics"):
    """The system metrics the coordinator serves on `<prefix>.coordinator.metrics`."""

    total_agents: int
    healthy_agents: int
    queue_length: int
    active_jobs: int
    total_tasks: int
    completed_tasks: int
    failed_tasks: int
    retried_tasks: int
    dead_lettered: int
    current_load: float
    agents: list[AgentMetrics]
    queues: dict[str, int] = {}
    time: float = msgspec.field(default_factory=now)
    # The coordinator's own Prometheus families (histograms of queue wait and attempts,
    # token, retry and dead-letter counters), relayed by the gateway's /metrics.
    families: list[MetricFamily] = []
