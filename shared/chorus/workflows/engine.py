"""The workflow engine: runs a run record to its end, step by step, checkpointed.

    engine = await Engine.on_nats(client)
    handle = engine.start(new_record(load_workflow("report.yaml"), "What is NATS?"))
    record = await handle                  # completed, failed or cancelled

Every finished step is saved before the next starts. Interrupting is not cancelling:

- Cancelling the asyncio task that runs a record (an orchestrator shutting down, or dying)
  saves nothing more. The record stays `running` with its finished steps, and any engine can
  resume it with `engine.run(await store.load(run_id))`: finished steps are not run again, an
  interrupted one is sent again under the same task id.
- `RunHandle.cancel()` (or a `RunCancel` message, see `cancel_requests`) ends the run for
  good: status `cancelled`, saved, `run_cancelled` published.
- A human step without an answer parks the run (chorus.workflows.human): it is saved
  `waiting` and the handle returns that record; a `RunResume` takes it up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Generator, Mapping
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.client import ChorusClient
from chorus.client.runstore import KvRunStore
from chorus.errors import BudgetExceeded, ChorusError, Conflict, InvalidMessage
from chorus.messages import (
    ProgressKind,
    RunCancel,
    RunRecord,
    RunStatus,
    StepRecord,
    decode,
    new_id,
    now,
)
from chorus.specs.budget import RunBudget
from chorus.specs.workflow import WorkflowSpec, load_workflow
from chorus.spend.budgets import BudgetLedger
from chorus.subjects import Subjects, check_token
from chorus.workflows.directory import DiscoveryDirectory
from chorus.workflows.events import NatsEventBus
from chorus.workflows.human import RunParked
from chorus.workflows.observed import traced_run
from chorus.workflows.patterns import execute
from chorus.workflows.processors import check_processors
from chorus.workflows.progress import NatsProgress, NoProgress
from chorus.workflows.protocols import (
    AgentDirectory,
    BudgetBook,
    EventBus,
    ProgressSink,
    RunStore,
    TaskRunner,
)
from chorus.workflows.run import Processor, Run, Services
from chorus.workflows.runner import DirectRunner

log = logging.getLogger("chorus.workflows")

OUTPUT_PREVIEW = 2_000
OUTPUT_CUT_NOTE = " [cut: the whole output is over the server's max_payload; see each step's]"

FINISHED_PROGRESS: dict[RunStatus, ProgressKind] = {
    "completed": "run_completed",
    "failed": "run_failed",
    "cancelled": "run_cancelled",
}


def new_record(
    workflow: WorkflowSpec,
    input: str = "",
    *,
    data: Any = None,
    run_id: str | None = None,
    budget: RunBudget | None = None,
) -> RunRecord:
    """A pending run of `workflow`; `data` is structured input that conditions can read;
    `budget` replaces the workflow's own.

    The run id goes into subjects and keys: letters, digits, `-` and `_` only.
    """
    return RunRecord(
        run_id=check_token(run_id, "run id") if run_id else new_id(),
        workflow=workflow,
        kind=workflow.kind,
        input=input,
        data=msgspec.to_builtins(data),
        budget=budget or workflow.budget,
    )


class RunHandle:
    """A run the engine is advancing. Await it for the finished record."""

    def __init__(self, engine: Engine, record: RunRecord) -> None:
        self.record = record
        self.reason: str | None = None  # set by cancel()
        self._task = asyncio.create_task(
            traced_run(engine._drive(self), record), name=f"run-{record.run_id}"
        )

    @property
    def run_id(self) -> str:
        return self.record.run_id

    def cancel(self, reason: str = "cancelled on request") -> bool:
        """End the run for good (status `cancelled`). False when it had already finished."""
        if self._task.done():
            return False
        self.reason = reason
        self._task.cancel()
        return True

    def interrupt(self) -> None:
        """Stop advancing the run without recording anything: another engine may resume it."""
        self._task.cancel()

    def done(self) -> bool:
        return self._task.done()

    async def wait(self) -> RunRecord:
        return await self._task

    def __await__(self) -> Generator[Any, None, RunRecord]:
        return self._task.__await__()


class Engine:
    """Runs workflows through the five patterns, using only the given services."""

    def __init__(
        self,
        runner: TaskRunner,
        store: RunStore,
        *,
        progress: ProgressSink | None = None,
        events: EventBus | None = None,
        directory: AgentDirectory | None = None,
        processors: Mapping[str, Processor] | None = None,
        budgets: BudgetBook | None = None,
    ) -> None:
        self.services = Services(
            runner=runner,
            store=store,
            progress=progress or NoProgress(),
            events=events,
            directory=directory,
            processors=dict(processors or {}),
            budgets=budgets,
        )
        self._runs: dict[str, RunHandle] = {}

    @classmethod
    async def on_nats(
        cls, client: ChorusClient, *, processors: Mapping[str, Processor] | None = None
    ) -> Engine:
        """An engine with the NATS implementations: direct request-reply tasks, records in the
        runs bucket, progress on `<prefix>.run.<run>.<kind>`, events through the stream."""
        return cls(
            DirectRunner(client),
            await KvRunStore.open(client.nc.jetstream(), client.subjects),
            progress=NatsProgress(client.nc, client.subjects),
            events=NatsEventBus(client),
            directory=DiscoveryDirectory(client),
            processors=processors,
            budgets=await BudgetLedger.open(client.nc.jetstream(), client.subjects),
        )

    def start(self, record: RunRecord) -> RunHandle:
        """Start (or resume) advancing `record` in a task of its own."""
        if record.run_id in self._runs:
            raise Conflict(f"run {record.run_id} is already running in this engine")
        handle = RunHandle(self, record)
        self._runs[record.run_id] = handle
        handle._task.add_done_callback(lambda _: self._runs.pop(record.run_id, None))
        return handle

    async def run(self, record: RunRecord) -> RunRecord:
        """Advance `record` to its end. Cancelling the caller interrupts the run (see module)."""
        return await self.start(record)

    @property
    def running(self) -> list[RunHandle]:
        return list(self._runs.values())

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Interrupt every run (they stay resumable) and wait for their tasks to end."""
        handles = list(self._runs.values())
        for handle in handles:
            handle.interrupt()
        if handles:
            await asyncio.wait([h._task for h in handles], timeout=timeout)

    async def _drive(self, handle: RunHandle) -> RunRecord:
        run = Run(handle.record, self.services)
        try:
            if not handle.record.finished:
                await self._advance(run)
            return handle.record
        except asyncio.CancelledError:
            if handle.reason is None:
                log.info("run interrupted", extra={"run_id": run.run_id})
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            stopped = [s for s in run.record.steps if s.status == "running"]
            for step in stopped:
                run.end_step(step, "cancelled")
            await self._finish(run, "cancelled", handle.reason, *stopped)
            return handle.record

    async def _advance(self, run: Run) -> None:
        record = run.record
        resumed = record.started_at > 0
        record.status, record.error = "running", ""
        record.started_at = record.started_at or now()
        await self._open_budget(run)
        await run.checkpoint()
        await run.report("run_resumed" if resumed else "run_started", detail=record.kind)
        log.info(
            "run resumed" if resumed else "run started",
            extra={"run_id": record.run_id, "workflow": record.workflow.name},
        )
        try:
            check_processors(record.workflow, self.services.processors)
            await execute(run)
        except Conflict:
            raise  # another process owns the record now: save nothing more
        except RunParked as parked:
            # Saved `waiting`: an answer (or its timeout) resumes it, on any orchestrator.
            await run.report("run_waiting", parked.step, "waiting for an answer")
        except ChorusError as exc:
            await self._finish(run, "failed", exc.reason, code=exc.code)
        except nats.errors.MaxPayloadError:
            # One step (or the head) outgrew the server's max_payload: retrying cannot help.
            # Keep what fits (statuses, errors, short outputs) and fail the run saying why.
            large = [s for s in record.steps if len(s.output) > 200 or s.data is not None]
            for step in large:
                step.output, step.data = step.output[:200], None
            record.output, record.output_data = record.output[:200], None
            await self._finish(
                run,
                "failed",
                "a step's output grew past the NATS server's max_payload (1 MiB by default): "
                "return shorter outputs, or put large results in the state store",
                *large,
            )
        except (nats.errors.Error, TimeoutError, ConnectionError):
            # NATS is away (a restart, a network cut): the run is interrupted, not failed. Its
            # record keeps the finished steps; the orchestrator hands it back to be resumed.
            log.warning("run interrupted: NATS unavailable", extra={"run_id": record.run_id})
            raise
        except Exception as exc:
            log.exception("run failed on an internal error", extra={"run_id": record.run_id})
            await self._finish(run, "failed", f"internal error: {type(exc).__name__}: {exc}")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # SystemExit, KeyboardInterrupt... raised by code a run called: out of a task they
            # would end the event loop, and the unacked run would end the next process too.
            log.error("run failed on %s", type(exc).__name__, extra={"run_id": record.run_id})
            await self._finish(run, "failed", f"internal error: {type(exc).__name__}: {exc}")
        else:
            await self._finish(run, "completed", "")

    async def _open_budget(self, run: Run) -> None:
        budget, budgets = run.record.budget, self.services.budgets
        if budget is None:
            return
        if budgets is None:
            raise ChorusError(
                f"run {run.run_id} has a budget but this engine keeps none: give it a "
                "BudgetLedger (Engine.on_nats does)"
            )
        await budgets.open_run(run.run_id, budget)

    async def _charge(self, run: Run, status: RunStatus, error: str, code: str) -> tuple[str, str]:
        """Record what the run's budget account was charged; a failed run whose budget is
        spent failed for that (code budget_exceeded), whatever step reported it."""
        record, budgets = run.record, self.services.budgets
        if record.budget is None or budgets is None:
            return error, code
        account = await budgets.run_account(run.run_id)
        if account is None:
            return error, code
        record.charged = account.spent
        if status == "failed" and account.exhausted:
            return f"budget exceeded: {account.describe()}; {error}", BudgetExceeded.code
        return error, code

    async def _finish(
        self, run: Run, status: RunStatus, error: str, *changed: StepRecord, code: str = ""
    ) -> None:
        record = run.record
        error, code = await self._charge(run, status, error, code)
        record.status, record.error, record.ended_at = status, error, now()
        record.code = code
        try:
            await run.checkpoint(*changed)
        except nats.errors.MaxPayloadError:
            # The run's own output (e.g. a parallel run joining large outputs) does not fit
            # the head; every step's output is kept under its own key.
            record.output = record.output[:OUTPUT_PREVIEW] + OUTPUT_CUT_NOTE
            record.output_data = None
            await run.checkpoint(*changed)
        await run.report(FINISHED_PROGRESS[status], detail=error or _summary(record.output))
        log.info(
            f"run {status}",
            extra={"run_id": record.run_id, "error": error, "tokens": record.usage.total_tokens},
        )


