"""Shared provider limits and pauses, drawn from by every process before it calls a model.

Mechanism (numbers in docs/performance.md, "Limits, budgets and costs"): each limit is one
KV key holding its sliding window (`chorus.spend.window`). Every process mirrors the key
with a watch; a call books itself with one compare-and-set on the revision it saw (a
conflict reads the key and tries again) and corrects its tokens in the background once the
call ended. A provider's 429 writes a pause key that every process calling that model with
that API key mirrors too: they all wait until it ends, woken by the watch.

    limiter = await Limiter.open(js, subjects, LimitsFile.load(settings.limits), env, instance)
    gate = await limiter.gate("openai:gpt-5", account)       # once per model and key
    permit = await gate.admit(expected_tokens, wait=None)    # waits for room (and pauses)
    ...                                                      # the model call
    permit.settle(reply.usage.total_tokens)                  # in the background
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Final, NamedTuple

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from chorus.errors import RateLimited
from chorus.messages import LimitWindow, RatePause
from chorus.nats.streams import ensure_limits_bucket
from chorus.spend import window
from chorus.spend.limits import LimitsFile
from chorus.spend.mirror import KeyMirror
from chorus.spend.window import Rates
from chorus.subjects import Subjects

log = logging.getLogger("chorus.spend.limiter")

Clock = Callable[[], float]
SETTLE_ATTEMPTS: Final = 50
PAUSE_ATTEMPTS: Final = 20


class Booking(NamedTuple):
    """One call's place in one limit's window."""

    limit: SharedLimit
    slot: int
    tokens: int
    lease: str


class SharedLimit:
    """One limit shared by every process: its window in KV (`limit.<name>`)."""

    def __init__(
        self, kv: KeyValue, key: str, rates: Rates, *, lease_s: float, clock: Clock
    ) -> None:
        self.key = key
        self.rates = rates
        self.lease_s = lease_s
        self.clock = clock
        self.mirror = KeyMirror(kv, key, LimitWindow)
        self.conflicts = 0  # compare-and-set retries, for the bench

    async def book(self, tokens: int, deadline: float) -> Booking:
        """Room for one call expected to use `tokens`; waits for it until `deadline` (Unix
        time), then raises RateLimited saying when there would have been room."""
        lease = uuid.uuid4().hex[:12]
        while True:
            changed = self.mirror.changed
            current, revision = await self.mirror.current()
            t = self.clock()
            outcome = window.admit(
                current or LimitWindow(), t, tokens, self.rates, lease, self.lease_s
            )
            if isinstance(outcome, float):
                if outcome > deadline:
                    raise RateLimited(
                        f"shared limit {self.key} has no room for {outcome - t:.1f}s",
                        retry_after=outcome - t,
                    )
                await self.mirror.wait_changed(changed, outcome - t)
                continue
            try:
                await self.mirror.write(outcome, revision)
            except KeyWrongLastSequenceError:
                self.conflicts += 1
                continue
            return Booking(
                self, window.slot_of(t, self.rates), window.clamp_tokens(tokens, self.rates), lease
            )

    def needs_settle(self, booking: Booking, actual: int) -> bool:
        return bool(self.rates.concurrent or (self.rates.tokens and actual != booking.tokens))

    async def settle(self, booking: Booking, actual: int) -> None:
        """Correct the booked tokens to `actual` and end the call's lease."""
        for _ in range(SETTLE_ATTEMPTS):
            current, revision = await self.mirror.current()
            if current is None:
                return
            t = self.clock()
            settled = window.settle(
                current, t, self.rates, booking.slot, booking.tokens, actual, booking.lease
            )
            try:
                await self.mirror.write(settled, revision)
                return
            except KeyWrongLastSequenceError:
                self.conflicts += 1
        # Left as booked (and the lease lapses by itself): the window errs on the safe side.
        log.warning("could not settle a call in its limit", extra={"key": self.key})


class ProviderPause:
    """The pause a provider's 429 put on one model with one API key (`pause.<key>.<model>`)."""

    def __init__(self, kv: KeyValue, key: str, *, clock: Clock, instance: str) -> None:
        self.key = key
        self.clock = clock
        self.instance = instance
        self.mirror = KeyMirror(kv, key, RatePause)

    async def wait(self, deadline: float) -> None:
        """Return once no pause is on; RateLimited when it lasts past `deadline`."""
        while True:
            changed = self.mirror.changed
            pause, _ = await self.mirror.current()
            t = self.clock()
            if pause is None or pause.until <= t:
                return
            if pause.until > deadline:
                raise RateLimited(
                    f"the provider paused {self.key} for {pause.until - t:.1f}s more: "
                    f"{pause.reason}",
                    retry_after=pause.until - t,
                )
            await self.mirror.wait_changed(changed, pause.until - t)

    async def pause(self, seconds: float, reason: str) -> float:
        """Pause every process for `seconds` from now (a longer pause already on stays);
        returns when the pause ends."""
        until = self.clock() + seconds
        for _ in range(PAUSE_ATTEMPTS):
            pause, revision = await self.mirror.current()
            if pause is not None and pause.until >= until:
                return pause.until
            try:
                await self.mirror.write(
                    RatePause(until=until, reason=reason, by=self.instance), revision
                )
                log.warning(
                    "provider rate limit: every process pauses this model",
                    extra={"key": self.key, "seconds": round(seconds, 3), "reason": reason},
                )
                return until
            except KeyWrongLastSequenceError:
                continue
        return until


