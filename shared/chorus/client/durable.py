"""Durable tasks from the submitter's side: submit to the work queue, wait for the outcome.

A submission is stored in JetStream before `submit` returns. A task id runs once for as long
as its outcome is kept (7 days): `submit` looks the outcome up first and does not queue a
task that has one, the stream drops a resubmission inside its de-duplication window, and the
dispatcher looks a first delivery up too (for a resubmission that slipped between the two).

The coordinator records exactly one outcome per task id in KV, with a create. Submitters
hear it through one `StreamTail` per queue on the outcome keys: only writes the bucket stored
(a refused second `create` is heard by a core subscription on the key, never by the tail),
and nothing stored while the client was reconnecting is missed (the tail starts again after
the last outcome it handed on). A waiter registers with the tail, then reads the bucket once
for what was stored before it.

`outcome_deadline` is how long the dispatcher may take over a task with every attempt,
backoff and lost claim: what a step waits, so a run never gives up on a task the
coordinator is about to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import re
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue

from chorus.config import Settings
from chorus.errors import ConfigError, InvalidMessage, RequestTimeout, TaskFailed
from chorus.messages import Result, Task, TaskOutcome, decode, encode, headers
from chorus.nats.connection import raise_if_cancelled
from chorus.nats.jetstream import StreamTail
from chorus.nats.streams import (
    ensure_dispatch_stream,
    ensure_tasks_bucket,
    open_bucket,
    stream_exists,
)
from chorus.nats.wire import TRANSIENT, publish_durably
from chorus.subjects import Subjects, dispatch_target
from chorus.telemetry import tracing

log = logging.getLogger("chorus.client.durable")

_TASK_ID = re.compile(r"^[A-Za-z0-9_=-]+$")
MAX_BACKOFF_S = 30.0  # the longest wait between two attempts of a task
READ_WITHIN_S = 30.0  # how long a lookup of the outcome retries while the server is away
# A read that can succeed if asked again: the server restarting, JetStream not ready yet.
_UNAVAILABLE = (*TRANSIENT, ServiceUnavailableError)


def retry_delay(retry_backoff: float, failures: int) -> float:
    """The dispatcher's wait before the attempt after `failures` failed ones: doubling from
    `retry_backoff` (CHORUS_RETRY_BACKOFF), at most MAX_BACKOFF_S."""
    return float(min(MAX_BACKOFF_S, retry_backoff * 2 ** max(0, failures - 1)))


def outcome_deadline(settings: Settings) -> float:
    """The longest a running coordinator takes to record a task's outcome once it is queued.

    Each of `max_attempts` attempts may run for `task_timeout`, be lost with its instance
    (noticed after `dead_after` heartbeat intervals) or with its dispatcher (the claim lapses
    after `claim_timeout`), and is followed by a backoff. Waiting less than this races the
    dispatcher: the wait gives up just before a retry succeeds.
    """
    lost = settings.dead_after * settings.heartbeat_interval + settings.claim_timeout
    attempts = settings.max_attempts * (settings.task_timeout + lost)
    backoffs = sum(retry_delay(settings.retry_backoff, n) for n in range(1, settings.max_attempts))
    return attempts + backoffs


class TaskQueue:
    """Submit durable tasks and wait for their one recorded outcome. `close()` when done."""

    def __init__(self, nc: Client, subjects: Subjects) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = subjects
        self._bucket: KeyValue | None = None
        self._stream_ready = False
        self._tail: StreamTail | None = None
        self._tail_lock = asyncio.Lock()
        self._waiting: dict[str, list[_Waiter]] = {}

    async def _tasks(self) -> KeyValue:
        if self._bucket is None:
            self._bucket = await open_bucket(
                self.js,
                self.subjects.tasks_bucket,
                lambda: ensure_tasks_bucket(self.js, self.subjects),
            )
        return self._bucket

    async def close(self) -> None:
        """Stop following outcomes; waiters still waiting time out."""
        if self._tail is not None:
            await self._tail.stop()
            self._tail = None

    async def submit(self, task: Task, *, capability: str = "", agent: str = "") -> bool:
        """Store the task durably; False when the task id was already submitted (it has an
        outcome, or the stream dropped the repeat inside its de-duplication window)."""
        capability = capability or task.capability
        target = dispatch_target(capability=capability, agent="" if capability else agent)
        if not _TASK_ID.match(task.task_id):
            raise ConfigError(f"task id {task.task_id!r} may use only letters, digits, - _ =")
        if await self._stored(task.task_id, within=READ_WITHIN_S) is not None:
            return False  # ran already: its outcome is kept for 7 days, and stands
        if not self._stream_ready:
            # Created when missing; never changed here, so the coordinator's settings (the
            # de-duplication window) stay.
            if not await stream_exists(self.js, self.subjects.dispatch_stream):
                await ensure_dispatch_stream(self.js, self.subjects)
            self._stream_ready = True
        task = msgspec.structs.replace(task, capability=capability)
        subject = self.subjects.dispatch(target)
        # The coordinator's dispatch of this task continues the trace from this span.
        with tracing.sending(subject, message_id=task.task_id):
            ack = await publish_durably(
                self.js, subject, encode(task), headers.for_queued_task(task)
            )
        return not ack.duplicate

    async def outcome(self, task_id: str) -> TaskOutcome | None:
        """The recorded outcome, or None while there is none."""
        data = await self._stored(task_id)
        return None if data is None else decode(data, TaskOutcome)

    async def _stored(self, task_id: str, *, within: float = 0.0) -> bytes | None:
        """The stored outcome's bytes; a read the server could not answer is asked again
        (with a backoff) for `within` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        delay = 0.1
        while True:
            try:
                entry = await (await self._tasks()).get(self.subjects.outcome_key(task_id))
            except KeyNotFoundError:  # also a deleted or expired key
                return None
            except _UNAVAILABLE:
                if loop.time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)  # backoff while the server comes back
                delay = min(delay * 2, 2.0)
                continue
            return entry.value or None

    # hearing outcomes

    async def _follow(self) -> None:
        """Start the tail on the outcome keys, once (before any waiter reads the bucket)."""
        if self._tail is not None:
            return
        async with self._tail_lock:
            if self._tail is None:
                await self._tasks()  # the bucket (its stream) exists
                tail = StreamTail(
                    self.js,
                    self.subjects.tasks_stream,
                    self.subjects.outcome("*"),
                    self._on_outcome,
                )
                await tail.start()
                self._tail = tail

    def _on_outcome(self, msg: Msg) -> None:
        task_id = msg.subject.rsplit(".", 1)[-1]
        waiters = self._waiting.get(task_id)
        if not waiters or not msg.data:  # nobody waits, or a delete or expiry marker
            return
        try:
            outcome = decode(msg.data, TaskOutcome)
        except InvalidMessage as exc:
            log.warning("unreadable outcome", extra={"task_id": task_id, "error": exc.reason})
            return
        for waiter in waiters:
            waiter.heard(outcome)

    @contextlib.asynccontextmanager
    async def _expecting(self, task_id: str) -> AsyncIterator[_Waiter]:
        """A waiter for the task's outcome: registered with the tail before anything is read
        or sent, so an outcome stored from now on resolves it (a `waiting` one extends it)."""
        await self._follow()
        arrived = _Waiter()
        self._waiting.setdefault(task_id, []).append(arrived)
        try:
            yield arrived
        finally:
            waiters = self._waiting.get(task_id, [])
            if arrived in waiters:
                waiters.remove(arrived)
            if not waiters:
                self._waiting.pop(task_id, None)

    async def wait(self, task_id: str, timeout: float) -> TaskOutcome:
        """Wait for the final outcome (it may already be there). A task parked for approvals
        extends the wait to its approvals' expiry plus `timeout`."""
        async with self._expecting(task_id) as arrived:
            return await _within(self._read_or_hear(task_id, arrived), task_id, timeout, arrived)

    async def _read_or_hear(self, task_id: str, arrived: _Waiter) -> TaskOutcome:
        """What the bucket holds now, or else what the tail hands on. The read is retried
        while the server is away (the tail covers whatever is stored meanwhile)."""
        reading = asyncio.ensure_future(self._stored(task_id, within=float("inf")))
        either: set[asyncio.Future[Any]] = {reading, arrived.final}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not arrived.final.done() and (stored := reading.result()) is not None:
                arrived.heard(decode(stored, TaskOutcome))
            return await arrived.final
        finally:
            reading.cancel()

    async def run(
        self, task: Task, *, capability: str = "", agent: str = "", timeout: float = 600.0
    ) -> Result:
        """Submit and wait; the result, or TaskFailed naming every attempt's error."""
        async with self._expecting(task.task_id) as arrived:
            if not await self.submit(task, capability=capability, agent=agent):
                # Submitted before: recorded already, or still in the queue.
                outcome = await _within(
                    self._read_or_hear(task.task_id, arrived), task.task_id, timeout, arrived
                )
                return result_of(outcome)
            return result_of(await _within(arrived.final, task.task_id, timeout, arrived))


