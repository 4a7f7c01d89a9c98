"""SharedState: JSON values in the `<prefix>-state` bucket, revision-checked updates, watches
that skip the watcher's own writes, history, and locks as leases."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import nats.errors
from nats.aio.client import Client
from nats.js.kv import KV_DEL

from chorus.errors import ChorusError, ConfigError, Conflict, InvalidKey, PayloadTooLarge
from chorus.messages import StateEntry
from chorus.state.bucket import StateBucket, check_key, check_pattern
from chorus.state.locks import Lease, LockContext, Locks
from chorus.state.values import StateValue, encode_entry, to_state_value
from chorus.state.watch import StateWatch, WatchCallback
from chorus.subjects import LOCK_KEY_PREFIX, Subjects

log = logging.getLogger("chorus.state")

DEFAULT_MAX_ATTEMPTS: Final = 100
BACKOFF_S: Final = 0.0005
BACKOFF_CAP_S: Final = 0.05
DEFAULT_LOCK_TTL_S: Final = 10.0
DEFAULT_LOCK_TIMEOUT_S: Final = 30.0


@dataclass
class StateStats:
    """Counters of one SharedState: writes made and revision conflicts met (then retried)."""

    writes: int = 0
    conflicts: int = 0


class SharedState:
    """Shared state of a team of agents, on a JetStream key-value bucket.

    `writer` names who writes (an agent passes its instance id): it is stored with every
    value, and a watch never reports its own writer's changes. Use
    `state = await SharedState(nc, subjects, writer).open()`, or `async with` it.
    """

    def __init__(self, nc: Client, subjects: Subjects, writer: str) -> None:
        if not writer:
            raise ConfigError("a SharedState needs a writer id (an agent passes its instance id)")
        self.nc = nc
        self.subjects = subjects
        self.writer = writer
        self.stats = StateStats()
        self._opened: tuple[StateBucket, Locks] | None = None
        self._watches: set[StateWatch] = set()

    async def open(self) -> SharedState:
        """Create the bucket if it does not exist (idempotent, safe from many processes)."""
        if self._opened is None:
            bucket = await StateBucket.ensure(self.nc, self.subjects)
            self._opened = (bucket, Locks(bucket, self.writer))
        return self

    async def close(self) -> None:
        """Stop every watch this object started. Held locks are left to their owners."""
        watches, self._watches = self._watches, set()
        for watch in list(watches):
            await watch.close()

    async def __aenter__(self) -> SharedState:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _open(self) -> tuple[StateBucket, Locks]:
        if self._opened is None:
            raise ChorusError("SharedState is not open: call `await state.open()` first")
        return self._opened

    @property
    def _bucket(self) -> StateBucket:
        return self._open()[0]

    @property
    def _locks(self) -> Locks:
        return self._open()[1]

    # values

    async def get(self, key: str) -> StateValue | None:
        """The key's value, revision, writer and time; None if it has none (or was deleted)."""
        record = await self._bucket.last(check_key(key))
        if record is None or record.removed:
            return None
        return to_state_value(record)

    async def put(self, key: str, value: Any) -> int:
        """Store any JSON-able value; return the new revision. Last writer wins: see `update`."""
        entry = StateEntry(value=value, writer=self.writer)
        revision = await self._publish(key, encode_entry(_writable(key), entry))
        self.stats.writes += 1
        return revision

    async def delete(self, key: str) -> None:
        """Remove the key's value (its history is kept; watchers see a `delete`)."""
        entry = StateEntry(value=None, writer=self.writer)
        await self._publish(_writable(key), encode_entry(key, entry), operation=KV_DEL)
        self.stats.writes += 1

    async def update(
        self,
        key: str,
        fn: Callable[[Any], Any],
        *,
        default: Any = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        lease: Lease | None = None,
    ) -> StateValue:
        """Read-modify-write without losing a concurrent write: return the value stored.

        `fn` gets the current value (`default` when the key has none) and returns the new
        one. The write is accepted only if the key is still at the revision read; otherwise
        `fn` runs again on the newer value, so it must not have side effects. After
        `max_attempts` conflicts, raise Conflict.

        With `lease`, each attempt first checks that the lease still holds its lock (LeaseLost
        if not). The check and the write are two steps: a lease that expires between them can
        still write once. No write is lost even then, since the write stays revision-checked:
        a new holder that wrote the key after our read makes ours fail, and a new holder that
        updates it later reads ours first. For a write that is refused atomically once the lease
        is gone, use `put_fenced`.
        """
        _writable(key)
        for attempt in range(1, max_attempts + 1):
            record = await self._bucket.last(key)
            current = default if record is None or record.removed else to_state_value(record).value
            entry = StateEntry(value=fn(current), writer=self.writer)
            payload = encode_entry(key, entry)
            if lease is not None:
                await self._locks.check(lease)
            try:
                revision = await self._publish(
                    key, payload, expect=record.revision if record is not None else 0
                )
            except Conflict:
                self.stats.conflicts += 1
                log.debug("state update conflict", extra={"key": key, "attempt": attempt})
                # Random backoff, growing with each loss, spreads out writers that keep
                # colliding; without it the same few can win every round on a hot key.
                backoff = min(BACKOFF_CAP_S, BACKOFF_S * 2 ** min(attempt, 16))
                await asyncio.sleep(random.uniform(0, backoff))
                continue
            self.stats.writes += 1
            return StateValue(
                key=key, value=entry.value, revision=revision, writer=entry.writer, time=entry.time
            )
        raise Conflict(
            f"update of key {key!r} gave up after {max_attempts} attempts: other writers "
            "changed it every time; retry later, or raise max_attempts for a hot key"
        )

    async def put_fenced(self, key: str, value: Any, lease: Lease) -> int:
        """Store `value` only while `lease` still holds its lock; return the new revision.

        Atomic on the server: the publish carries the lock key's expected revision, so once
        the lease expired, was released or was taken over, the write is refused (LeaseLost)
        and nothing is stored.
        """
        entry = StateEntry(value=value, writer=self.writer)
        revision = await self._locks.put_fenced(key, encode_entry(_writable(key), entry), lease)
        self.stats.writes += 1
        return revision

    async def history(self, key: str) -> list[StateValue]:
        """The key's stored revisions, oldest first, deletes included (the last 16 are kept)."""
        return [to_state_value(r) for r in await self._bucket.history(check_key(key))]

    async def keys(self, prefix: str | None = None) -> list[str]:
        """The keys that have a value, sorted: all of them, or `prefix` and the keys under it
        (`orders` lists `orders` and `orders.7`, not `orders2`). Lock leases are listed only
        when `prefix` is under their own prefix (`_lock`)."""
        patterns = [">"] if prefix is None else [check_key(prefix, "prefix"), f"{prefix}.>"]
        found = {key for pattern in patterns for key in await self._bucket.keys(pattern)}
        if not (prefix or "").startswith(LOCK_KEY_PREFIX.rstrip(".")):
            found = {key for key in found if not key.startswith(LOCK_KEY_PREFIX)}
        return sorted(found)

    async def watch(
        self,
        pattern: str,
        callback: WatchCallback | None = None,
        *,
        include_current: bool = False,
    ) -> StateWatch:
        """Follow changes by other writers to a key or a pattern (`orders.*`, `orders.>`, `>`).

        Only changes made after the call are reported, unless `include_current`, which first
        reports the current value of every matching key (whoever wrote it). Returns a
        StateWatch: an async iterator when `callback` is None; close it when done.
        """
        watch = StateWatch(
            self._bucket,
            check_pattern(pattern),
            self.writer,
            callback,
            include_current=include_current,
            on_close=self._watches.discard,
        )
        await watch.start()
        self._watches.add(watch)
        return watch

    async def _publish(
        self, key: str, payload: bytes, *, expect: int | None = None, operation: str | None = None
    ) -> int:
        try:
            return await self._bucket.publish(key, payload, expect=expect, operation=operation)
        except nats.errors.MaxPayloadError:
            raise PayloadTooLarge(
                f"value for key {key!r} is {len(payload)} bytes, more than the server accepts "
                f"({self.nc.max_payload}); store large data elsewhere and keep a reference"
            ) from None

    # locks

    async def try_acquire(self, name: str, *, ttl: float = DEFAULT_LOCK_TTL_S) -> Lease | None:
        """The lock's lease if it is free now, else None."""
        return await self._locks.try_acquire(name, ttl=ttl)

    async def acquire(
        self,
        name: str,
        *,
        ttl: float = DEFAULT_LOCK_TTL_S,
        timeout: float = DEFAULT_LOCK_TIMEOUT_S,
    ) -> Lease:
        """Take the lock, waiting up to `timeout` seconds (0: do not wait); LockTimeout after.

        The lease lasts `ttl` seconds (whole seconds, at least 1) unless renewed, so a holder
        that dies frees the lock within `ttl`. Waiting wakes when the lock is released or
        expires. Release it with `release`, or use `lock()`.
        """
        return await self._locks.acquire(name, ttl=ttl, timeout=timeout)

    async def renew(self, lease: Lease, *, ttl: float | None = None) -> Lease:
        """Extend the lease for its TTL (or `ttl`) from now; LeaseLost if it already expired."""
        return await self._locks.renew(lease, ttl=ttl)

    async def release(self, lease: Lease) -> None:
        """Free the lock; LeaseLost if the lease had expired or been taken over meanwhile."""
        await self._locks.release(lease)

    def lock(
        self,
        name: str,
        *,
        ttl: float = DEFAULT_LOCK_TTL_S,
        timeout: float = DEFAULT_LOCK_TIMEOUT_S,
        auto_renew: bool = True,
    ) -> LockContext:
        """`async with state.lock("name") as lease:` holds the lock for the block, renewing it
        in the background (`auto_renew`), and releases it at the end."""
        return self._locks.lock(name, ttl=ttl, timeout=timeout, auto_renew=auto_renew)


def _writable(key: str) -> str:
    check_key(key)
    if key.startswith(LOCK_KEY_PREFIX):
        raise InvalidKey(
            f"key {key!r} is reserved for lock leases ({LOCK_KEY_PREFIX}...): use lock()"
        )
    return key
