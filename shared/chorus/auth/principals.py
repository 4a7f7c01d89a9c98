"""Who connects to NATS: one principal per agent name (its instances share it) and per service."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from chorus.auth import permissions
from chorus.auth.permissions import AgentGrant, Permissions
from chorus.errors import ConfigError
from chorus.specs.agent import AgentSpec
from chorus.specs.tools import ToolSpec
from chorus.subjects import Subjects

SERVICES = ("coordinator", "orchestrator", "gateway", "operator", "observer")
# A reply may come this long after the request (an agent's task runs up to the task timeout).
REPLY_MARGIN_S = 60


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """A NATS user: `name` is also its inbox token and credential file name."""

    name: str
    role: str  # "agent" or one of SERVICES
    permissions: Permissions
    agent: str = ""  # for agents, the agent name

    @property
    def inbox_prefix(self) -> str:
        return permissions.inbox(self.name)


def agent_principal_name(agent: str) -> str:
    return f"agent-{agent}"


def grant_of(spec: AgentSpec) -> AgentGrant:
    topics = list(spec.publishes) + ([spec.emits] if spec.emits else [])
    peers = [t for t in spec.tools if isinstance(t, ToolSpec)]
    direct = [t for t in peers if not t.durable]
    durable = [t for t in peers if t.durable]
    return AgentGrant(
        name=spec.name,
        capabilities=list(spec.capabilities),
        subscribes=list(spec.subscribes),
        publishes=list(dict.fromkeys(topics)),
        state=list(spec.state),
        peer_capabilities=[t.capability for t in direct if t.capability],
        peer_agents=[t.agent for t in direct if t.agent],
        durable_peer_capabilities=[t.capability for t in durable if t.capability],
        durable_peer_agents=[t.agent for t in durable if t.agent],
        sessions=spec.session is not None,
    )


def principals(
    agents: Sequence[AgentSpec],
    subjects: Subjects,
    *,
    services: Sequence[str] = SERVICES,
    task_timeout_s: float = 600.0,
) -> list[Principal]:
    """Every principal of a deployment: the services named, then one per agent name."""
    unknown = set(services) - set(SERVICES)
    if unknown:
        raise ConfigError(f"unknown services {sorted(unknown)}; known: {list(SERVICES)}")
    found: list[Principal] = []
    for role in services:
        if role == "coordinator":
            perms = permissions.coordinator(subjects, principal=role)
        elif role == "orchestrator":
            perms = permissions.orchestrator(subjects, principal=role)
        elif role == "gateway":
            perms = permissions.gateway(subjects, principal=role)
        elif role == "observer":
            perms = permissions.observer(subjects, principal=role)
        else:
            perms = permissions.operator()
        found.append(Principal(name=role, role=role, permissions=perms))
    seen: dict[str, AgentSpec] = {}
    for spec in agents:
        if spec.name in seen:
            if seen[spec.name] != spec:
                raise ConfigError(f"two different specs name the agent {spec.name!r}")
            continue
        seen[spec.name] = spec
        name = agent_principal_name(spec.name)
        perms = permissions.agent(
            grant_of(spec),
            subjects,
            principal=name,
            reply_within_s=int(task_timeout_s) + REPLY_MARGIN_S,
        )
        found.append(Principal(name=name, role="agent", permissions=perms, agent=spec.name))
    return found
