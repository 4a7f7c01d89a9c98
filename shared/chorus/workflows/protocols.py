"""The engine's seams: small Protocols the orchestrator can fill with durable implementations.

The engine runs tasks, saves run records, reports progress, publishes and follows events, and
asks which agents run, only through these. `chorus.workflows.runner`, `.store`, `.progress`,
`.events` and `.directory` hold the implementations on NATS.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

from chorus.messages import (
    BudgetAccount,
    Event,
    HumanAnswer,
    HumanWait,
    Result,
    RunProgress,
    RunRecord,
    StepRecord,
    Task,
)
from chorus.specs.budget import RunBudget


class TaskRunner(Protocol):
    """Runs one task on an agent (`task.agent`) or a capability (`task.capability`).

    Raises a ChorusError when the task fails or nobody can take it. A resumed run sends an
    interrupted step again with the same `task_id`, so a durable runner can answer it with the
    outcome it already recorded instead of running it twice.
    """

    async def run(self, task: Task) -> Result: ...


class RunStore(Protocol):
    """Where runs live: a head record, its steps and the events of its chain, each saved on
    its own. Saves are revision-checked: they raise chorus.errors.Conflict when another
    process saved that part since this store loaded (or created) it."""

    async def load(self, run_id: str) -> RunRecord | None:
        """The whole run, steps and events included."""
        ...

    async def save(self, record: RunRecord) -> None:
        """Save the head: everything but the steps and events."""
        ...

    async def save_step(self, run_id: str, index: int, step: StepRecord) -> None: ...

    async def add_event(self, run_id: str, index: int, event: Event) -> None: ...


@runtime_checkable
class WaitStore(Protocol):
    """A run store that can park runs on human steps (chorus.client.runstore.KvRunStore)."""

    async def park(self, wait: HumanWait) -> None: ...

    async def unpark(self, run_id: str) -> None: ...

    async def answer(self, run_id: str, step: str) -> HumanAnswer | None: ...

    async def store_answer(self, answer: HumanAnswer) -> None: ...


class ProgressSink(Protocol):
    """Told about a run as it goes (step started, finished, failed...)."""

    async def publish(self, progress: RunProgress) -> None: ...


class EventSource(Protocol):
    async def next(self, timeout: float) -> Event:
        """The next event of the run; raises TimeoutError after `timeout` seconds."""
        ...


class EventBus(Protocol):
    """Publishes events and follows the events of one run (every event carries its run id)."""

    async def publish(self, event: Event) -> None: ...

    def watch(self, run_id: str, since: float) -> AbstractAsyncContextManager[EventSource]:
        """The run's events published at or after `since` (a Unix time), in order."""
        ...


class AgentDirectory(Protocol):
    async def agents(self) -> Mapping[str, frozenset[str]]:
        """Every running agent's name and its capabilities."""
        ...


class BudgetBook(Protocol):
    """Where runs' budget accounts live (chorus.spend.budgets.BudgetLedger): the engine opens
    a run's when it starts and reads it before each step; agents charge it."""

    async def open_run(self, run_id: str, budget: RunBudget) -> BudgetAccount: ...

    async def run_account(self, run_id: str) -> BudgetAccount | None: ...
