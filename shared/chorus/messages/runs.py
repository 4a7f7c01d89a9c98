"""Runs and workflows: run records and their steps (KV `<prefix>-runs`), progress on
`<prefix>.run.<run>.<kind>`, run requests and cancels, supervisor plans."""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec

from chorus.messages.agents import Event, ToolCallRecord
from chorus.messages.codec import Message, Usage, new_id, now
from chorus.specs.workflow import WorkflowKind, WorkflowSpec

ProgressKind = Literal[
    "run_started",
    "run_resumed",
    "run_completed",
    "run_failed",
    "run_cancelled",
    "step_started",
    "step_retry",
    "step_finished",
    "step_failed",
    "step_skipped",
    "plan_ready",
    "event_seen",
]
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
    tool_calls: list[ToolCallRecord] = []  # of the attempt that answered

    @property
    def succeeded(self) -> bool:
        return self.status == "completed"


class RunRecord(Message, tag="run_record"):
    """A run, saved after every finished step: enough for any orchestrator to resume it."""

    run_id: str
    workflow: WorkflowSpec
    kind: WorkflowKind
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
    """Published as a run goes, on `<prefix>.run.<run>.<kind>`."""

    run_id: str
    kind: ProgressKind
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
