"""HTTP gateway bodies: JSON over HTTP only, never on NATS, so untagged."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from chorus.messages import AgentRecord, RunHead, RunStatus


class ApiError(msgspec.Struct, frozen=True, kw_only=True):
    code: str  # a ChorusError code, or an HTTP one (`method_not_allowed`, `internal_error`)
    reason: str


class ApiErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    """Every gateway error: `{"error": {"code": ..., "reason": ...}}`."""

    error: ApiError


class RunLinks(msgspec.Struct, frozen=True, kw_only=True):
    run: str  # where to read the run: `/api/runs/<id>`


class RunAccepted(msgspec.Struct, frozen=True, kw_only=True):
    """A run taken but not finished yet (HTTP 202): its status now and where to follow it."""

    run_id: str
    status: RunStatus
    links: RunLinks


class RunList(msgspec.Struct, frozen=True, kw_only=True):
    runs: list[RunHead]  # the most recent first


class HealthReport(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """`GET /api/health`: `ok` needs a coordinator answering and at least one healthy agent."""

    status: Literal["ok", "degraded", "unavailable"]
    nats: Literal["connected", "reconnecting", "closed"]
    coordinator: Literal["ok", "unreachable", "unknown"]
    healthy_agents: int
    agents: list[AgentRecord]
    error: ApiError | None = None  # why the gateway cannot tell (NATS unreachable)


class TailLine(msgspec.Struct, frozen=True, kw_only=True):
    """One message as the console's tail shows it (`GET /api/tail/stream`, event `message`)."""

    time: str  # ISO 8601 UTC, when the gateway received it
    subject: str
    type: str  # the message's type tag (`event`, `heartbeat`, `stream_chunk`...)
    run: str  # the run it belongs to, "" when none
    agent: str  # the agent or instance it is from or about, "" when none
    summary: str  # one line, as `chorus tail` prints it
    tools: str  # a reply's tool calls condensed (`tools: fetch x2`), "" when none
    data: Any  # the message as JSON (a string, cut, when its JSON is over 20,000 characters)
