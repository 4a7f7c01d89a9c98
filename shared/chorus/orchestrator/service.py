"""The orchestrator service: runs from the `CHORUS_RUNS` work queue, through the engine.

Any number of replicas share one durable pull consumer. A run's queue message stays unacked
(its claim kept alive with in-progress acks) until the run has finished; the engine saves the
run record after every step. When an orchestrator dies, its claims lapse after
`CHORUS_CLAIM_TIMEOUT`, another replica receives the request, loads the record and resumes
from the last finished step (an interrupted step is resent under the same task id, which the
durable task queue answers with the outcome it already recorded). On SIGTERM runs are
interrupted (they stay resumable) and their requests handed back at once.

A run parked on a human step (status `waiting`) is acked like a finished one: nothing holds
it. A `RunResume` (an answer, or a timeout applied by any orchestrator's `WaitTimer`) comes
through the same queue and takes it up again on whichever replica receives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.micro import add_service
from nats.micro.service import Service
from opentelemetry.trace import SpanKind

from chorus import __version__
from chorus.client import ChorusClient
from chorus.client.durable import TaskQueue, outcome_deadline
from chorus.client.runs import RunClient
from chorus.client.runstore import KvRunStore
from chorus.config import Settings
from chorus.errors import Conflict, InvalidMessage
from chorus.messages import (
    Result,
    RunCancel,
    RunRecord,
    RunRequest,
    RunResume,
    Task,
    decode,
    decode_any,
    now,
)
from chorus.nats.dead_letters import MAX_DELIVERIES, dead_letter, delivered_for_the_last_time
from chorus.nats.jetstream import ClaimKeeper, DurableConsumer
from chorus.nats.streams import ensure_dead_letter_stream, ensure_runs_stream
from chorus.orchestrator.waits import WaitTimer
from chorus.spend.budgets import BudgetLedger
from chorus.telemetry import tracing
from chorus.telemetry.metrics import RunInstruments
from chorus.workflows.directory import DiscoveryDirectory
from chorus.workflows.engine import Engine, RunHandle, new_record
from chorus.workflows.events import NatsEventBus
from chorus.workflows.progress import NatsProgress
from chorus.workflows.protocols import TaskRunner
from chorus.workflows.run import Processor
from chorus.workflows.runner import DirectRunner

log = logging.getLogger("chorus.orchestrator")

CONSUMER = "orchestrator"
# Deliveries of one run request before it is dead-lettered. Every orchestrator crash, claim
# lapse, hand-back on shutdown or NATS loss during the run is one; a request that keeps
# killing its orchestrator is taken off the queue at the last.
RUN_MAX_DELIVER = 10


def _to_resume(record: RunRecord | None, msg: Msg) -> bool:
    """Whether a RunResume should take the run up: it waits, or it was being resumed by an
    orchestrator that died (the resume delivered again, the run left `running`)."""
    if record is None:
        return False
    return record.status == "waiting" or (
        record.status == "running" and msg.metadata.num_delivered > 1
    )


class QueueRunner:
    """Steps as durable tasks: stored, routed by the coordinator, recorded once.

    `timeout` is how long a step waits for its outcome: `outcome_deadline` of the settings,
    so it covers every attempt and backoff of the dispatcher and cannot give up on a task
    a moment before the coordinator's retry succeeds."""

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
        self._service: Service | None = None
        self._queue: TaskQueue | None = None
        self._stopping = False
        self._dead_letters_ready = False
        self._waits: WaitTimer | None = None
        self.metrics = RunInstruments()  # a registry of its own: /metrics (process.py)

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "start() the orchestrator first"
        return self._engine

    async def start(self) -> None:
        js = self.nc.jetstream()
        await ensure_runs_stream(js, self.subjects, replicas=self.settings.replicas)
        client = ChorusClient(self.nc, self.subjects, timeout=self.settings.request_timeout)
        self._queue = TaskQueue(self.nc, self.subjects)
        runner: TaskRunner = (
            QueueRunner(self._queue, outcome_deadline(self.settings))
            if self.durable_tasks
            else DirectRunner(client)
        )
        store = await KvRunStore.open(js, self.subjects, replicas=self.settings.replicas)
        self._engine = Engine(
            runner,
            store,
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
            max_deliver=RUN_MAX_DELIVER,
        )
        consumer = DurableConsumer(js, self.subjects.runs_stream, config)
        await consumer.bind()
        self._cancels = await self.nc.subscribe(self.subjects.run_cancel("*"), cb=self._on_cancel)
        # A NATS micro service (no endpoints: runs come from JetStream), so `$SRV.PING`,
        # INFO and STATS show every orchestrator.
        self._service = await add_service(
            self.nc,
            name=self.subjects.role_service("orchestrator"),
            version=__version__,
            description="Chorus orchestrator: runs workflows from the runs queue",
            metadata={"role": "orchestrator", "durable_tasks": str(self.durable_tasks).lower()},
        )
        self._waits = WaitTimer(
            store.fresh(), RunClient(self.nc, self.subjects), sweep=self.settings.wait_sweep
        )
        self._waits.start()
        self._loop = asyncio.create_task(self._take_runs(consumer))
        log.info("orchestrator ready", extra={"durable_tasks": self.durable_tasks})

    async def stop(self, timeout: float = 10.0) -> None:
        """Interrupt the runs in flight (they stay resumable) and hand their requests back."""
        self._stopping = True
        if self._cancels is not None:
            await self._cancels.unsubscribe()
        if self._service is not None:
            await self._service.stop()
        if self._waits is not None:
            await self._waits.stop()
        if self._loop:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        for run in self._runs:
            run.cancel()
        if self._runs:
            await asyncio.wait(set(self._runs), timeout=timeout)
        await self._claims.stop()
        if self._queue is not None:
            await self._queue.close()
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
            request: RunRequest | RunResume = decode_any(msg.data, RunRequest | RunResume)
        except InvalidMessage as exc:
            await self._give_up(msg, InvalidMessage.code, f"malformed run request: {exc.reason}")
            return
        if delivered_for_the_last_time(msg, RUN_MAX_DELIVER):
            reason = (
                f"run request delivered {msg.metadata.num_delivered} times without finishing "
                "(it kept crashing or stalling its orchestrator)"
            )
            await self._give_up(msg, MAX_DELIVERIES, reason, run_id=request.run_id)
            await self._record_failed(request.run_id, reason)
            return
        with self._claims.holding(msg):
            try:
                # A child of the submitter's span (the request's headers are stored with it).
                await tracing.within(
                    self._drive(msg, request),
                    f"process {msg.subject}",
                    kind=SpanKind.CONSUMER,
                    parent=tracing.parent_of(msg.headers),
                    attributes=tracing.messaging(
                        msg.subject,
                        "process",
                        message_id=request.run_id,
                        group=CONSUMER,
                        delivery=msg.metadata.num_delivered,
                    ),
                )
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await msg.nak()  # shutting down: another replica resumes it now
                raise

    async def _drive(self, msg: Msg, request: RunRequest | RunResume) -> None:
        store = self.engine.services.store
        record = await store.load(request.run_id)
        resume = isinstance(request, RunResume)
        if resume and not _to_resume(record, msg):
            await msg.ack_sync(timeout=5)  # resumed elsewhere, finished, or cancelled
            return
        if record is None:
            assert isinstance(request, RunRequest)
            if request.workflow is None:
                reason = f"run request for unknown run {request.run_id} carries no workflow"
                await self._give_up(msg, InvalidMessage.code, reason, run_id=request.run_id)
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
        started = time.monotonic()
        try:
            await handle
        except (NatsError, TimeoutError, ConnectionError) as exc:
            # NATS went away under the run: hand it back; it resumes from its checkpoint.
            log.warning("run interrupted", extra={"run_id": record.run_id, "error": repr(exc)})
            with contextlib.suppress(NatsError, TimeoutError):
                await msg.nak(delay=1.0)
            return
        except Conflict:
            # Another orchestrator advanced this run: look again once it may be done (a
            # resume is done with: the one advancing it holds a request of its own).
            log.info("run taken over elsewhere", extra={"run_id": record.run_id})
            if resume:
                await msg.ack_sync(timeout=5)
            else:
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
            if record.status == "waiting" and self._waits is not None:
                self._waits.nudge()  # parked: its deadline may be the next one
            if record.finished:
                self.metrics.run_seconds.labels(record.workflow.name, record.status).observe(
                    time.monotonic() - started
                )
        await msg.ack_sync(timeout=5)

    async def _give_up(
        self, msg: Msg, code: str, reason: str, *, run_id: str | None = None
    ) -> None:
        """Take the request off the queue onto `<prefix>.dlq.runs`, with the reason."""
        if not self._dead_letters_ready:  # made on first use: start-up stays as quick as it was
            await ensure_dead_letter_stream(
                self.nc.jetstream(), self.subjects, replicas=self.settings.replicas
            )
            self._dead_letters_ready = True
        await dead_letter(
            self.nc.jetstream(),
            msg,
            subject=self.subjects.runs_dead_letter,
            queue="runs",
            code=code,
            reason=reason,
            run_id=run_id,
        )

    async def _record_failed(self, run_id: str, reason: str) -> None:
        store = self.engine.services.store
        record = await store.load(run_id)
        if record is not None and not record.finished:
            record.status, record.error, record.ended_at = "failed", reason, now()
            await store.save(record)

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
