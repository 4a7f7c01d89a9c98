"""One KV key as this process last saw it, kept current by a watch, written compare-and-set.

A limited model call reads its limits' windows from the mirror (no round trip) and writes
with the revision it saw: one round trip when nobody wrote in between, a fresh read and a
retry when somebody did. Waiters (no room in the window, a provider pause) wait on `changed`
with a timeout, so another process's settle or pause wakes them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final, Generic, TypeVar

import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from chorus.errors import InvalidMessage
from chorus.messages import Message, decode, encode

log = logging.getLogger("chorus.spend.mirror")

T = TypeVar("T", bound=Message)

READY_TIMEOUT_S: Final = 5.0
# A wait re-reads the key at least this often: a safety net for a change the watch missed
# (a reconnect), not the way changes are noticed.
MAX_WAIT_S: Final = 5.0


class KeyMirror(Generic[T]):
    """The value (None: absent) and revision (0: never written) of `key`."""

    def __init__(self, kv: KeyValue, key: str, kind: type[T]) -> None:
        self.kv = kv
        self.key = key
        self.kind = kind
        self.value: T | None = None
        self.revision = 0
        self.stale = True  # no value read yet, or a write found a newer revision
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None

    async def start(self) -> None:
        """Follow the key; returns once the current value is in."""
        self._watcher = await self.kv.watch(self.key)
        ready = asyncio.Event()
        self._task = asyncio.create_task(self._follow(self._watcher, ready), name=self.key)
        try:
            await asyncio.wait_for(ready.wait(), READY_TIMEOUT_S)
        except TimeoutError:
            self.stale = True  # nothing heard yet: the first use reads the key itself

    async def _follow(self, watcher: KeyValue.KeyWatcher, ready: asyncio.Event) -> None:
        async for entry in watcher:
            if entry is None:  # "that was the current value": none when nothing came
                if self.revision == 0:
                    self.value, self.stale = None, False
                ready.set()
                continue
            self._take(entry.value if entry.operation is None else None, entry.revision or 0)
            ready.set()

    def _take(self, data: bytes | None, revision: int) -> None:
        if revision < self.revision:
            return  # an older write than one this process already made or read
        value = None
        if data:
            try:
                value = decode(data, self.kind)
            except InvalidMessage as exc:
                log.warning(
                    "unreadable value, taken as absent",
                    extra={"key": self.key, "error": exc.reason},
                )
        self.value, self.revision, self.stale = value, revision, False
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def changed(self) -> asyncio.Event:
        """Set at the next change: take it before looking at the value, then wait on it."""
        return self._changed

    async def current(self) -> tuple[T | None, int]:
        """The value and revision: the mirror's, or read from the server when it is stale."""
        if self.stale:
            try:
                entry = await self.kv.get(self.key)
                self._take(entry.value, entry.revision or 0)
            except KeyNotFoundError as exc:
                # A deleted key still has a revision: the next write must name it.
                revision = exc.entry.revision if exc.entry is not None else 0
                self.value, self.revision, self.stale = None, revision or 0, False
        return self.value, self.revision

    async def write(self, value: T, revision: int) -> int:
        """Compare-and-set on `revision` (0: create); raises KeyWrongLastSequenceError when
        someone wrote first (the mirror then reads afresh next time)."""
        data = encode(value)
        try:
            if revision:
                new = await self.kv.update(self.key, data, last=revision)
            else:
                new = await self.kv.create(self.key, data)
        except KeyWrongLastSequenceError:
            self.stale = True
            raise
        if new > self.revision:
            self.value, self.revision = value, new
        return new

    async def wait_changed(self, event: asyncio.Event, timeout: float) -> None:
        """Until `event` (from `changed`) is set or `timeout` passes; at most MAX_WAIT_S,
        after which the next read goes to the server."""
        if timeout <= 0:
            return
        limit = min(timeout, MAX_WAIT_S)
        try:
            await asyncio.wait_for(event.wait(), limit)
        except TimeoutError:
            if limit < timeout:
                self.stale = True

    async def close(self) -> None:
        if self._watcher is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._watcher.stop()  # type: ignore[no-untyped-call]
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
