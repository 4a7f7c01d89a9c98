"""Locks as leases: a KV entry with a per-key TTL, so a lock frees itself when its holder dies.

A lock named `n` is the key `_lock.n` of the state bucket, holding a `LockEntry` stored with a
`Nats-TTL`. Acquiring is a create (revision-checked against "no value"); the server removes
the entry when the TTL passes and writes an expiry marker, which wakes waiters: nobody polls.
Renewal rewrites the entry (revision-checked) with a fresh TTL; release purges it
(revision-checked), so only the current holder can do either.

Fencing: a `Lease` carries `token`, the revision at which it was acquired. Revisions only
grow, so a later holder always has a larger token, which other systems can use to refuse
stale holders. Within the state bucket, `put_fenced` is a single publish the server accepts
only while the lock key is still at the lease's revision, so an expired or taken-over lease
can never write.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final

import msgspec
import nats.errors
from nats.js.kv import KV_PURGE

from chorus.errors import ConfigError, Conflict, LeaseLost, LockTimeout
from chorus.messages import LockEntry, encode, new_id
from chorus.state.bucket import Record, StateBucket, check_key

log = logging.getLogger("chorus.state.locks")

_entry_decoder = msgspec.json.Decoder(LockEntry)
# A fenced write refused because a renewal of the same lease landed first is retried.
_FENCE_RETRIES: Final = 3


@dataclass
class Lease:
    """A held lock. `token` is the fencing token; `revision` moves on with each renewal."""

    name: str
    key: str
    lease_id: str
    holder: str
    token: int
    revision: int
    ttl_s: int
    acquired_at: float
    expires_at: float = field(default=0.0)  # time.monotonic() by which the server frees it
    held: bool = True  # False once released, or once found expired or taken over

    @property
    def remaining(self) -> float:
        """Seconds until the lease expires unless renewed (at most; may be negative)."""
        return self.expires_at - time.monotonic()


def whole_seconds(ttl: float, minimum: int) -> int:
    """The server counts TTLs in whole seconds and keeps none below the bucket's minimum."""
    if not ttl >= 1:
        raise ConfigError(f"lock ttl must be at least 1 second, got {ttl!r}")
    return max(math.ceil(ttl), minimum)


def _entry(record: Record) -> LockEntry | None:
    if record.removed:
        return None
    try:
        return _entry_decoder.decode(record.data)
    except msgspec.DecodeError:
        return None


