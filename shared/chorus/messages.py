"""Every message on the wire, as msgspec Structs encoded to JSON.

Unknown fields are ignored so older processes read newer messages. Each message carries a
`type` tag; when a message is decoded as one expected type the tag may be left out, which
keeps hand-written payloads (`chorus req`, `nats req`) short.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Final, Literal, TypeVar

import msgspec

from chorus.errors import InvalidMessage
from chorus.workflows.spec import WorkflowSpec

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
    usage: Usage = Usage()  # tokens used by this instance since it started
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
    usage: Usage = Usage()


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


# Runs and workflows (KV `<prefix>-runs`, key = run id; progress on `<prefix>.run.<run>.<kind>`)

RunStatus = Literal["pending", "running", "completed", "failed", "cancelled"]
StepStatus = Literal["pending", "running", "completed", "failed", "skipped", "cancelled"]
FINISHED_RUN: Final[frozenset[str]] = frozenset({"completed", "failed", "cancelled"})


class Subtask(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One piece of a supervisor's plan. All fields required, unknown ones refused: the JSON
    schema then suits strict structured output, and a sloppy plan is caught, not guessed at."""

    id: str
    description: str
    capabilities: list[str]
    depends_on: list[str]


class DelegationPlan(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a supervisor answers when asked to plan (`Result.data`)."""

    subtasks: list[Subtask]


class SubtaskResult(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    description: str
    agent: str
    output: str
    data: Any = None


class PlanResults(msgspec.Struct, frozen=True, kw_only=True):
    """`Task.data` of the supervisor's final task: the goal and every subtask's result."""

    goal: str
    results: list[SubtaskResult]


class StepRecord(msgspec.Struct, kw_only=True):
    """One step, task or subtask of a run, as checkpointed in the run record."""

    name: str
    status: StepStatus = "pending"
    agent: str = ""  # asked for by name, or the agent that answered
    capability: str = ""
    instance: str = ""
    input: str = ""
    output: str = ""
    data: Any = None
    error: str = ""
    code: str = ""  # the error's code
    attempts: int = 0
    started_at: float = 0.0
    ended_at: float = 0.0
    duration_ms: float = 0.0
    usage: Usage = Usage()

    @property
    def succeeded(self) -> bool:
        return self.status == "completed"


class RunRecord(Message, tag="run_record"):
    """A run, saved after every finished step: enough for any orchestrator to resume it."""

    run_id: str
    workflow: WorkflowSpec
    kind: str  # the workflow's type: pipeline | parallel | event | hierarchical | process
    status: RunStatus = "pending"
    input: str = ""
    data: Any = None
    steps: list[StepRecord] = []
    output: str = ""
    output_data: Any = None
    error: str = ""
    plan: DelegationPlan | None = None  # hierarchical runs
    events: list[Event] = []  # event-driven runs: the chain of events of this run
    usage: Usage = Usage()  # the sum of every step's
    created_at: float = msgspec.field(default_factory=now)
    started_at: float = 0.0
    ended_at: float = 0.0
    updated_at: float = 0.0

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_RUN

    def step(self, name: str) -> StepRecord | None:
        return next((s for s in self.steps if s.name == name), None)


class RunProgress(Message, tag="run_progress"):
    """Published as a run goes, on `<prefix>.run.<run>.<kind>`.

    kind: run_started, run_resumed, step_started, step_finished, step_failed, step_skipped,
    plan_ready, event_seen, run_completed, run_failed, run_cancelled.
    """

    run_id: str
    kind: str
    workflow: str = ""
    step: str = ""
    detail: str = ""
    time: float = msgspec.field(default_factory=now)


class RunRequest(Message, tag="run_request"):
    """Ask for a run: a workflow given inline, or the name of a stored one."""

    run_id: str = msgspec.field(default_factory=new_id)
    workflow: WorkflowSpec | None = None
    workflow_name: str = ""
    input: str = ""
    data: Any = None


class RunCancel(Message, tag="run_cancel"):
    """Published on `<prefix>.runs.cancel.<run>`: stop the run and record it as cancelled."""

    run_id: str
    reason: str = ""


# HTTP gateway bodies (chorus.gateway): JSON over HTTP only, never on NATS, so untagged


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
    runs: list[RunRecord]  # the most recent first


class HealthReport(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """`GET /api/health`: `ok` needs a coordinator answering and at least one healthy agent."""

    status: Literal["ok", "degraded", "unavailable"]
    nats: Literal["connected", "reconnecting", "closed"]
    coordinator: Literal["ok", "unreachable", "unknown"]
    healthy_agents: int
    agents: list[AgentRecord]
    error: ApiError | None = None  # why the gateway cannot tell (NATS unreachable)
