"""One run in progress: its record, the services it uses, and the step machinery every pattern
shares (dispatch with retries and timeouts, checkpoint, progress, the expression context)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors

from chorus.errors import BudgetExceeded, ChorusError, RequestTimeout
from chorus.messages import (
    ENDED_STEP,
    Event,
    ProgressKind,
    Result,
    RunProgress,
    RunRecord,
    StepRecord,
    StepStatus,
    Task,
    Usage,
    encode,
    now,
)
from chorus.nats.connection import raise_if_cancelled
from chorus.specs.workflow import Target
from chorus.workflows.observed import StepSpans
from chorus.workflows.protocols import (
    AgentDirectory,
    BudgetBook,
    EventBus,
    ProgressSink,
    RunStore,
    TaskRunner,
)

log = logging.getLogger("chorus.workflows")

Processor = Callable[[StepRecord], Any]
"""A Python output processor: gets the finished step, returns the text to pass on (a str, or
any other value, passed on as JSON). May be a coroutine function."""

Finish = Callable[[StepRecord, Result], Awaitable[None]]


@dataclass(frozen=True)
class Services:
    """What a run may use. Only `runner` and `store` are needed by every pattern."""

    runner: TaskRunner
    store: RunStore
    progress: ProgressSink
    events: EventBus | None = None
    directory: AgentDirectory | None = None
    processors: Mapping[str, Processor] = field(default_factory=dict)
    budgets: BudgetBook | None = None  # needed by runs with a budget


class StepFailed(Exception):
    """A step failed after its last attempt; the step record says why. Patterns decide what
    that means for the run."""

    def __init__(self, step: StepRecord) -> None:
        super().__init__(step.error)
        self.step = step


async def together(work: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run coroutines at once; the first error cancels the rest and is raised as itself (not
    wrapped in an ExceptionGroup), so the engine can tell a Conflict from a failure."""
    try:
        async with asyncio.TaskGroup() as group:
            for coroutine in work:
                group.create_task(coroutine)
    except BaseExceptionGroup as errors:
        for extra in errors.exceptions[1:]:
            log.warning("also failed", extra={"error": repr(extra)})
        raise errors.exceptions[0] from None


def _by_model(
    total: dict[str, Usage], add: Mapping[str, Usage], remove: Mapping[str, Usage]
) -> dict[str, Usage]:
    out = dict(total)
    for model, usage in add.items():
        out[model] = out.get(model, Usage()) + usage
    for model, usage in remove.items():
        out[model] = out.get(model, Usage()) - usage
    return {m: u for m, u in out.items() if u != Usage()}


def task_id(run_id: str, step: str, attempt: int) -> str:
    """Stable per attempt: a resumed run sends an interrupted attempt again under the same id."""
    return f"{run_id}-{step}-{attempt}"