def _summary(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.asynccontextmanager
async def cancel_requests(nc: Client, subjects: Subjects, handle: RunHandle) -> AsyncIterator[None]:
    """While inside, a RunCancel published on `<prefix>.runs.cancel.<run>` cancels the run."""

    async def on_cancel(msg: Msg) -> None:
        try:
            request = decode(msg.data, RunCancel)
        except InvalidMessage as exc:
            log.warning("bad cancel request", extra={"run_id": handle.run_id, "error": str(exc)})
            return
        handle.cancel(request.reason or "cancelled on request")

    subscription = await nc.subscribe(subjects.run_cancel(handle.run_id), cb=on_cancel)
    try:
        yield
    finally:
        await subscription.unsubscribe()


async def run_workflow(
    client: ChorusClient,
    workflow: WorkflowSpec | str | Path,
    input: str = "",
    *,
    data: Any = None,
    processors: Mapping[str, Processor] | None = None,
    run_id: str | None = None,
) -> RunRecord:
    """Run a workflow (a spec, or the path of a workflow file) on NATS and return its record.

    Progress is published as it goes (follow it with ProgressWatch and the run id); the record
    is kept in the runs bucket. `processors` maps the names steps give as `processor:` to
    functions; a name it lacks fails the run before any step (nothing is ever imported).
    """
    spec = workflow if not isinstance(workflow, str | Path) else load_workflow(workflow)
    engine = await Engine.on_nats(client, processors=processors)
    handle = engine.start(new_record(spec, input, data=data, run_id=run_id))
    async with cancel_requests(client.nc, client.subjects, handle):
        return await handle
