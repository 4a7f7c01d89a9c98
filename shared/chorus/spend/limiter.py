"""Shared provider limits and pauses, drawn from by every process before it calls a model.

Mechanism (numbers in docs/performance.md, "Limits, budgets and costs"): each limit is one
KV key holding its sliding window (`chorus.spend.window`). Every process mirrors the key
with a watch, and one writer task per limit per process folds every call waiting for room,
every correction of tokens and every ended lease into its next compare-and-set on the
revision it saw (a conflict reads the key and tries again). A process that calls often
books a few calls ahead, within its share of what is left, so most of its calls go with no
round trip. A provider's 429 writes a pause key that every process calling that model with
that API key mirrors too: they all wait until it ends, woken by the watch.

    limiter = await Limiter.open(js, subjects, LimitsFile.load(settings.limits), env, instance)
    gate = await limiter.gate("openai:gpt-5", account)       # once per model and key
    permit = await gate.admit(expected_tokens, wait=None)    # waits for room (and pauses)
    ...                                                      # the model call
    permit.settle(reply.usage.total_tokens)                  # written with the next write
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, NamedTuple

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
PAUSE_ATTEMPTS: Final = 20
RATE_SAMPLE: Final = 32  # recent calls a process's call rate is measured over
MAX_IDLE_S: Final = 5.0  # a writer with nothing to do looks at its key at least this often
FLUSH_S: Final = 0.05  # corrections of tokens wait this long for company in one write


class Booking(NamedTuple):
    """One call's place in one limit's window."""

    limit: SharedLimit
    slot: int
    tokens: int
    lease: str


@dataclass
class _Waiter:
    tokens: int
    lease: str
    future: asyncio.Future[Booking]


@dataclass
class _Slice:
    """Calls booked ahead in the window, let through from this process without a write."""

    slot: int
    requests: int
    tokens: int
    expires: float


class SharedLimit:
    """One limit shared by every process: its window in KV (`limit.<name>`).

    In each process one writer task owns the key: every call waiting for room, every
    settle and every lease to end goes into its next compare-and-set, so a process has at
    most one write in flight per limit however many calls it makes. A process calling
    often books a few calls ahead (a slice, within its share of what is left, used within
    `Rates.slice_s` or given back), so most of its calls go without a round trip.
    """

    def __init__(
        self,
        kv: KeyValue,
        key: str,
        rates: Rates,
        *,
        lease_s: float,
        clock: Clock,
        writer: str,
    ) -> None:
        self.key = key
        self.rates = rates
        self.lease_s = lease_s
        self.clock = clock
        self.writer = writer
        self.mirror = KeyMirror(kv, key, LimitWindow)
        self.conflicts = 0  # compare-and-set retries, for the bench
        self.writes = 0
        self._waiting: deque[_Waiter] = deque()
        self._adjust: dict[int, list[int]] = {}  # slot -> [requests, tokens] to correct
        self._ended: set[str] = set()
        self._slice: _Slice | None = None
        self._recent: deque[float] = deque(maxlen=RATE_SAMPLE)  # times of recent calls
        self._tokens_seen: deque[int] = deque(maxlen=RATE_SAMPLE)
        self._kick = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.mirror.start()
        self._task = asyncio.create_task(self._run(), name=f"limit {self.key}")

    async def book(self, tokens: int, deadline: float) -> Booking:
        """Room for one call expected to use `tokens`; waits for it until `deadline` (Unix
        time), then raises RateLimited saying when there might be room."""
        t = self.clock()
        self._recent.append(t)
        self._tokens_seen.append(tokens)
        taken = self._from_slice(tokens, t)
        if taken is not None:
            return taken
        lease = uuid.uuid4().hex[:12] if self.rates.concurrent else ""
        waiter = _Waiter(tokens, lease, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self._wake()
        try:
            if math.isinf(deadline):
                return await asyncio.shield(waiter.future)
            return await asyncio.wait_for(asyncio.shield(waiter.future), deadline - t)
        except TimeoutError:
            raise RateLimited(
                f"shared limit {self.key} had no room within {deadline - t:.1f}s",
                retry_after=max(0.0, self._room_at - self.clock()),
            ) from None
        finally:
            if not waiter.future.done():
                waiter.future.cancel()  # the writer drops it, or gives its booking back

    def _from_slice(self, tokens: int, t: float) -> Booking | None:
        chunk = self._slice
        if chunk is None or chunk.expires <= t or chunk.requests < 1:
            return None
        tokens = window.clamp_tokens(tokens, self.rates)
        if self.rates.tokens and chunk.tokens < tokens:
            return None
        chunk.requests -= 1
        chunk.tokens -= tokens
        return Booking(self, chunk.slot, tokens, "")

    def settle(self, booking: Booking, actual: int) -> None:
        """Correct the call's tokens to `actual` and end its lease. An ended lease is
        written at once (another call may wait for the slot); a correction of tokens within
        FLUSH_S, with whatever else this process writes by then."""
        if self.rates.tokens and actual != booking.tokens:
            self._add(booking.slot, 0, actual - booking.tokens)
            self._flush_at = min(self._flush_at, self.clock() + FLUSH_S)
            self._idle.clear()
        if booking.lease:
            self._ended.add(booking.lease)
            self._wake()

    def release(self, booking: Booking) -> None:
        """Give back a booking whose call never went."""
        self._add(booking.slot, -1, -booking.tokens)
        self._flush_at = self.clock()
        if booking.lease:
            self._ended.add(booking.lease)
        self._wake()

    def _add(self, slot: int, requests: int, tokens: int) -> None:
        change = self._adjust.setdefault(slot, [0, 0])
        change[0] += requests
        change[1] += tokens

    def _wake(self) -> None:
        self._idle.clear()
        self._kick.set()

    async def flush(self, timeout: float) -> None:
        """Write every settle so far now; returns once written (or after `timeout`)."""
        if self._adjust:
            self._flush_at = self.clock()
            self._wake()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.mirror.close()

    # the writer

    _room_at = 0.0
    _flush_at = math.inf

    async def _run(self) -> None:
        news = False  # another process wrote the window: room may have come
        while True:
            changed = self.mirror.changed
            if not self._due(self.clock(), news):
                if not (self._adjust or self._ended or self._live_waiters()):
                    self._idle.set()
                self._kick.clear()  # looked: nothing to write (a kick for a caller gone)
                await self._wait(changed, self._wake_at())
                news = changed.is_set()
                continue
            news = False
            self._kick.clear()
            try:
                await self._round()
            except nats.errors.Error as exc:  # NATS away: keep the work, try again shortly
                log.warning("limit write failed", extra={"key": self.key, "error": repr(exc)})
                await self._wait(self.mirror.changed, self.clock() + 1.0)
            except Exception as exc:  # a bug here must not leave callers waiting for ever
                log.exception("limit writer failed", extra={"key": self.key})
                for waiter in self._waiting:
                    if not waiter.future.done():
                        waiter.future.set_exception(exc)
                self._waiting.clear()

    def _live_waiters(self) -> bool:
        return any(not w.future.done() for w in self._waiting)

    def _due(self, t: float, news: bool) -> bool:
        """Whether there is something to write now: calls waiting (new ones, or room may
        have come: news, or its time), leases ended, a slice to give back, corrections due."""
        chunk = self._slice
        spent = chunk is not None and (chunk.expires <= t or not chunk.requests)
        fresh = self._kick.is_set() or news or self._room_at <= t
        waiting = self._live_waiters() and fresh
        return waiting or bool(self._ended) or spent or (bool(self._adjust) and self._flush_at <= t)

    def _wake_at(self) -> float:
        """When to look again without news: room may have come, the slice lapses, or the
        corrections are due."""
        times = [self._room_at] if self._live_waiters() else []
        if self._slice is not None:
            times.append(self._slice.expires)
        if self._adjust:
            times.append(self._flush_at)
        return min(times, default=math.inf)

    async def _wait(self, changed: asyncio.Event, until: float) -> None:
        timeout = until - self.clock()
        if self._kick.is_set() or timeout <= 0:
            return
        kick = asyncio.ensure_future(self._kick.wait())
        news = asyncio.ensure_future(changed.wait())
        try:
            await asyncio.wait(
                {kick, news},
                timeout=None if math.isinf(timeout) else min(timeout, MAX_IDLE_S),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            kick.cancel()
            news.cancel()

    async def _round(self) -> None:
        """One compare-and-set: this process's corrections, ended leases, given-back slice,
        the calls waiting that fit, and a slice ahead when it calls often."""
        current, revision = await self.mirror.current()
        t = self.clock()
        change = window.Round(current or LimitWindow(), t, self.rates)
        adjust, self._adjust = self._adjust, {}
        ended, self._ended = self._ended, set()
        chunk = self._slice
        # A slice is given back once it lapsed or its calls are all taken (its tokens left).
        returned = (
            chunk if chunk is not None and (chunk.expires <= t or not chunk.requests) else None
        )
        for slot, (requests, tokens) in adjust.items():
            change.adjust(slot, requests, tokens)
        for lease in ended:
            change.end_lease(lease)
        if returned is not None:
            change.adjust(returned.slot, -returned.requests, -returned.tokens)
        admitted: list[tuple[_Waiter, Booking]] = []
        waiting = [w for w in self._waiting if not w.future.done()]
        while waiting and change.fits(1, waiting[0].tokens):
            waiter = waiting.pop(0)
            slot = change.book(1, waiter.tokens, waiter.lease, self.lease_s)
            tokens = window.clamp_tokens(waiter.tokens, self.rates)
            admitted.append((waiter, Booking(self, slot, tokens, waiter.lease)))
        ahead = self._ahead(change, returned, t)
        change.wrote(self.writer)
        if waiting:
            self._room_at = change.room_at(waiting[0].tokens)
        try:
            if admitted or adjust or ended or returned or ahead:
                await self.mirror.write(change.window(), revision)
                self.writes += 1
        except KeyWrongLastSequenceError:
            self.conflicts += 1
            for slot, (requests, tokens) in adjust.items():  # keep them for the next try
                self._add(slot, requests, tokens)
            self._ended |= ended
            self._kick.set()
            return
        if not self._adjust:
            self._flush_at = math.inf
        if returned is not None and self._slice is returned:
            self._slice = None
        if ahead is not None:
            self._slice = ahead
        # Calls that came during the write wait on; the ones let through leave the queue.
        let_through = {id(waiter) for waiter, _ in admitted}
        self._waiting = deque(
            w for w in self._waiting if id(w) not in let_through and not w.future.done()
        )
        for waiter, booking in admitted:
            if waiter.future.done():  # its caller stopped waiting: give the booking back
                self._add(booking.slot, -1, -booking.tokens)
                self._flush_at = self.clock()
                if booking.lease:
                    self._ended.add(booking.lease)
                self._kick.set()
            else:
                waiter.future.set_result(booking)

    def _ahead(self, change: window.Round, returned: _Slice | None, t: float) -> _Slice | None:
        """A slice for the calls this process will make within `slice_s`, at its call rate,
        within its share of what is left; None when it calls too seldom to need one."""
        if self.rates.concurrent or len(self._recent) < RATE_SAMPLE // 4:
            return None
        if self._slice is not None and self._slice is not returned:
            return None  # the current one still has calls
        span = t - self._recent[0]
        rate = len(self._recent) / span if span > 0 else 0.0
        wanted = math.floor(rate * self.rates.slice_s)
        if wanted < 2:
            return None
        share = max(1, len(change.writers | {self.writer: t}))
        left_requests, left_tokens = change.left()
        per_call = max(1, max(self._tokens_seen))
        count = min(
            wanted, math.floor(left_requests / share), math.floor(left_tokens / share / per_call)
        )
        if count < 2:
            return None
        slot = change.book(count, count * per_call)
        return _Slice(slot, count, count * per_call, t + self.rates.slice_s)


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
        """Correct each limit's tokens to what the call used (0 for a call the provider
        refused: it still counts as a request) and end its leases, in the next writes."""
        for booking in self.bookings:
            booking.limit.settle(booking, actual_tokens)

    def release(self) -> None:
        """The call never went: give its bookings back."""
        for booking in self.bookings:
            booking.limit.release(booking)


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
            Permit(self._limiter, bookings).release()
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
        # How this process is named in the windows' `writers` (its share of a slice).
        self.writer = instance or uuid.uuid4().hex[:12]

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
                    self.kv,
                    key,
                    rates,
                    lease_s=self.config.lease_s,
                    clock=self.clock,
                    writer=self.writer,
                )
                await limit.start()
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

    @property
    def writes(self) -> int:
        return sum(limit.writes for limit in self._limits.values())

    async def drain(self, timeout: float = 5.0) -> None:
        """Until every settle so far is written (or `timeout` passes)."""
        await asyncio.gather(*(limit.flush(timeout) for limit in self._limits.values()))

    async def close(self) -> None:
        await self.drain()
        for limit in self._limits.values():
            await limit.stop()
        for pause in self._pauses.values():
            try:
                await pause.mirror.close()
            except nats.errors.Error as exc:
                log.warning("pause watch not closed", extra={"error": repr(exc)})
