"""Every message on the wire, as msgspec Structs encoded to JSON.

Unknown fields are ignored so older processes read newer messages. Each message carries a
`type` tag; when a message is decoded as one expected type the tag may be left out, which
keeps hand-written payloads (`chorus req`, `nats req`) short.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Final, TypeVar

import msgspec

from chorus.errors import InvalidMessage

# Header names. `Nats-Msg-Id` is JetStream's de-duplication header.
RUN_ID_HEADER: Final = "Chorus-Run-Id"
TASK_ID_HEADER: Final = "Chorus-Task-Id"
TRACEPARENT_HEADER: Final = "traceparent"
MSG_ID_HEADER: Final = "Nats-Msg-Id"
# The NATS micro convention for error replies, set beside the JSON error body.
SERVICE_ERROR_HEADER: Final = "Nats-Service-Error"
SERVICE_ERROR_CODE_HEADER: Final = "Nats-Service-Error-Code"


def new_id() -> str:
    return uuid.uuid4().hex


def now() -> float:
    return time.time()


class Usage(msgspec.Struct, frozen=True):
    """Token usage of one or more model calls."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.total_tokens + other.total_tokens,
        )


class Message(msgspec.Struct, tag_field="type", kw_only=True):
    """Base of all wire messages."""


class Event(Message, tag="event"):
    """Something that happened; published on `<prefix>.event.<topic>`."""

    topic: str
    data: Any = None
    event_id: str = msgspec.field(default_factory=new_id)
    source: str = ""
    run_id: str = ""
    time: float = msgspec.field(default_factory=now)


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


class ErrorReply(Message, tag="error"):
    """What a process answers instead of a result: a stable code and a readable reason."""

    code: str
    reason: str
    task_id: str = ""
    instance: str = ""


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
    state: str = "ready"  # ready | draining | stopped
    waiting: int = 0
    version: str = ""


class AgentInfo(Message, tag="agent_info"):
    """What an instance says about itself in its `$SRV` metadata and at start-up."""

    instance: str
    name: str
    capabilities: list[str]
    max_concurrency: int
    subscribes: list[str]
    model: str
    started_at: float


M = TypeVar("M")

_encoder = msgspec.json.Encoder()
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def encode(message: Any) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes, kind: type[M]) -> M:
    """Decode and validate one message; raise InvalidMessage naming what was wrong."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(data)  # type: ignore[no-any-return]
    except msgspec.DecodeError as exc:
        name = getattr(kind, "__name__", str(kind))
        raise InvalidMessage(f"invalid {name}: {exc}") from None


def reply_type(data: bytes) -> Result | ErrorReply:
    return decode(data, Result | ErrorReply)  # type: ignore[arg-type]


def wire_types() -> list[type[Message]]:
    """Every concrete wire message: the subclasses of Message, wherever in this module."""
    found: list[type[Message]] = []
    pending = list(Message.__subclasses__())
    while pending:
        kind = pending.pop(0)
        found.append(kind)
        pending.extend(kind.__subclasses__())
    return found


def schemas() -> dict[str, Any]:
    """JSON Schema (2020-12) of every wire message, for clients in other languages."""
    kinds = wire_types()
    (_, components) = msgspec.json.schema_components(kinds, ref_template="#/$defs/{name}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Chorus wire messages",
        "$defs": components,
        "oneOf": [{"$ref": f"#/$defs/{t.__name__}"} for t in kinds],
    }


# Coordinator: registry, durable dispatch, metrics


class AgentRecord(Message, tag="agent_record"):
    """One instance in the registry (KV `<prefix>-agents`, key = instance id)."""

    instance: str
    name: str
    capabilities: list[str]
    health: str  # healthy | unhealthy | dead
    state: str  # ready | draining | stopped, as the instance last said
    in_flight: int
    max_concurrency: int
    processed: int
    failed: int
    success_rate: float
    mean_latency_ms: float
    last_seen: float
    started_at: float
    breaker: str = "closed"  # closed | open | half_open


class AgentStatusChange(Message, tag="agent_status"):
    """Published by the coordinator on `<prefix>.status.<instance>.<health>`."""

    instance: str
    name: str
    health: str
    previous: str
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
    """The one recorded outcome of a durable task (KV `<prefix>-tasks`, key `outcome.<id>`)."""

    task_id: str
    status: str  # completed | failed
    result: Result | None = None
    errors: list[AttemptError] = []
    attempts: int = 1
    time: float = msgspec.field(default_factory=now)


class DeadLetter(Message, tag="dead_letter"):
    """A task that failed every attempt, stored on `<prefix>.dlq.<target>`."""

    task: Task
    target: str
    errors: list[AttemptError]
    time: float = msgspec.field(default_factory=now)


class AgentMetrics(msgspec.Struct, frozen=True, kw_only=True):
    instance: str
    name: str
    health: str
    load: int
    max_concurrency: int
    success_rate: float
    mean_latency_ms: float
    breaker: str


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


# Shared state (KV `<prefix>-state`, chorus.state)


class StateEntry(Message, tag="state_entry"):
    """A stored shared-state value with who wrote it and when, so watchers can tell.

    Deletes carry one too (with `value` null) beside the `KV-Operation: DEL` header.
    """

    value: Any = None
    writer: str = ""
    time: float = msgspec.field(default_factory=now)


class LockEntry(Message, tag="lock_entry"):
    """A held lock: key `_lock.<name>` in the state bucket, removed by the server after `ttl_s`."""

    holder: str
    lease_id: str
    ttl_s: float
    acquired_at: float = msgspec.field(default_factory=now)
    # The fencing token: the revision the lease was acquired at. 0 in that first write itself.
    token: int = 0