class _Waiter:
    """One wait for a task's final outcome; a `waiting` outcome heard moves its deadline to
    the approvals' expiry plus the wait's own timeout (the sweep then decides, and the
    resumed task gets as long as any task)."""

    def __init__(self) -> None:
        self.final: asyncio.Future[TaskOutcome] = asyncio.get_running_loop().create_future()
        self.parked: TaskOutcome | None = None
        self._timer: asyncio.Timeout | None = None
        self._timeout = 0.0

    def heard(self, outcome: TaskOutcome) -> None:
        if self.final.done():
            return
        if outcome.final:
            self.final.set_result(outcome)
            return
        self.parked = outcome
        self._extend()

    def timed(self, timer: asyncio.Timeout, timeout: float) -> None:
        self._timer, self._timeout = timer, timeout
        self._extend()

    def _extend(self) -> None:
        if self._timer is None or self.parked is None or not self.parked.waiting_until:
            return
        try:
            until = datetime.datetime.fromisoformat(self.parked.waiting_until)
        except ValueError:
            return
        left = (until - datetime.datetime.now(datetime.UTC)).total_seconds()
        deadline = asyncio.get_running_loop().time() + max(0.0, left) + self._timeout
        when = self._timer.when()
        if when is not None and deadline > when:
            self._timer.reschedule(deadline)


async def _within(
    outcome: Awaitable[TaskOutcome], task_id: str, timeout: float, waiter: _Waiter | None = None
) -> TaskOutcome:
    raise_if_cancelled()
    try:
        async with asyncio.timeout(timeout) as timer:
            if waiter is not None:
                waiter.timed(timer, timeout)
            return await outcome
    except TimeoutError:
        if waiter is not None and waiter.parked is not None:
            raise RequestTimeout(
                f"task {task_id} is still waiting for approvals "
                f"{', '.join(waiter.parked.waiting_for)} after {timeout}s past their expiry; "
                "is a coordinator running (it applies expiries)?"
            ) from None
        raise RequestTimeout(
            f"task {task_id} has no outcome after {timeout}s; it stays queued — "
            "is a coordinator running, and an agent for its capability?"
        ) from None


def result_of(outcome: TaskOutcome) -> Result:
    """The result of a completed task; TaskFailed with every attempt's error otherwise."""
    if outcome.status == "completed" and outcome.result is not None:
        return outcome.result
    history = "; ".join(f"attempt {e.attempt}: {e.code}: {e.reason}" for e in outcome.errors)
    raise TaskFailed(f"task {outcome.task_id} failed after {outcome.attempts} attempts: {history}")
