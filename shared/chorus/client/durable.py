"""Durable tasks from the submitter's side: submit to the work queue, wait for the outcome.

A submission is stored in JetStream (with `Nats-Msg-Id` = task id, so a resubmission within
the de-duplication window is dropped) before `submit` returns. The coordinator records
exactly one outcome per task id in KV; submitters hear it on that key's own subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from chorus.errors import ConfigError, RequestTimeout, TaskFailed
from chorus.messages import Result, Task, TaskOutcome, decode, encode, headers
from chorus.nats.connection import raise_if_cancelled, subscribe
from chorus.nats.streams import ensure_dispatch_stream, ensure_tasks_bucket
from chorus.nats.wire import publish_durably
from chorus.subjects import Subjects, dispatch_target
from chorus.telemetry import tracing

_TASK_ID = re.compile(r"^[A-Za-z0-9_=-]+$")


class TaskQueue:
    def __init__(self, nc: Client, subjects: Subjects) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = subjects
        self._bucket: KeyValue | None = None
        self._stream_ready = False

    async def _tasks(self) -> KeyValue:
        if self._bucket is None:
            self._bucket = await ensure_tasks_bucket(self.js, self.subjects)
        return self._bucket

    async def submit(self, task: Task, *, capability: str = "", agent: str = "") -> bool:
        """Store the task durably; False when the same task id was already submitted."""
        capability = capability or task.capability
        target = dispatch_target(capability=capability, agent="" if capability else agent)
        if not _TASK_ID.match(task.task_id):
            raise ConfigError(f"task id {task.task_id!r} may use only letters, digits, - _ =")
        if not self._stream_ready:
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
        try:
            entry = await (await self._tasks()).get(self.subjects.outcome_key(task_id))
        except KeyNotFoundError:
            return None
        return decode(entry.value or b"", TaskOutcome)

    @contextlib.asynccontextmanager
    async def _announced(self, task_id: str) -> AsyncIterator[asyncio.Future[TaskOutcome]]:
        """A future for the outcome announcement, subscribed before anything is sent."""
        arrived: asyncio.Future[TaskOutcome] = asyncio.get_running_loop().create_future()

        async def on_outcome(msg: Msg) -> None:
            # The key's subject also carries its deletes and expiry markers: no data then.
            if msg.data and not arrived.done():
                arrived.set_result(decode(msg.data, TaskOutcome))

        sub = await subscribe(self.nc, self.subjects.outcome(task_id), cb=on_outcome)
        try:
            yield arrived
        finally:
            await sub.unsubscribe()

    async def wait(self, task_id: str, timeout: float) -> TaskOutcome:
        """Wait for the recorded outcome (it may already be there)."""
        async with self._announced(task_id) as arrived:
            known = await self.outcome(task_id)
            return known if known is not None else await _within(arrived, task_id, timeout)

    async def run(
        self, task: Task, *, capability: str = "", agent: str = "", timeout: float = 600.0
    ) -> Result:
        """Submit and wait; the result, or TaskFailed naming every attempt's error."""
        async with self._announced(task.task_id) as arrived:
            if not await self.submit(task, capability=capability, agent=agent):
                known = await self.outcome(task.task_id)
                if known is not None:
                    return result_of(known)
            return result_of(await _within(arrived, task.task_id, timeout))


async def _within(
    arrived: asyncio.Future[TaskOutcome], task_id: str, timeout: float
) -> TaskOutcome:
    raise_if_cancelled()
    try:
        async with asyncio.timeout(timeout):
            return await arrived
    except TimeoutError:
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