class Permit:
    """Room for one call in every limit it falls under; `settle` it once the call ended."""

    def __init__(self, limiter: Limiter, bookings: list[Booking]) -> None:
        self._limiter = limiter
        self.bookings = bookings

    def settle(self, actual_tokens: int) -> None:
        """Correct each limit's tokens to what the call used (0 for a call that sent
        nothing useful) and end its leases, in the background."""
        for booking in self.bookings:
            if booking.limit.needs_settle(booking, actual_tokens):
                self._limiter.background(booking.limit.settle(booking, actual_tokens))


class Gate:
    """What calls to one model with one API key draw on: its limits and its pause."""

    def __init__(
        self, limiter: Limiter, limits: list[SharedLimit], pause: ProviderPause | None
    ) -> None:
        self._limiter = limiter
        self.limits = limits
        self.pause = pause

    async def admit(self, tokens: int, *, wait: float | None) -> Permit:
        """Wait for the pause to end and for room in every limit; RateLimited when that
        takes longer than `wait` seconds (None: as long as it takes)."""
        deadline = math.inf if wait is None else self._limiter.clock() + wait
        if self.pause is not None:
            await self.pause.wait(deadline)
        bookings: list[Booking] = []
        try:
            for limit in self.limits:
                bookings.append(await limit.book(tokens, deadline))
        except BaseException:
            Permit(self._limiter, bookings).settle(0)
            raise
        return Permit(self._limiter, bookings)

    async def rate_limited(self, retry_after: float, reason: str) -> float:
        """The provider said 429: pause every process; returns when the pause ends."""
        if self.pause is None:
            return self._limiter.clock() + retry_after
        return await self.pause.pause(retry_after, reason)


class Limiter:
    """The shared limits and pauses one process draws on, by model and API key."""

    def __init__(
        self,
        kv: KeyValue,
        subjects: Subjects,
        config: LimitsFile,
        env: Mapping[str, str],
        *,
        instance: str = "",
        clock: Clock = time.time,
    ) -> None:
        self.kv = kv
        self.subjects = subjects
        self.config = config
        self.env = env
        self.instance = instance
        self.clock = clock
        self._gates: dict[tuple[str, str], Gate] = {}
        self._limits: dict[str, SharedLimit] = {}
        self._pauses: dict[str, ProviderPause] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        subjects: Subjects,
        config: LimitsFile,
        env: Mapping[str, str],
        *,
        instance: str = "",
    ) -> Limiter:
        return cls(
            await ensure_limits_bucket(js, subjects), subjects, config, env, instance=instance
        )

    async def gate(self, model: str, account: str) -> Gate:
        """The gate of `model` (`openai:gpt-5`) called with the key named `account` (""
        for a model without one): its matching limits, and its pause when it has a key."""
        found = self._gates.get((model, account))
        if found is not None:
            return found
        limits = []
        for spec, rates in self.config.matching(model, account, self.env):
            key = self.subjects.limit_key(spec.name)
            if key not in self._limits:
                limit = SharedLimit(
                    self.kv, key, rates, lease_s=self.config.lease_s, clock=self.clock
                )
                await limit.mirror.start()
                self._limits[key] = limit
            limits.append(self._limits[key])
        pause = None
        if account:
            key = self.subjects.pause_key(account, model)
            if key not in self._pauses:
                pause = ProviderPause(self.kv, key, clock=self.clock, instance=self.instance)
                await pause.mirror.start()
                self._pauses[key] = pause
            pause = self._pauses[key]
        gate = self._gates[(model, account)] = Gate(self, limits, pause)
        return gate

    @property
    def conflicts(self) -> int:
        return sum(limit.conflicts for limit in self._limits.values())

    def background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a settle in a task this limiter owns (finished or cancelled by `close`)."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("settle failed", extra={"error": repr(task.exception())})

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait for the settles in flight."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def close(self) -> None:
        await self.drain()
        for task in list(self._tasks):
            task.cancel()
        mirrors: list[KeyMirror[Any]] = [limit.mirror for limit in self._limits.values()]
        mirrors += [pause.mirror for pause in self._pauses.values()]
        for mirror in mirrors:
            try:
                await mirror.close()
            except nats.errors.Error as exc:
                log.warning("limit watch not closed", extra={"error": repr(exc)})
