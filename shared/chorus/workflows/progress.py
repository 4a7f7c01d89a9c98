"""Run progress on NATS: `NatsProgress` publishes it, `ProgressWatch` follows one run's."""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeout

from chorus.errors import InvalidMessage
from chorus.messages import RunProgress, decode, encode, headers
from chorus.nats import wire
from chorus.subjects import Subjects

log = logging.getLogger("chorus.workflows")

FINAL_KINDS = frozenset({"run_completed", "run_failed", "run_cancelled"})


class NatsProgress:
    """Publishes each RunProgress on `<prefix>.run.<run>.<kind>` (core NATS: fire and forget;
    the run record in KV is the durable account)."""

    def __init__(self, nc: Client, subjects: Subjects) -> None:
        self.nc = nc
        self.subjects = subjects

    async def publish(self, progress: RunProgress) -> None:
        await wire.publish(
            self.nc,
            self.subjects.run_progress(progress.run_id, progress.kind),
            encode(progress),
            headers.for_run(progress.run_id),
        )


class NoProgress:
    """Progress nobody listens to."""

    async def publish(self, progress: RunProgress) -> None:
        return None


class ProgressWatch:
    """Follow one run's progress; subscribe before the run starts to see all of it.

    async with ProgressWatch(nc, subjects, run_id) as watch:
        async for progress in watch:      # ends after run_completed/failed/cancelled
            ...
    """

    def __init__(self, nc: Client, subjects: Subjects, run_id: str, *, idle: float = 600) -> None:
        self.nc = nc
        self.subjects = subjects
        self.run_id = run_id
        self.idle = idle  # seconds without news before iteration gives up
        self._sub: Subscription | None = None
        self._done = False

    async def __aenter__(self) -> ProgressWatch:
        self._sub = await self.nc.subscribe(self.subjects.run_all(self.run_id))
        await self.nc.flush(timeout=5)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def next(self, timeout: float) -> RunProgress:
        """The next progress message; raises TimeoutError after `timeout` seconds."""
        assert self._sub is not None, "use ProgressWatch in `async with`"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                msg = await self._sub.next_msg(timeout=max(deadline - loop.time(), 0.001))
            except NatsTimeout:
                raise TimeoutError(f"no progress of run {self.run_id} in {timeout}s") from None
            try:
                return decode(msg.data, RunProgress)
            except InvalidMessage as exc:
                log.warning("bad progress message", extra={"error": str(exc)})

    def __aiter__(self) -> ProgressWatch:
        return self

    async def __anext__(self) -> RunProgress:
        if self._done:
            raise StopAsyncIteration
        progress = await self.next(self.idle)
        self._done = progress.kind in FINAL_KINDS
        return progress
