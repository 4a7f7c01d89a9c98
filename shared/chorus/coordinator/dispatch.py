"""Durable dispatch: tasks wait in a JetStream work queue until the router finds an instance.

One pull consumer per target (`cap.<capability>` or `agent.<name>`), shared by coordinator
replicas. A task is fetched only when some candidate has a free slot, sent to the chosen
instance by request-reply, and acknowledged only after its outcome is recorded in KV with a
create (so a task is recorded once, however often it is delivered). Each fetch's tasks are
looked up in the outcome bucket together before any runs: a redelivery whose ack was lost,
or the same task id submitted again after the stream's de-duplication window, runs nothing.

While the instance works, the claim is kept alive with in-progress acks. The reply can be
lost (a nats-server restart between the instance and us), and so can the task on its way:
instances list the tasks they hold in every heartbeat, so a task the instance does not hold
goes back to the queue at once, not after `task_timeout`. It never arrived: not an attempt.
It was held, then dropped without a reply reaching us: an attempt (it ran), retried at once.
If the instance dies (the registry marks it dead) the task is handed back and goes
elsewhere. Failures are retried with backoff up to `max_attempts`, then the task and every
attempt's error go to the dead-letter subject. A task of a cancelled run (the run's control
record says so, `chorus.client.control`) is not sent, and one an agent stopped because its
run was cancelled (`run_cancelled`) is not retried: both are recorded failed with that code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from chorus.client.control import RunControls
from chorus.client.durable import retry_delay
from chorus.config import Settings
from chorus.coordinator.observed import dispatching
from chorus.coordinator.registry import InstanceView, Registry, clamp_interval, targets_of
from chorus.coordinator.routing import Router
from chorus.errors import (
    DepthExceeded,
    InstanceLost,
    InvalidMessage,
    RunCancelled,
    TaskTimedOut,
)
from chorus.messages import (
    AttemptError,
    AttemptLog,
    DeadLetter,
    ErrorReply,
    Result,
    Task,
    TaskOutcome,
    decode,
    decode_result,
    encode,
    headers,
)
from chorus.nats import wire
from chorus.nats.dead_letters import MAX_DELIVERIES, delivered_for_the_last_time
from chorus.nats.jetstream import ClaimKeeper, DurableConsumer, every_consumer
from chorus.nats.streams import ensure_dead_letter_stream, ensure_dispatch_stream
from chorus.telemetry import tracing
from chorus.telemetry.metrics import DispatchInstruments

log = logging.getLogger("chorus.coordinator.dispatch")

MAX_BATCH = 64
# Refusals that every attempt would meet again, and that say nothing of the instance.
PERMANENT = frozenset({DepthExceeded.code})
# Deliveries beyond the attempts: hand-backs that are not attempts (an instance gone or
# draining) and coordinator crashes. A task delivered that often is dead-lettered.
EXTRA_DELIVERIES = 5
# "Not held" is believed only from a heartbeat received this long (at least one heartbeat
# interval) after the first one that followed the task: that one may have crossed it.
MIN_HELD_GRACE_S = 0.5


class Lost(InstanceLost):
    """The instance did not answer: it died, or the task timed out (`code` is then
    `timeout`). `gone`: nobody listens on the instance's subject at all, so the task never
    reached it (not the task's fault)."""

    def __init__(self, code: str, reason: str, *, gone: bool = False) -> None:
        super().__init__(reason)
        self.code = code
        self.gone = gone


class NotHeld(Lost):
    """The instance's heartbeats say it does not hold the task and no reply came. `started`:
    an earlier heartbeat listed it, so it ran there and its reply was lost; otherwise the
    task never reached the instance."""

    def __init__(self, reason: str, *, started: bool) -> None:
        super().__init__(InstanceLost.code, reason)
        self.started = started


class Counters(msgspec.Struct):
    completed: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    active: int = 0


class Dispatcher:
    def __init__(
        self,
        nc: Client,
        settings: Settings,
        registry: Registry,
        router: Router,
        tasks: KeyValue,
        metrics: DispatchInstruments | None = None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.settings = settings
        self.subjects = settings.subjects
        self.registry = registry
        self.router = router
        self.tasks = tasks
        self.counters = Counters()
        self.metrics = metrics if metrics is not None else DispatchInstruments()
        self._targets: dict[str, asyncio.Task[None]] = {}
        self._work: set[asyncio.Task[None]] = set()
        self._claims = ClaimKeeper(settings.claim_timeout / 3)  # tasks out with an instance
        self._stopping = False
        self.controls = RunControls(self.js, self.subjects)  # cancelled runs' markers

    @property
    def targets(self) -> list[str]:
        return sorted(self._targets)

    async def start(self) -> None:
        await ensure_dispatch_stream(
            self.js,
            self.subjects,
            dedupe_window=self.settings.dedupe_window,
            replicas=self.settings.replicas,
        )
        await ensure_dead_letter_stream(self.js, self.subjects, replicas=self.settings.replicas)
        self._claims.start()
        # Targets that already have a consumer (from an earlier run) resume at once.
        for info in await every_consumer(self.js, self.subjects.dispatch_stream):
            target = (info.config.filter_subject or "").removeprefix(self.subjects.dispatch(""))
            if target:
                self.serve(target)

    def serve(self, target: str) -> None:
        """Start dispatching tasks for `target` (idempotent)."""
        if target not in self._targets and not self._stopping:
            self._targets[target] = asyncio.create_task(self._loop(target), name=target)

    def serve_instance(self, view: InstanceView) -> None:
        for target in targets_of(view.heartbeat):
            self.serve(target)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop fetching; wait for dispatches in flight, then hand the rest back."""
        self._stopping = True
        await self._claims.stop()
        for loop in self._targets.values():
            loop.cancel()
        await asyncio.gather(*self._targets.values(), return_exceptions=True)
        if self._work:
            _, pending = await asyncio.wait(set(self._work), timeout=timeout)
            for work in pending:
                work.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def queue_lengths(self) -> dict[str, int]:
        lengths: dict[str, int] = {}
        for target in self.targets:
            with contextlib.suppress(Exception):
                info = await self.js.consumer_info(
                    self.subjects.dispatch_stream, self.subjects.dispatch_consumer(target)
                )
                lengths[target] = info.num_pending + info.num_ack_pending
        return lengths

    # fetching

    def _consumer(self, target: str) -> DurableConsumer:
        config = ConsumerConfig(
            durable_name=self.subjects.dispatch_consumer(target),
            filter_subject=self.subjects.dispatch(target),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.settings.claim_timeout,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=-1,
            max_deliver=self.max_deliver,
        )
        return DurableConsumer(self.js, self.subjects.dispatch_stream, config)

    @property
    def max_deliver(self) -> int:
        return self.settings.max_attempts + EXTRA_DELIVERIES

    def _free_slots(self, target: str) -> int:
        return sum(v.free for v in self.router.candidates(self.registry.serving(target), target))

    async def _loop(self, target: str) -> None:
        async def room() -> int:
            free = self._free_slots(target)
            if free < 1:
                await self.registry.changed.wait(timeout=1.0)
                return 0
            return min(free, MAX_BATCH)

        async def assign(batch: list[Msg]) -> None:
            recorded = await self._look_up(batch)
            for msg, done in zip(batch, recorded, strict=True):
                await self._assign(target, msg, done)

        consumer = self._consumer(target)
        await consumer.run_batches(room, assign, stopping=lambda: self._stopping)

    async def _look_up(self, batch: list[Msg]) -> list[bool | None]:
        """For each message, whether its task has an outcome already (None: not known, the
        dispatch looks again); one lookup per message, all at once, so a batch costs one
        round trip and its tasks still start in order."""

        async def one(msg: Msg) -> bool | None:
            task_id = headers.read(msg.headers).task_id
            if not task_id:
                return None  # not from a TaskQueue: decoded and looked up in the dispatch
            stored = await self._recorded(task_id)
            if stored is not None and not decode(stored, TaskOutcome).final:
                return None  # parked: a resume runs, anything else not (see `_attempt`)
            return stored is not None

        found = await asyncio.gather(*(one(m) for m in batch), return_exceptions=True)
        return [f if isinstance(f, bool) else None for f in found]

    async def _assign(self, target: str, msg: Msg, recorded: bool | None = None) -> None:
        """Give `msg` to the best instance, waiting (claim kept alive) while none is free."""
        if delivered_for_the_last_time(msg, self.max_deliver):
            await self._give_up(target, msg)
            return
        if recorded:
            # Ran already (a redelivery whose ack was lost, or the same task id submitted
            # after the de-duplication window): the outcome stands, nothing runs.
            await msg.ack_sync(timeout=5)
            return
        with self._claims.holding(msg):
            while (view := self.router.choose(self.registry.serving(target), target)) is None:
                await self.registry.changed.wait(timeout=1.0)
        view.reserved += 1
        work = asyncio.create_task(
            dispatching(
                self._dispatch(target, msg, view, looked_up=recorded is False),
                msg,
                target,
                self.metrics,
            )
        )
        self._work.add(work)
        work.add_done_callback(self._work.discard)

    # one task

    async def _dispatch(
        self, target: str, msg: Msg, view: InstanceView, *, looked_up: bool = False
    ) -> None:
        self.counters.active += 1
        self._claims.hold(msg)
        try:
            await self._attempt(target, msg, view, looked_up=looked_up)
        except Exception:
            log.exception("dispatch failed; the task will be redelivered", extra={"target": target})
        finally:
            self._claims.release(msg)
            view.reserved -= 1
            self.counters.active -= 1
            self.registry.changed.fire()

    async def _attempt(
        self, target: str, msg: Msg, view: InstanceView, *, looked_up: bool = False
    ) -> None:
        try:
            task = decode(msg.data, Task)
        except InvalidMessage as exc:
            self.router.released(view)
            poison = Task(input="", task_id=f"invalid-{msg.metadata.sequence.stream}")
            error = AttemptError(attempt=1, code=exc.code, reason=exc.reason)
            await self._bury(target, msg, poison, [error])
            return
        if not looked_up and not await self._runs_now(task):
            # Ran already: its outcome stands (see `_assign`); or it is parked, and this is
            # not the resume of one of the approvals it waits for.
            self.router.released(view)
            await msg.ack_sync(timeout=5)
            return
        if task.run_id and await self.controls.is_cancelled(task.run_id):
            # Queued before its run was cancelled: never started, recorded as such.
            self.router.released(view)
            reason = f"run {task.run_id} was cancelled before this task started"
            await self._record_cancelled(msg, task, reason)
            return
        redelivered = msg.metadata.num_delivered > 1
        attempts = (
            await self._attempt_log(task.task_id)
            if redelivered
            else AttemptLog(task_id=task.task_id)
        )
        task = msgspec.structs.replace(task, attempt=len(attempts.errors) + 1)
        started = time.monotonic()
        try:
            reply = await self.metrics.timed(target, self._request(view, task))
        except NotHeld as dropped:
            self.router.released(view)  # a lost message says nothing of the instance
            if not dropped.started:
                log.info(
                    "task never reached its instance; queued again",
                    extra={"task_id": task.task_id, "instance": view.instance},
                )
                await msg.nak()  # not an attempt: it never ran
                return
            error = AttemptError(
                attempt=task.attempt,
                code=dropped.code,
                reason=dropped.reason,
                instance=view.instance,
            )
            await self._retry_or_bury(target, msg, task, attempts, error, delay=0.0)
            return
        except Lost as lost:
            if lost.gone:
                # Nobody listens on the instance's subject: it is gone, and the task never
                # reached it. Not an attempt: mark the instance gone and queue the task again.
                self.registry.gone(view.instance)
                self.router.released(view)
                await msg.nak()
                return
            self.router.failed(view)
            error = AttemptError(
                attempt=task.attempt, code=lost.code, reason=lost.reason, instance=view.instance
            )
            await self._retry_or_bury(target, msg, task, attempts, error)
            return
        if isinstance(reply, Result) and reply.waiting_for:
            # Parked for approvals: not final, not a failure; the resume task comes later.
            self.router.released(view)
            await self._record_waiting(
                TaskOutcome(
                    task_id=task.task_id,
                    status="waiting",
                    result=reply,
                    errors=attempts.errors,
                    attempts=task.attempt,
                    waiting_for=reply.waiting_for,
                    waiting_until=reply.waiting_until,
                )
            )
            await msg.ack()
            return
        if isinstance(reply, Result):
            self.router.succeeded(view, (time.monotonic() - started) * 1000)
            outcome = TaskOutcome(
                task_id=task.task_id,
                status="completed",
                result=reply,
                errors=attempts.errors,
                attempts=task.attempt,
            )
            await self._record(outcome)
            self.counters.completed += 1
            # Not ack_sync: a lost ack only means a redelivery, which finds the outcome.
            await msg.ack()
            return
        if reply.code == "draining":
            self.router.released(view)
            await msg.nak()  # not the task's fault: straight back to the queue
            return
        if reply.code == RunCancelled.code:
            self.router.released(view)  # stopped on purpose: says nothing of the instance
            await self._record_cancelled(msg, task, reply.reason, instance=view.instance)
            return
        if reply.code in PERMANENT:
            self.router.released(view)
            error = AttemptError(
                attempt=task.attempt, code=reply.code, reason=reply.reason, instance=view.instance
            )
            await self._bury(target, msg, task, [*attempts.errors, error])
            return
        self.router.failed(view)
        error = AttemptError(
            attempt=task.attempt, code=reply.code, reason=reply.reason, instance=view.instance
        )
        await self._retry_or_bury(target, msg, task, attempts, error)

    async def _request(self, view: InstanceView, task: Task) -> Result | ErrorReply:
        """Send the task and wait for the reply, the instance's death, or its heartbeats
        saying it does not hold the task (then a moment more: the reply may be just behind
        the heartbeat)."""
        grace = max(clamp_interval(view.heartbeat.interval_s), MIN_HELD_GRACE_S)
        request = asyncio.ensure_future(
            wire.request(
                self.nc,
                self.subjects.agent_task(view.instance),
                encode(task),
                headers.for_task(task),
                timeout=self.settings.task_timeout,
            )
        )
        lost = asyncio.ensure_future(view.lost.wait())
        unheld = asyncio.ensure_future(_until_unheld(view, task.task_id, grace))
        try:
            done, _ = await asyncio.wait(
                {request, lost, unheld}, return_when=asyncio.FIRST_COMPLETED
            )
            if unheld in done and request not in done:
                await asyncio.wait({request}, timeout=grace / 2)
        finally:
            for future in (request, lost, unheld):
                if not future.done():
                    future.cancel()
        if not request.done() and unheld.done():
            started = unheld.result()
            raise NotHeld(
                f"instance {view.instance} no longer holds the task and its reply never "
                "came (lost on the way, in a reconnect?)"
                if started
                else f"the task never reached instance {view.instance} (lost on the way)",
                started=started,
            )
        if not request.done():
            raise Lost(
                InstanceLost.code,
                f"instance {view.instance} stopped heartbeating while running the task",
            )
        try:
            reply_msg = request.result()
        except NoRespondersError:
            raise Lost(
                InstanceLost.code, f"instance {view.instance} is not listening", gone=True
            ) from None
        except NatsTimeout:
            raise Lost(
                TaskTimedOut.code,
                f"no answer from {view.instance} in {self.settings.task_timeout}s",
            ) from None
        try:
            return decode_result(reply_msg.data)
        except InvalidMessage as exc:
            return ErrorReply(code=exc.code, reason=f"unreadable reply: {exc.reason}")

    async def _retry_or_bury(
        self,
        target: str,
        msg: Msg,
        task: Task,
        attempts: AttemptLog,
        error: AttemptError,
        *,
        delay: float | None = None,
    ) -> None:
        """Log the failed attempt and queue the task again after `delay` (by default the
        backoff of its attempt); after the last attempt, dead-letter it."""
        errors = [*attempts.errors, error]
        tracing.mark_failed(error.code, error.reason)  # this attempt's dispatch span
        log.warning(
            "task attempt failed",
            extra={"task_id": task.task_id, "attempt": task.attempt, "error": error.reason},
        )
        if len(errors) >= self.settings.max_attempts:
            await self._bury(target, msg, task, errors)
            return
        await self.tasks.put(
            self.subjects.attempts_key(task.task_id),
            encode(AttemptLog(task_id=task.task_id, errors=errors)),
        )
        self.counters.retried += 1
        self.metrics.retries.labels(target).inc()
        if delay is None:
            delay = retry_delay(self.settings.retry_backoff, len(errors))
        await msg.nak(delay=delay or None)

    async def _record_cancelled(
        self, msg: Msg, task: Task, reason: str, *, instance: str = ""
    ) -> None:
        """The task's run was cancelled: its outcome is final (no retry, no dead letter)."""
        error = AttemptError(
            attempt=task.attempt, code=RunCancelled.code, reason=reason, instance=instance
        )
        outcome = TaskOutcome(
            task_id=task.task_id, status="failed", errors=[error], attempts=task.attempt
        )
        await self._record(outcome)
        self.counters.failed += 1
        log.info("task of a cancelled run", extra={"task_id": task.task_id, "run_id": task.run_id})
        await msg.ack_sync(timeout=5)

    async def _give_up(self, target: str, msg: Msg) -> None:
        """The last delivery the consumer allows: dead-letter the task with its errors."""
        reason = (
            f"delivered {msg.metadata.num_delivered} times without an outcome "
            "(handed back or its coordinator stopped each time)"
        )
        try:
            task = decode(msg.data, Task)
        except InvalidMessage as exc:
            poison = Task(input="", task_id=f"invalid-{msg.metadata.sequence.stream}")
            error = AttemptError(attempt=1, code=exc.code, reason=exc.reason)
            await self._bury(target, msg, poison, [error])
            return
        attempts = await self._attempt_log(task.task_id)
        error = AttemptError(attempt=len(attempts.errors) + 1, code=MAX_DELIVERIES, reason=reason)
        await self._bury(target, msg, task, [*attempts.errors, error])

    async def _bury(self, target: str, msg: Msg, task: Task, errors: list[AttemptError]) -> None:
        """Dead-letter the task with every attempt's error and record it failed."""
        letter = DeadLetter(task=task, target=target, errors=errors)
        await wire.publish_durably(
            self.js,
            self.subjects.dead_letter(target),
            encode(letter),
            headers.for_dead_letter(task),
        )
        outcome = TaskOutcome(
            task_id=task.task_id, status="failed", errors=errors, attempts=len(errors)
        )
        await self._record(outcome)
        self.counters.failed += 1
        self.counters.dead_lettered += 1
        self.metrics.dead_letters.labels(target).inc()
        log.error(
            "task dead-lettered",
            extra={"task_id": task.task_id, "target": target, "attempts": len(errors)},
        )
        await msg.ack_sync(timeout=5)

    # the tasks bucket

    async def _recorded(self, task_id: str) -> bytes | None:
        try:
            entry = await self.tasks.get(self.subjects.outcome_key(task_id))
        except KeyNotFoundError:
            return None
        return entry.value

    async def _attempt_log(self, task_id: str) -> AttemptLog:
        try:
            entry = await self.tasks.get(self.subjects.attempts_key(task_id))
        except KeyNotFoundError:
            return AttemptLog(task_id=task_id)
        return decode(entry.value or b"{}", AttemptLog)

    async def _record(self, outcome: TaskOutcome) -> None:
        """Record the outcome once; a second recorder (two deliveries of one task in flight
        at once) is refused and the first outcome stands.

        Storing it is announcing it: submitters follow the outcome keys through the bucket's
        stream, which never carries the refused write (chorus.client.durable)."""
        if await self._store(outcome):
            self.metrics.recorded(outcome)  # once: a second recorder finds it there
        else:
            log.info("outcome already recorded", extra={"task_id": outcome.task_id})

    async def _record_waiting(self, outcome: TaskOutcome) -> None:
        """Say the task is parked (submitters wait on); never over a final outcome."""
        if not await self._store(outcome):
            log.info("task finished before it parked", extra={"task_id": outcome.task_id})

    async def _store(self, outcome: TaskOutcome) -> bool:
        """Create the outcome, or replace a `waiting` one (compare-and-set); False when a
        final outcome is there already (it stands)."""
        key = self.subjects.outcome_key(outcome.task_id)
        while True:
            try:
                await self.tasks.create(key, encode(outcome))
                return True
            except KeyWrongLastSequenceError:
                pass
            try:
                entry = await self.tasks.get(key)
            except KeyNotFoundError:
                continue
            if decode(entry.value or b"", TaskOutcome).final:
                return False
            try:
                await self.tasks.update(key, encode(outcome), last=entry.revision)
                return True
            except KeyWrongLastSequenceError:
                continue  # another recorder meanwhile: look again

    async def _runs_now(self, task: Task) -> bool:
        """Whether a delivered task runs: it has no outcome, or it is parked and this task
        resumes it for one of the approvals it waits for."""
        stored = await self._recorded(task.task_id)
        if stored is None:
            return True
        outcome = decode(stored, TaskOutcome)
        return not outcome.final and bool(task.resume) and task.resume in outcome.waiting_for


async def _until_unheld(view: InstanceView, task_id: str, grace: float) -> bool:
    """Return once the instance's heartbeats show it does not hold `task_id`: True when an
    earlier one listed it (it started there), False when none did. Never returns for an
    instance whose heartbeats list no tasks (an older version).

    A heartbeat can cross the task on its way (sent before the task arrived), and after a
    reconnect the instance's buffered heartbeats arrive together; so "never listed" is
    believed only from a heartbeat received `grace` after the first one that came after the
    task was sent.
    """
    beats = view.beats
    started = False
    reference: float | None = None
    while True:
        await view.beat.wait(timeout=grace * 4)
        if view.beats == beats:
            continue
        beats = view.beats
        held = view.held
        if held is None:
            continue
        if task_id in held:
            started = True
        elif started:
            return True
        elif reference is None:
            reference = view.last_seen
        elif view.last_seen - reference >= grace:
            return False
