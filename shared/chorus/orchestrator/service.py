"""The orchestrator service: runs from the `CHORUS_RUNS` work queue, through the engine.

Any number of replicas share one durable pull consumer. A run's queue message stays unacked
(its claim kept alive with in-progress acks) until the run has finished; the engine saves the
run record after every step. When an orchestrator dies, its claims lapse after
`CHORUS_CLAIM_TIMEOUT`, another replica receives the request, loads the record and resumes
from the last finished step (an interrupted step is resent under the same task id, which the
durable task queue answers with the outcome it already recorded). On SIGTERM runs are
interrupted (they stay resumable) and their requests handed back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from chorus.client import ChorusClient
from chorus.client.durable import TaskQueue
from chorus.client.runstore import KvRunStore
from chorus.config import Settings
from chorus.errors import Conflict, InvalidMessage
from chorus.messages import Result, RunCancel, RunRequest, Task, decode, now
from chorus.nats.jetstream import ClaimKeeper, DurableConsumer
from chorus.nats.streams import ensure_runs_stream
from chorus.spend.budgets import BudgetLedger
from chorus.workflows.directory import DiscoveryDirectory
from chorus.workflows.engine import Engine, RunHandle, new_record
from chorus.workflows.events import NatsEventBus
from chorus.workflows.progress import NatsProgress
from chorus.workflows.protocols import TaskRunner
from chorus.workflows.run import Processor
from chorus.workflows.runner import DirectRunner

log = logging.getLogger("chorus.orchestrator")

CONSUMER = "orchestrator"


class QueueRunner:
    """Steps as durable tasks: stored, routed by the coordinator, recorded once."""

    def __init__(self, queue: TaskQueue, timeout: float) -> None:
        self.queue = queue
        self.timeout = timeout

    async def run(self, task: Task) -> Result:
        return await self.queue.run(
            task, capability=task.capability, agent=task.agent, timeout=self.timeout
        )


class Orchestrator:
    def __init__(
        self,
        nc: Client,
        settings: Settings,
        *,
        durable_tasks: bool = True,
        max_runs: int = 32,
        processors: Mapping[str, Processor] | None = None,
    ) -> None:
        self.nc = nc
        self.settings = settings
        self.subjects = settings.subjects
        self.durable_tasks = durable_tasks
        self.processors = processors
        self.max_runs = max_runs
        self._room = asyncio.Event()  # set while fewer than max_runs runs are in flight
        self._room.set()
        self._claims = ClaimKeeper(settings.claim_timeout / 3)
        self._engine: Engine | None = None
        self._loop: asyncio.Task[None] | None = None
        self._runs: set[asyncio.Task[None]] = set()
        self._handles: dict[str, RunHandle] = {}
        self._cancels: Subscription | None = None
        self._stopping = False

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "start() the orchestrator first"
        return self._engine

    async def start(self) -> None:
        js = self.nc.jetstream()
        await ensure_runs_stream(js, self.subjects)
        client = ChorusClient(self.nc, self.subjects, timeout=self.settings.request_timeout)
        runner: TaskRunner = (
            QueueRunner(TaskQueue(self.nc, self.subjects), self.settings.task_timeout)
            if self.durable_tasks
            else DirectRunner(client)
        )
        self._engine = Engine(
            runner,
            await KvRunStore.open(js, self.subjects),
            progress=NatsProgress(self.nc, self.subjects),
            events=NatsEventBus(client),
            directory=DiscoveryDirectory(client),
            processors=self.processors,
            budgets=await BudgetLedger.open(js, self.subjects),
        )
        config = ConsumerConfig(
            durable_name=CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.settings.claim_timeout,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=-1,
        )
        consumer = DurableConsumer(js, self.subjects.runs_stream, config)
        await consumer.bind()
        self._cancels = await self.nc.subscribe(self.subjects.run_cancel("*"), cb=self._on_cancel)
        self._loop = asyncio.create_task(self._take_runs(consumer))
        log.info("orchestrator ready", extra={"durable_tasks": self.durable_tasks})

    async def stop(self, timeout: float = 10.0) -> None:
        """Interrupt the runs in flight (they stay resumable) and hand their requests back."""
        self._stopping = True
        if self._cancels is not None:
            await self._cancels.unsubscribe()
        if self._loop:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        for run in self._runs:
            run.cancel()
        if self._runs:
            await asyncio.wait(set(self._runs), timeout=timeout)
        await self._claims.stop()
        log.info("orchestrator stopped")

    async def _take_runs(self, consumer: DurableConsumer) -> None:
        async def room() -> int:
            await self._room.wait()
            return self.max_runs - len(self._runs)

        async def take(msg: Msg) -> None:
            run = asyncio.create_task(self._serve(msg))
            self._runs.add(run)
            run.add_done_callback(self._ran)
            if len(self._runs) >= self.max_runs:
                self._room.clear()

        await consumer.run(room, take, stopping=lambda: self._stopping)

    def _ran(self, run: asyncio.Task[None]) -> None:
        self._runs.discard(run)
        self._room.set()

    async def _serve(self, msg: Msg) -> None:
        try:
            request = decode(msg.data, RunRequest)
        except InvalidMessage as exc:
            log.error("dropping malformed run request", extra={"error": exc.reason})
            await msg.term()
            return
        with self._claims.holding(msg):
            try:
                await self._drive(msg, request)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await msg.nak()  # shutting down: another replica resumes it now
                raise

    async def _drive(self, msg: Msg, request: RunRequest) -> None:
        store = self.engine.services.store
        record = await store.load(request.run_id)
        if record is None:
            if request.workflow is None:
                log.error("run request without a workflow", extra={"run_id": request.run_id})
                await msg.term()
                return
            record = new_record(
                request.workflow,
                request.input,
                data=request.data,
                run_id=request.run_id,
                budget=request.budget,
            )
        if record.finished:
            await msg.ack_sync(timeout=5)
            return
        handle = self.engine.start(record)
        self._handles[record.run_id] = handle
        try:
            await handle
        except (NatsError, TimeoutError, ConnectionError) as exc:
            # NATS went away under the run: hand it back; it resumes from its checkpoint.
            log.warning("run interrupted", extra={"run_id": record.run_id, "error": repr(exc)})
            with contextlib.suppress(NatsError, TimeoutError):
                await msg.nak(delay=1.0)
            return
        except Conflict:
            # Another orchestrator advanced this run: look again once it may be done.
            log.info("run taken over elsewhere", extra={"run_id": record.run_id})
            await msg.nak(delay=self.settings.claim_timeout)
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if handle.reason is None or (task is not None and task.cancelling()):
                raise  # we are shutting down: the run stays resumable
            # Cancelled before the engine took its first step: record it here.
            await self._record_cancelled(record.run_id, handle.reason)
        finally:
            self._handles.pop(record.run_id, None)
        await msg.ack_sync(timeout=5)

    async def _record_cancelled(self, run_id: str, reason: str) -> None:
        store = self.engine.services.store
        record = await store.load(run_id)
        if record is not None and not record.finished:
            record.status, record.error, record.ended_at = "cancelled", reason, now()
            await store.save(record)  # the head: no step ran

    async def _on_cancel(self, msg: Msg) -> None:
        """One subscription for every run, made at start, so no cancel can slip past a run."""
        try:
            request = decode(msg.data, RunCancel)
        except InvalidMessage as exc:
            log.warning("bad cancel request", extra={"error": exc.reason})
            return
        handle = self._handles.get(request.run_id)
        if handle is not None:
            log.info("cancelling run", extra={"run_id": request.run_id})
            handle.cancel(request.reason or "cancelled on request")