class Run:
    """A run record and the ways to advance it. One engine task owns it at a time."""

    def __init__(self, record: RunRecord, services: Services) -> None:
        self.record = record
        self.services = services
        # Parallel steps finish together: their own keys save at once, the head one at a time.
        self._head_lock = asyncio.Lock()
        self._saved_head = b""  # the head as last saved: saved again only when it changed
        self._index = {id(step): n for n, step in enumerate(record.steps)}
        self._by_name = {step.name: step for step in record.steps}  # not a scan per lookup
        # What each step adds to the head's summary (done, usage), kept so a checkpoint
        # updates the summary from the steps it saves instead of summing over every step.
        self._counted: dict[int, tuple[bool, Usage, dict[str, Usage]]] = {}
        record.steps_done, record.usage, record.by_model = 0, Usage(), {}
        for step in record.steps:
            self._count(step)
        self._spans = StepSpans(record.workflow.name)

    @property
    def run_id(self) -> str:
        return self.record.run_id

    def find(self, name: str) -> StepRecord | None:
        """The step's record, None when the run has none yet."""
        return self._by_name.get(name)

    def step(self, name: str) -> StepRecord:
        """The step's record, added (pending) when the run has none yet."""
        existing = self._by_name.get(name)
        if existing is not None:
            return existing
        step = StepRecord(name=name)
        self._index[id(step)] = len(self.record.steps)
        self._by_name[name] = step
        self.record.steps.append(step)
        return step

    def done(self, name: str) -> StepRecord | None:
        """The step's record when it already completed (so a resumed run skips it)."""
        step = self._by_name.get(name)
        return step if step is not None and step.status in ("completed", "skipped") else None

    def context(self) -> dict[str, Any]:
        """What conditions and templates can read: the run's input and data, finished steps."""
        steps = {
            s.name: {
                "output": s.output,
                "data": s.data,
                "status": s.status,
                "agent": s.agent,
                "instance": s.instance,
                "error": s.error,
            }
            for s in self.record.steps
            if s.status in ("completed", "skipped", "failed")
        }
        return {"input": self.record.input, "data": self.record.data, "steps": steps}

    async def checkpoint(self, *steps: StepRecord) -> None:
        """Save `steps` (each under its own key) and, at the same time, the run's head when
        it changed; every save is revision-checked. Every finished step is saved before the
        next starts."""
        store = self.services.store
        copies = []
        for step in steps:
            self._count(step)
            copies.append((self._index[id(step)], msgspec.structs.replace(step)))
        await asyncio.gather(
            *(store.save_step(self.run_id, index, copy) for index, copy in copies),
            self._save_head(),
        )

    def _count(self, step: StepRecord) -> None:
        record = self.record
        done = step.status in ("completed", "skipped")
        ended = step.status in ENDED_STEP
        usage = step.usage if ended else Usage()
        by_model = step.by_model if ended else {}
        was_done, was_usage, was_by_model = self._counted.get(id(step), (False, Usage(), {}))
        record.steps_done += int(done) - int(was_done)
        record.usage = record.usage + usage - was_usage
        if by_model or was_by_model:
            record.by_model = _by_model(record.by_model, by_model, was_by_model)
        record.steps_total = len(record.steps)
        self._counted[id(step)] = (done, usage, dict(by_model))

    async def _save_head(self) -> None:
        async with self._head_lock:  # the head's revision moves one save at a time
            head = encode(msgspec.structs.replace(self.record, steps=[], events=[], updated_at=0))
            if head == self._saved_head:
                return
            self.record.updated_at = now()
            await self.services.store.save(self.record)
            self._saved_head = head

    async def add_event(self, event: Event) -> None:
        """Add an event to the run's chain and save it (written once, under its own key)."""
        self.record.events.append(event)
        await self.services.store.add_event(self.run_id, len(self.record.events) - 1, event)

    async def report(self, kind: ProgressKind, step: str = "", detail: str = "") -> None:
        progress = RunProgress(
            run_id=self.run_id,
            kind=kind,
            workflow=self.record.workflow.name,
            step=step,
            detail=detail,
        )
        try:
            await self.services.progress.publish(progress)
        except nats.errors.Error as exc:
            # Progress is a live view; the record in the store is the account that matters.
            log.warning("progress not published", extra={"run_id": self.run_id, "error": repr(exc)})

    async def perform(
        self,
        name: str,
        target: Target,
        task_input: str,
        *,
        instructions: str = "",
        data: Any = None,
        json_schema: dict[str, Any] | None = None,
        finish: Finish | None = None,
    ) -> StepRecord:
        """Run one step's task with the target's retries and timeout; checkpoint its outcome.

        `finish` turns the result into the step's final form (parse a plan, apply an output
        processor); when it raises a ChorusError the attempt counts as failed. Raises
        StepFailed when the last attempt failed.
        """
        step = self.step(name)
        step.agent, step.capability, step.input = target.agent, target.capability, task_input
        # A step left `running` by an interrupted engine: send the same attempt again.
        resend = step.status == "running" and step.attempts > 0
        step.started_at = step.started_at or now()
        if await self._budget_spent(step):
            return step  # skipped: the run wraps up with what it has
        while True:
            if not resend:
                step.attempts += 1
            resend = False
            step.status, step.error, step.code = "running", "", ""
            # Saved while the task goes out (the save copies the step before the first
            # await), and waited for before the outcome is saved: one write fewer on the
            # critical path of every step.
            saving = asyncio.ensure_future(self.checkpoint(step))
            await self.report("step_started", name, f"{target.target}, attempt {step.attempts}")
            task = Task(
                task_id=task_id(self.run_id, name, step.attempts),
                input=task_input,
                instructions=instructions or target.instructions,
                data=data,
                json_schema=json_schema,
                agent=target.agent,
                capability=target.capability,
                run_id=self.run_id,
                step=name,
                attempt=step.attempts,
            )
            try:
                try:
                    result = await self._dispatch(task, target.timeout)
                finally:
                    await saving  # a Conflict here wins: another process owns the run
                step.agent, step.instance = result.agent, result.instance
                step.output, step.data, step.usage = result.output, result.data, result.usage
                step.tool_calls = result.tool_calls
                step.model, step.by_model = result.model, result.by_model
                if finish is not None:
                    await finish(step, result)
            except ChorusError as exc:
                step.error, step.code = exc.reason, exc.code
                # Another attempt of a step whose budget is spent would be refused too.
                if step.attempts <= target.retries and exc.code != BudgetExceeded.code:
                    log.warning(
                        "step attempt failed, retrying",
                        extra={"run_id": self.run_id, "step": name, "error": exc.reason},
                    )
                    await self.report("step_retry", name, exc.reason)
                    continue
                self.end_step(step, "failed")
                await self.checkpoint(step)
                await self.report("step_failed", name, exc.reason)
                raise StepFailed(step) from None
            break
        self.end_step(step, "completed")
        await self.checkpoint(step)
        await self.report("step_finished", name, f"{step.agent} in {step.duration_ms:.0f} ms")
        return step

    async def _budget_spent(self, step: StepRecord) -> bool:
        """Before a step: when the run's budget is spent, policy `stop` fails the step
        (StepFailed, code budget_exceeded) and `wrap_up` skips it (True)."""
        budgets = self.services.budgets
        if self.record.budget is None or budgets is None:
            return False
        account = await budgets.run_account(self.run_id)
        if account is None or not account.exhausted:
            return False
        reason = f"not started: the run's budget is spent ({account.describe()})"
        if account.policy == "wrap_up":
            await self.skip(step.name, reason)
            return True
        step.error, step.code = reason, BudgetExceeded.code
        self.end_step(step, "failed")
        await self.checkpoint(step)
        await self.report("step_failed", step.name, reason)
        raise StepFailed(step)

    async def skip(self, name: str, reason: str) -> None:
        step = self.step(name)
        step.error = reason
        step.started_at = step.started_at or now()
        self.end_step(step, "skipped")
        await self.checkpoint(step)
        await self.report("step_skipped", name, reason)

    async def fail(self, name: str, reason: str) -> None:
        """Record a step as failed without running it (a requirement was not met)."""
        step = self.step(name)
        step.error, step.code = reason, "run_failed"
        step.started_at = step.started_at or now()
        self.end_step(step, "failed")
        await self.checkpoint(step)
        await self.report("step_failed", name, reason)

    @staticmethod
    def end_step(step: StepRecord, status: StepStatus) -> None:
        step.status = status
        step.ended_at = now()
        step.duration_ms = round((step.ended_at - step.started_at) * 1000, 3)

    async def _dispatch(self, task: Task, timeout: float | None) -> Result:
        raise_if_cancelled()  # a cancel swallowed by a library call since the last step
        scope = asyncio.timeout(timeout)
        with self._spans.attempt(task):
            try:
                async with scope:
                    return await self.services.runner.run(task)
            except TimeoutError:
                if scope.expired():
                    raise RequestTimeout(
                        f"no result within the step's timeout of {timeout}s"
                    ) from None
                raise  # NATS itself did not answer: an interruption, not a failed step
