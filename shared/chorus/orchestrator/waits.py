"""Timeouts of human steps, applied by whichever orchestrator is alive.

Who notices a deadline when the orchestrator that parked the run is gone? Every orchestrator
runs a `WaitTimer`: it reads every `HumanWait` (`<run>.wait` in the runs bucket, one read),
and sleeps until the earliest deadline or `CHORUS_WAIT_SWEEP` (10 s), whichever comes first;
a run parked by this orchestrator wakes it at once. At a deadline it stores the timeout's
answer with create (a person's answer stored first wins, and so does one timer of several)
and queues a `RunResume` (de-duplicated per step). A fresh read each time, not a watch: it
survives a nats-server restart and a replica that was down learns every wait at start.

The same sweep heals what a crash can leave: an answer stored whose resume was never queued
is resumed again, and the wait of a run that has finished (cancelled while waiting) is
removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.errors import Error as NatsError

from chorus.client.runs import RunClient
from chorus.client.runstore import KvRunStore
from chorus.errors import ChorusError, Conflict
from chorus.messages import HumanAnswer, HumanWait, now

log = logging.getLogger("chorus.orchestrator.waits")

MIN_SLEEP_S = 0.05


class WaitTimer:
    def __init__(self, store: KvRunStore, runs: RunClient, *, sweep: float) -> None:
        self.store = store
        self.runs = runs
        self.sweep = sweep
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="wait-timer")

    def nudge(self) -> None:
        """A run was parked here: read the waits again now (its deadline may be the next)."""
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            pause = self.sweep
            try:
                pause = await self.check()
            except (NatsError, TimeoutError, ChorusError) as exc:
                log.warning("waiting runs not read", extra={"error": repr(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(pause, MIN_SLEEP_S))

    async def check(self) -> float:
        """Time out the waits past their deadline; seconds until the next deadline (at most
        the sweep interval)."""
        pause = self.sweep
        for wait in await self.store.waits():
            left = wait.deadline - now() if wait.deadline else None
            if left is not None and left <= 0:
                await self._settle(wait, timed_out=True)
                continue
            if left is not None:
                pause = min(pause, left)
            await self._settle(wait, timed_out=False)
        return pause

    async def _settle(self, wait: HumanWait, *, timed_out: bool) -> None:
        head = await self.store.head(wait.run_id)
        if head is None or head.finished:
            await self.store.unpark(wait.run_id)  # cancelled while waiting, or gone
            return
        answer = await self.store.answer(wait.run_id, wait.step)
        if answer is None and not timed_out:
            return
        if answer is None:
            log.info("human step timed out", extra={"run_id": wait.run_id, "step": wait.step})
            with contextlib.suppress(Conflict):  # answered a moment ago: that answer stands
                await self.store.store_answer(
                    HumanAnswer(run_id=wait.run_id, step=wait.step, source="timeout")
                )
        elif head.status != "waiting":
            return  # resumed already: whoever holds it now removes the wait
        await self.runs.resume(wait.run_id, wait.step, "timeout" if timed_out else "person")
