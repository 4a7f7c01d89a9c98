"""Runs and workflows: run records and their steps (KV `<prefix>-runs`), progress on
`<prefix>.run.<run>.<kind>`, run requests and cancels, supervisor plans."""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec

from chorus.messages.agents import Event, ToolCallRecord
from chorus.messages.codec import Message, Usage, new_id, now
from chorus.specs.budget import RunBudget
from chorus.specs.workflow import WorkflowKind, WorkflowSpec, expected_steps

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
    "run_waiting",
    "step_waiting",
]
RunStatus = Literal["pending", "running", "waiting", "completed", "failed", "cancelled"]
StepStatus = Literal["pending", "running", "waiting", "completed", "failed", "skipped", "cancelled"]
FINISHED_RUN: Final[frozenset[str]] = frozenset({"completed", "failed", "cancelled"})
ENDED_STEP: Final[frozenset[str]] = frozenset({"completed", "skipped", "failed", "cancelled"})


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
    model: str = ""  # the model that gave the answer
    by_model: dict[str, Usage] = {}

    @property
    def succeeded(self) -> bool:
        return self.status == "completed"


class RunFields(Message, tag="run_fields", kw_only=True):
    """What a run's head and its whole record share (not sent on its own)."""

    run_id: str
    kind: WorkflowKind
    status: RunStatus = "pending"
    input: str = ""
    data: Any = None
    output: str = ""
    output_data: Any = None
    error: str = ""
    plan: DelegationPlan | None = None  # hierarchical runs
    usage: Usage = Usage()  # the sum of every finished step's
    steps_done: int = 0  # completed or skipped
    steps_total: int = 0  # step records so far
    created_at: float = msgspec.field(default_factory=now)
    started_at: float = 0.0
    ended_at: float = 0.0
    updated_at: float = 0.0
    # The W3C trace context the run belongs to (its submitter's span, or its first run
    # span), so a resumed run continues the same trace.
    traceparent: str = ""
    # Spend: usage by model (summed from the steps), the run's budget, what its budget
    # account was charged (every model call of its tasks and of the work they delegated,
    # failed ones included), and the code of the error that ended it.
    by_model: dict[str, Usage] = {}
    budget: RunBudget | None = None
    charged: Usage | None = None
    code: str = ""

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_RUN


class RunHead(RunFields, tag="run_head"):
    """A run's head (KV `<prefix>-runs`, key = run id): small and of fixed size however many
    steps the run has, so it can be saved as often as the run's status and summary change.
    Lists of runs are lists of heads."""

    workflow_name: str = ""
    steps_expected: int = 0  # known from the workflow (0: not known yet, e.g. a plan's)


class RunRecord(RunFields, tag="run_record", kw_only=True):
    """A whole run, assembled from its head, its workflow, its steps and its events (each
    stored under its own key): enough for any orchestrator to resume it."""

    workflow: WorkflowSpec
    steps: list[StepRecord] = []
    events: list[Event] = []  # event-driven runs: the chain of events of this run

    def step(self, name: str) -> StepRecord | None:
        return next((s for s in self.steps if s.name == name), None)

    def head(self) -> RunHead:
        shared = {f: getattr(self, f) for f in RunFields.__struct_fields__}
        return RunHead(
            **shared,
            workflow_name=self.workflow.name,
            steps_expected=expected_steps(self.workflow) or 0,
        )

    @classmethod
    def assemble(
        cls,
        head: RunHead,
        workflow: WorkflowSpec,
        steps: list[StepRecord],
        events: list[Event],
    ) -> RunRecord:
        shared = {f: getattr(head, f) for f in RunFields.__struct_fields__}
        return cls(**shared, workflow=workflow, steps=steps, events=events)


def step_counts(record: RunRecord | RunHead) -> tuple[int, int]:
    """(done, total) steps of a run, from a whole record or a head's summary, as every view
    shows them: done is completed or skipped; the total is what the workflow (or a
    hierarchical run's plan: plan, subtasks, compile) has, or the steps recorded if more."""
    if isinstance(record, RunRecord):
        done = sum(s.status in ("completed", "skipped") for s in record.steps)
        total = expected_steps(record.workflow) or 0
    else:
        done, total = record.steps_done, record.steps_expected
    if record.plan is not None:
        total = len(record.plan.subtasks) + 2
    return done, max(total, record.steps_total)


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
    budget: RunBudget | None = None  # instead of the workflow's own `budget:`


class RunCancel(Message, tag="run_cancel"):
    """Published on `<prefix>.runs.cancel.<run>`: stop the run and record it as cancelled."""

    run_id: str
    reason: str = ""
