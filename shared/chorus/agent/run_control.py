"""Cancel and steer reaching an agent's work: the tasks this instance runs, by run.

Every instance subscribes to `<prefix>.runs.cancel.*`. A cancel of a run cancels the asyncio
task of each of its tasks here: the model's HTTP stream is closed (the openai client's
response is closed as its await is cancelled), the running tools are cancelled (the tool
loop's task group), and the task answers `run_cancelled`, which the dispatcher records as
final (no retry). Peer tools carry the caller's run id, so delegated work stops too.

Before a task starts, the run's control record (`chorus.client.control`) is looked at: a
task of a run cancelled before it arrived (queued, or this instance missed the message) is
not started. Before each model turn, the tool loop reads the record again for the steer
messages it has not added yet (and stops if the run was cancelled meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from chorus.client.control import RunControls
from chorus.errors import InvalidMessage, RunCancelled
from chorus.messages import RunCancel, decode
from chorus.subjects import Subjects

log = logging.getLogger("chorus.agent.run_control")

REMEMBERED = 1024  # cancelled runs kept in memory (the control record holds them all)

Steering = Callable[[], Awaitable[list[str]]]
"""Called before each model turn: the steer messages not given to this conversation yet."""


class RunWork:
    def __init__(self, nc: Client, subjects: Subjects) -> None:
        self.nc = nc
        self.subjects = subjects
        self.controls = RunControls(nc.jetstream(), subjects)
        self._running: dict[str, set[asyncio.Task[object]]] = {}
        self._cancelled: OrderedDict[str, str] = OrderedDict()
        self._stopping: set[asyncio.Task[object]] = set()  # cancelled by a run cancel
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        self._subscription = await self.nc.subscribe(
            self.subjects.all_run_cancels, cb=self._on_cancel
        )

    async def stop(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()

    def running_tasks(self, run_id: str) -> int:
        return len(self._running.get(run_id, ()))

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            request = decode(msg.data, RunCancel)
        except InvalidMessage as exc:
            log.warning("bad cancel request", extra={"error": exc.reason})
            return
        self.cancel(request.run_id, request.reason or "cancelled on request")

    def cancel(self, run_id: str, reason: str) -> None:
        """Stop every task of the run this instance runs, and start none of it from now."""
        self._cancelled[run_id] = reason
        self._cancelled.move_to_end(run_id)
        while len(self._cancelled) > REMEMBERED:
            self._cancelled.popitem(last=False)
        tasks = self._running.get(run_id, set())
        if tasks:
            log.info("cancelling the run's tasks", extra={"run_id": run_id, "tasks": len(tasks)})
        for task in tasks:
            self._stopping.add(task)
            task.cancel()

    @contextlib.asynccontextmanager
    async def running(self, run_id: str, what: str) -> AsyncIterator[None]:
        """Around one task of `run_id`: RunCancelled when the run is (or gets) cancelled."""
        if not run_id:
            yield
            return
        task = asyncio.current_task()
        assert task is not None
        self._running.setdefault(run_id, set()).add(task)
        try:
            # Registered first, then looked: a cancel in between reaches the task either way.
            if run_id in self._cancelled or await self.controls.is_cancelled(run_id):
                raise RunCancelled(f"run {run_id} was cancelled; {what} was not started")
            yield
        except asyncio.CancelledError:
            if task not in self._stopping:
                raise  # shutting down, or the caller's own cancel: not ours to turn
            task.uncancel()
            raise RunCancelled(f"run {run_id} was cancelled; {what} was stopped") from None
        finally:
            self._stopping.discard(task)
            tasks = self._running.get(run_id)
            if tasks is not None:
                tasks.discard(task)
                if not tasks:
                    del self._running[run_id]

    def steering(self, run_id: str) -> Steering | None:
        """What the tool loop of one task calls before each model turn."""
        if not run_id:
            return None
        given: set[str] = set()

        async def pending() -> list[str]:
            control = await self.controls.get(run_id)
            if control is None:
                return []
            if control.cancelled:
                raise RunCancelled(f"run {run_id} was cancelled; the task stopped before a turn")
            new = [m for m in control.steer if m.id not in given]
            given.update(m.id for m in new)
            return [m.text for m in new]

        return pending
