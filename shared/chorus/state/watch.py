"""Subscriptions to changes of shared state made by other writers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Final

from chorus.state.bucket import BucketWatch, Record, StateBucket
from chorus.state.values import StateValue, to_state_value
from chorus.subjects import LOCK_KEY_PREFIX

log = logging.getLogger("chorus.state")

WatchCallback = Callable[[StateValue], Awaitable[None]]

# Iterator mode buffers this many changes; past it the server holds the rest (flow control).
QUEUE_SIZE: Final = 1024


class _Closed:
    pass


_CLOSED: Final = _Closed()


class StateWatch:
    """Changes to the keys matching a pattern, except the watcher's own writes.

    Without a callback it is an async iterator of `StateValue`; with one, the callback is
    awaited for each change, one at a time and in revision order (keep it short, or hand the
    work to a task you own). `close()` (or leaving `async with`) stops it; iteration then ends.
    """

    def __init__(
        self,
        bucket: StateBucket,
        pattern: str,
        writer: str,
        callback: WatchCallback | None,
        *,
        include_current: bool,
        on_close: Callable[[StateWatch], None] | None = None,
    ) -> None:
        self.pattern = pattern
        self._bucket = bucket
        self._writer = writer
        self._callback = callback
        self._include_current = include_current
        self._on_close = on_close
        # Lock leases live in the same bucket; a watcher sees them only when it asks for them.
        self._hide_locks = not pattern.startswith(LOCK_KEY_PREFIX)
        self._snapshot_until = 0
        self._queue: asyncio.Queue[StateValue | _Closed] = asyncio.Queue(QUEUE_SIZE)
        self._watch: BucketWatch | None = None
        self._closed = False

    async def start(self) -> StateWatch:
        if self._include_current:
            # Current values are those stored before the watch began; they are delivered
            # whoever wrote them. Everything after is a change, filtered by writer.
            self._snapshot_until = await self._bucket.last_revision()
        self._watch = await self._bucket.watch(
            self.pattern, self._on_record, include_current=self._include_current
        )
        return self

    async def _on_record(self, record: Record) -> None:
        if self._hide_locks and record.key.startswith(LOCK_KEY_PREFIX):
            return
        in_snapshot = record.revision <= self._snapshot_until
        if in_snapshot and record.removed:
            return  # a tombstone is not a current value
        value = to_state_value(record)
        if not in_snapshot and value.writer == self._writer:
            return
        if self._callback is None:
            await self._queue.put(value)
            return
        try:
            await self._callback(value)
        except Exception:
            # One failing callback must not end the watch; the failure is logged, not hidden.
            log.exception(
                "state watch callback failed",
                extra={"pattern": self.pattern, "key": value.key, "revision": value.revision},
            )

    async def close(self) -> None:
        """Stop receiving changes. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        watch, self._watch = self._watch, None
        if watch is not None:
            await watch.close()
        if self._on_close is not None:
            self._on_close(self)
        while True:  # make room for the end marker; the changes dropped were never read
            try:
                self._queue.put_nowait(_CLOSED)
                return
            except asyncio.QueueFull:
                self._queue.get_nowait()

    def __aiter__(self) -> StateWatch:
        if self._callback is not None:
            raise TypeError("this watch delivers to its callback; it cannot also be iterated")
        return self

    async def __anext__(self) -> StateValue:
        item = await self._queue.get()
        if isinstance(item, _Closed):
            self._queue.put_nowait(item)  # later readers end too
            raise StopAsyncIteration
        return item

    async def next(self, timeout: float) -> StateValue:
        """The next change, waiting at most `timeout` seconds (TimeoutError after)."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    async def __aenter__(self) -> StateWatch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
