"""The agent protocol: events, tasks and their results or errors, help requests, heartbeats."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from chorus.messages.codec import Message, Usage, decode_any, new_id, now

InstanceState = Literal["ready", "draining", "stopped"]


class Event(Message, tag="event"):
    """Something that happened; published on `<prefix>.event.<topic>`."""

    topic: str
    data: Any = None
    event_id: str = msgspec.field(default_factory=new_id)
    source: str = ""
    run_id: str = ""
    time: float = msgspec.field(default_factory=now)
    # Tokens the emitting agent spent reacting to the event that led to this one (set on
    # the first event an event handler emits), so an event-driven run can count them.
    usage: Usage = Usage()


class Task(Message, tag="task"):
    """Work for an agent, sent to an instance, a capability, or through the durable queue."""

    input: str
    task_id: str = msgspec.field(default_factory=new_id)
    instructions: str = ""
    data: Any = None
    context: dict[str, Any] = {}
    json_schema: dict[str, Any] | None = None
    capability: str = ""
    agent: str = ""  # target an agent by name instead of a capability
    run_id: str = ""
    step: str = ""
    attempt: int = 1
    depth: int = 0  # agents-as-tools hops that led here (0: asked by a person or a workflow)
    # A conversation session: the agent loads its history and appends this turn to it.
    session_id: str = ""
    # Set on the task that resumes a parked one (same task id): the approval just decided.
    resume: str = ""


MAX_RECORDED_CHARS = 2000  # of a tool call's arguments and output kept on the record


def truncated(text: str, limit: int = MAX_RECORDED_CHARS) -> str:
    """`text`, cut to `limit` characters with a marker saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [truncated, {len(text)} chars]"


class ToolCallRecord(msgspec.Struct, kw_only=True):
    """One tool call an agent's model made while it worked on a task, as done."""

    name: str
    call_id: str
    arguments: str = "{}"  # JSON text, as the model wrote it (truncated)
    output: str = ""  # what the model was given back (truncated); empty when it failed
    error: str = ""  # why the call failed (the model saw `{"error": ...}`)
    duration_ms: float = 0.0
    instance: str = ""  # the instance that served a peer call; empty for a local tool
    turn: int = 1  # the loop's model turn that asked for it
    # For a call that waited for a person: approved | rejected | expired, and the approval.
    approval: str = ""
    approval_id: str = ""


class Result(Message, tag="result"):
    """A finished task."""

    task_id: str
    agent: str
    instance: str
    output: str
    data: Any = None
    usage: Usage = Usage()
    duration_ms: float = 0.0
    events: list[Event] = []
    tool_calls: list[ToolCallRecord] = []
    # Side-effect tool calls of this task that may or may not have happened (their instance
    # died mid-call; nothing reconciled them): the effect ledger's keys.
    in_doubt: list[str] = []
    # The model that gave the final answer (a fallback's, when the first could not; the
    # spec's `model:` otherwise, for token metrics by model), and this agent's own model
    # calls by model (delegated work is in `usage` only).
    model: str = ""
    by_model: dict[str, Usage] = {}
    # Not an answer yet: the task is parked until these approvals are decided (ids), at the
    # latest `waiting_until` (ISO 8601), then resumed by a task with `resume` set.
    waiting_for: list[str] = []
    waiting_until: str = ""


class ErrorReply(Message, tag="error"):
    """What a process answers instead of a result: a stable code and a readable reason."""

    code: str
    reason: str
    task_id: str = ""
    instance: str = ""
    tool_calls: list[ToolCallRecord] = []  # what the agent's loop did before it failed


class HelpRequest(Message, tag="help_request"):
    """One agent asking any agent with a capability for help."""

    capability: str
    question: str
    data: Any = None
    requester: str = ""
    run_id: str = ""
    request_id: str = msgspec.field(default_factory=new_id)


class HelpReply(Message, tag="help_reply"):
    request_id: str
    answer: str
    helper: str
    instance: str
    data: Any = None
    usage: Usage = Usage()


class Heartbeat(Message, tag="heartbeat"):
    """Published by every agent instance on a fixed interval; the registry is built from it."""

    instance: str
    name: str
    capabilities: list[str]
    in_flight: int
    max_concurrency: int
    processed: int
    failed: int
    mean_latency_ms: float
    interval_s: float
    started_at: float
    sent_at: float = msgspec.field(default_factory=now)
    state: InstanceState = "ready"
    waiting: int = 0
    usage: Usage = Usage()  # tokens used by this instance since it started
    version: str = ""
    # Ids of the tasks the instance holds (received, not yet answered), so a dispatcher can
    # tell a task that never arrived or whose reply was lost from one still running. None:
    # the instance does not say (an older version, or more than MAX_LISTED_TASKS).
    tasks: list[str] | None = None


MAX_LISTED_TASKS = 256  # a heartbeat lists at most this many held tasks, or none


class AgentInfo(Message, tag="agent_info"):
    """What an instance says about itself in its `$SRV` metadata and at start-up."""

    instance: str
    name: str
    capabilities: list[str]
    max_concurrency: int
    subscribes: list[str]
    model: str
    started_at: float


_REPLIES: dict[type[Message], object] = {
    Result: Result | ErrorReply,
    HelpReply: HelpReply | ErrorReply,
}


def decode_result(data: bytes) -> Result | ErrorReply:
    """A task's reply: its Result, or the ErrorReply the instance sent instead."""
    reply: Result | ErrorReply = decode_any(data, _REPLIES[Result])
    return reply


def decode_help(data: bytes) -> HelpReply | ErrorReply:
    reply: HelpReply | ErrorReply = decode_any(data, _REPLIES[HelpReply])
    return reply