class Locks:
    """Acquire, renew and release leases, and write state fenced by one."""

    def __init__(self, bucket: StateBucket, writer: str) -> None:
        self._bucket = bucket
        self._writer = writer

    def _ttl(self, ttl: float) -> int:
        return whole_seconds(ttl, self._bucket.min_ttl_s)

    def _key(self, name: str) -> str:
        check_key(name, "lock name")
        return self._bucket.subjects.lock_key(name)

    async def try_acquire(self, name: str, *, ttl: float) -> Lease | None:
        """The lease if the lock is free now, else None. Never waits."""
        lease, _ = await self._attempt(name, self._key(name), self._ttl(ttl))
        return lease

    async def acquire(self, name: str, *, ttl: float, timeout: float) -> Lease:
        """Wait up to `timeout` seconds for the lock (0: try once); raise LockTimeout after.

        A waiter watches the lock key and tries again when the entry is released, purged or
        expires; it sleeps on that event, never on a clock.
        """
        key, ttl_s = self._key(name), self._ttl(ttl)
        lease, holder = await self._attempt(name, key, ttl_s)
        if lease is not None:
            return lease
        if timeout <= 0:
            raise LockTimeout(f"lock {name!r} is held{_by(holder)}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        freed = asyncio.Event()

        async def on_change(record: Record) -> None:
            if record.removed:
                freed.set()

        # Watch first, then try again: a release between the two attempts is not missed.
        watch = await self._bucket.watch(key, on_change)
        try:
            while True:
                freed.clear()
                lease, holder = await self._attempt(name, key, ttl_s)
                if lease is not None:
                    return lease
                remaining = deadline - loop.time()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    await asyncio.wait_for(freed.wait(), remaining)
                except TimeoutError:
                    raise LockTimeout(
                        f"lock {name!r} is still held{_by(holder)} after waiting {timeout:g}s"
                    ) from None
        finally:
            await watch.close()

    async def _attempt(self, name: str, key: str, ttl_s: int) -> tuple[Lease | None, Record | None]:
        current = await self._bucket.last(key)
        if current is not None and not current.removed:
            return None, current
        entry = LockEntry(holder=self._writer, lease_id=new_id(), ttl_s=ttl_s)
        started = time.monotonic()
        try:
            revision = await self._bucket.publish(
                key,
                encode(entry),
                expect=current.revision if current else 0,
                ttl_s=ttl_s,
                rollup=True,  # drop the old marker: the key holds one message
            )
        except Conflict:
            return None, None  # someone else took it between our read and our write
        log.debug("lock acquired", extra={"lock": name, "token": revision, "ttl_s": ttl_s})
        return (
            Lease(
                name=name,
                key=key,
                lease_id=entry.lease_id,
                holder=self._writer,
                token=revision,
                revision=revision,
                ttl_s=ttl_s,
                acquired_at=entry.acquired_at,
                expires_at=started + ttl_s,
            ),
            None,
        )

    async def renew(self, lease: Lease, *, ttl: float | None = None) -> Lease:
        """Extend the lease by its TTL (or a new one) from now; LeaseLost if it is gone."""
        ttl_s = self._ttl(ttl) if ttl is not None else lease.ttl_s
        entry = LockEntry(
            holder=lease.holder,
            lease_id=lease.lease_id,
            ttl_s=ttl_s,
            acquired_at=lease.acquired_at,
            token=lease.token,
        )
        for _ in range(_FENCE_RETRIES):
            started = time.monotonic()
            try:
                lease.revision = await self._bucket.publish(
                    lease.key, encode(entry), expect=lease.revision, ttl_s=ttl_s, rollup=True
                )
            except Conflict:
                # A renewal whose acknowledgement was lost still moved the revision on.
                if await self._still_held(lease):
                    continue
                raise LeaseLost(await self._lost(lease, "could not be renewed")) from None
            lease.ttl_s, lease.expires_at = ttl_s, started + ttl_s
            return lease
        raise LeaseLost(f"lock {lease.name!r} kept changing revision; renewal failed")

    async def release(self, lease: Lease) -> None:
        """Free the lock now; LeaseLost if the lease had already expired or been taken over."""
        for _ in range(_FENCE_RETRIES):
            try:
                await self._bucket.publish(
                    lease.key,
                    b"",
                    expect=lease.revision,
                    operation=KV_PURGE,
                    rollup=True,
                    ttl_s=self._bucket.min_ttl_s,  # the purge marker goes away by itself
                )
            except Conflict:
                if await self._still_held(lease):
                    continue  # a renewal landed after we read the revision
                raise LeaseLost(await self._lost(lease, "was released too late")) from None
            lease.held = False
            log.debug("lock released", extra={"lock": lease.name, "token": lease.token})
            return
        raise LeaseLost(f"lock {lease.name!r} kept changing revision; release failed")

    async def check(self, lease: Lease) -> None:
        """Raise LeaseLost unless the lock key still holds this lease."""
        if not await self._still_held(lease):
            raise LeaseLost(await self._lost(lease, "is no longer held"))

    async def put_fenced(self, key: str, payload: bytes, lease: Lease) -> int:
        """Store `payload` at `key` only while `lease` holds its lock, atomically."""
        for _ in range(_FENCE_RETRIES):
            try:
                return await self._bucket.publish(
                    key, payload, expect=lease.revision, expect_key=lease.key
                )
            except Conflict:
                if not await self._still_held(lease):
                    reason = f"is no longer held, so the write to {key!r} was refused"
                    raise LeaseLost(await self._lost(lease, reason)) from None
        raise LeaseLost(f"lock {lease.name!r} kept changing revision; the write to {key!r} failed")

    async def _still_held(self, lease: Lease) -> bool:
        """Whether the lock key holds this lease; catches up with a renewal made meanwhile."""
        current = await self._bucket.last(lease.key)
        entry = _entry(current) if current is not None else None
        if current is None or entry is None or entry.lease_id != lease.lease_id:
            return False
        lease.revision = current.revision
        return True

    async def _lost(self, lease: Lease, what: str) -> str:
        """Mark the lease lost; say why, naming the lock's current holder if any."""
        lease.held = False
        current = await self._bucket.last(lease.key)
        holder = _by(current) or " by nobody (it expired or was released)"
        return f"lock {lease.name!r} (lease token {lease.token}) {what}: it is now held{holder}"

    def lock(
        self, name: str, *, ttl: float, timeout: float, auto_renew: bool = True
    ) -> LockContext:
        return LockContext(self, name, ttl=ttl, timeout=timeout, auto_renew=auto_renew)


def _by(holder: Record | None) -> str:
    entry = _entry(holder) if holder is not None else None
    if entry is None or holder is None:
        return ""
    return f" by {entry.holder!r} (token {entry.token or holder.revision})"


class LockContext:
    """`async with state.lock(name) as lease:` holds the lock for the block.

    With `auto_renew` a task owned by the context renews the lease every third of its TTL,
    so a long holder keeps it while a dead one loses it within one TTL. If the lease is lost
    anyway (the process stalled longer than the TTL, or lost the server), fenced writes are
    refused from then on, and leaving the block raises LeaseLost unless the block raised.
    """

    def __init__(
        self, locks: Locks, name: str, *, ttl: float, timeout: float, auto_renew: bool
    ) -> None:
        self._locks = locks
        self._name = name
        self._ttl = ttl
        self._timeout = timeout
        self._auto_renew = auto_renew
        self._lease: Lease | None = None
        self._renewer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Lease:
        self._lease = await self._locks.acquire(self._name, ttl=self._ttl, timeout=self._timeout)
        if self._auto_renew:
            self._renewer = asyncio.create_task(
                self._keep_alive(self._lease), name=f"chorus-lock-renew-{self._name}"
            )
        return self._lease

    async def _keep_alive(self, lease: Lease) -> None:
        while lease.held:
            await asyncio.sleep(lease.ttl_s / 3)  # a schedule, not a wait for a condition
            try:
                await self._locks.renew(lease)
            except LeaseLost as exc:
                log.warning("lock lease lost", extra={"lock": lease.name, "reason": str(exc)})
                return
            except (nats.errors.Error, TimeoutError) as exc:
                # The next tick tries again; the lease survives while one succeeds within TTL.
                log.warning(
                    "lock renewal failed",
                    extra={"lock": lease.name, "error": repr(exc), "left_s": lease.remaining},
                )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            # asyncio.wait, not `await renewer`: a cancellation of our own task still propagates.
            await asyncio.wait([renewer])
            if not renewer.cancelled() and renewer.exception() is not None:
                log.error(
                    "lock renewal task failed",
                    extra={"lock": self._name},
                    exc_info=renewer.exception(),
                )
        lease, self._lease = self._lease, None
        if lease is None:
            return
        try:
            await self._locks.release(lease)
        except LeaseLost as lost:
            if exc_type is None:
                raise
            log.warning("lock lease was lost", extra={"lock": lease.name, "reason": str(lost)})
