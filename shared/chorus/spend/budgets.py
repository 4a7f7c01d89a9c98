"""Budget accounts in KV (`<prefix>-budgets`): reserved before a model call, settled after.

A run's account (`run.<run>`) is opened by the engine when the run starts; an agent's
(`agent.<name>.<hour|day>.<stamp>`) by its first call in that hour or day. Before a call,
its expected tokens and dollars are held in every account it is charged to (its run's,
its agent's); after it, the hold goes and what it really used is added to `spent`. Every
change is a compare-and-set on the account's revision.

A call may start while the account has something left:

- it fits when spent + held + expected stays within the limit: it goes;
- it does not fit and other calls hold part of the account: it waits for them to settle;
- it does not fit and nothing else is in flight: it goes, as the account's last call.

So the calls in flight when an account runs out are the only way past it: spent ends below
limit + what those calls used beyond their holds + one call. When holds are no smaller than
what calls use, spent stays below limit + one call (tests/test_spend_budgets.py). A call
whose process dies keeps its hold until it expires (`hold_s`); what it spent is not known.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, NamedTuple

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from chorus.errors import InvalidMessage
from chorus.messages import BudgetAccount, BudgetHold, Usage, decode, encode
from chorus.nats.streams import ensure_budgets_bucket
from chorus.specs.budget import RunBudget
from chorus.subjects import Subjects

log = logging.getLogger("chorus.spend.budgets")

Clock = Callable[[], float]
CAS_ATTEMPTS: Final = 100
CACHE_SIZE: Final = 4096
DEFAULT_HOLD_S: Final = 600.0


class AccountRef(NamedTuple):
    """An account a call is charged to; `create` is what to open when it does not exist
    (an agent's hour or day), None when a missing account means no budget (a run's)."""

    key: str
    create: BudgetAccount | None = None


Outcome = Literal["held", "none", "spent", "too_big"]


@dataclass
class Reservation:
    """What `reserve` got: the holds taken, and the accounts that stopped it."""

    holds: list[str] = field(default_factory=list)  # keys held under `hold_id`
    hold_id: str = ""
    spent: list[tuple[str, BudgetAccount]] = field(default_factory=list)  # exhausted
    too_big: list[tuple[str, BudgetAccount]] = field(default_factory=list)  # no room for it

    @property
    def ok(self) -> bool:
        return not self.spent and not self.too_big


async def _backoff(attempt: int) -> None:
    """After a lost compare-and-set: a short random pause, growing, so processes that
    collided do not collide again in step."""
    await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))


def _held(account: BudgetAccount) -> tuple[int, float]:
    return (
        sum(h.tokens for h in account.holds.values()),
        sum(h.usd for h in account.holds.values()),
    )


def fits(account: BudgetAccount, tokens: int, usd: float) -> bool:
    """Whether a call expected to use `tokens` and `usd` fits beside the holds."""
    held_tokens, held_usd = _held(account)
    return bool(
        (not account.tokens or account.spent.total_tokens + held_tokens + tokens <= account.tokens)
        and (not account.usd or account.spent.usd + held_usd + usd <= account.usd)
    )


class BudgetLedger:
    """The budgets bucket, for the engine (open a run's account, read it) and for agents
    (reserve and settle their calls)."""

    def __init__(
        self,
        kv: KeyValue,
        subjects: Subjects,
        *,
        hold_s: float = DEFAULT_HOLD_S,
        clock: Clock = time.time,
    ) -> None:
        self.kv = kv
        self.subjects = subjects
        self.hold_s = hold_s
        self.clock = clock
        # The last value and revision seen per key: a reserve tries its write on it first.
        self._seen: OrderedDict[str, tuple[BudgetAccount, int]] = OrderedDict()
        self._absent: OrderedDict[str, None] = OrderedDict()  # run keys without an account
        self._locks: dict[str, asyncio.Lock] = {}
        self.conflicts = 0

    @classmethod
    async def open(
        cls, js: JetStreamContext, subjects: Subjects, *, hold_s: float = DEFAULT_HOLD_S
    ) -> BudgetLedger:
        return cls(await ensure_budgets_bucket(js, subjects), subjects, hold_s=hold_s)

    # the engine's side

    async def open_run(self, run_id: str, budget: RunBudget) -> BudgetAccount:
        """The run's account, opened with `budget` when it has none (a resumed run keeps
        what it spent)."""
        key = self.subjects.run_budget_key(run_id)
        account = BudgetAccount(tokens=budget.tokens, usd=budget.usd, policy=budget.policy)
        try:
            revision = await self.kv.create(key, encode(account))
        except KeyWrongLastSequenceError:
            found = await self.account(key)
            if found is None:  # pragma: no cover - created and gone between two calls
                raise
            return found
        self._remember(key, account, revision)
        self._absent.pop(key, None)
        return account

    async def run_account(self, run_id: str) -> BudgetAccount | None:
        return await self.account(self.subjects.run_budget_key(run_id))

    async def account(self, key: str) -> BudgetAccount | None:
        """The account as stored now (None: there is none)."""
        found = await self._read(key)
        return found[0] if found else None

    # an agent's side

    async def reserve(
        self, refs: Sequence[AccountRef], tokens: int, usd: float, *, fits_only: bool
    ) -> Reservation:
        """Hold `tokens` and `usd` in every account of `refs` (see the module). With
        `fits_only` a call that does not fit is `too_big` instead of waiting or going last."""
        reservation = Reservation(hold_id=uuid.uuid4().hex[:12])
        for ref in refs:
            outcome, account = await self._reserve_one(
                ref, reservation.hold_id, tokens, usd, fits_only
            )
            if outcome == "held":
                reservation.holds.append(ref.key)
            elif outcome == "spent" and account is not None:
                reservation.spent.append((ref.key, account))
            elif outcome == "too_big" and account is not None:
                reservation.too_big.append((ref.key, account))
        if not reservation.ok and reservation.holds:
            await self.settle(reservation, None)
            reservation.holds = []
        return reservation

    async def settle(self, reservation: Reservation, usage: Usage | None) -> None:
        """End the holds of `reservation`, adding `usage` to each account (None: the call
        did not happen, nothing is added)."""
        await asyncio.gather(
            *(self._change(key, reservation.hold_id, usage) for key in reservation.holds)
        )

    async def charge(self, refs: Sequence[AccountRef], usage: Usage) -> None:
        """Add a call made without a hold (the `wrap_up` turn) to its accounts."""
        await asyncio.gather(*(self._change(ref.key, "", usage) for ref in refs))

    async def _reserve_one(
        self, ref: AccountRef, hold_id: str, tokens: int, usd: float, fits_only: bool
    ) -> tuple[Outcome, BudgetAccount | None]:
        for attempt in range(CAS_ATTEMPTS):
            if ref.create is None and ref.key in self._absent:
                return "none", None
            # One change at a time per account in this process: its other calls queue here
            # instead of racing each other's compare-and-set.
            async with self._lock(ref.key):
                found = self._seen.get(ref.key) or await self._read(ref.key)
                if found is None:
                    if ref.create is None:
                        self._note_absent(ref.key)
                        return "none", None
                    account, revision = ref.create, 0
                else:
                    account, revision = found
                t = self.clock()
                live = {k: h for k, h in account.holds.items() if h.expires > t}
                account = msgspec.structs.replace(account, holds=live)
                if account.exhausted:
                    return "spent", account
                wait_s = 0.0
                if not fits(account, tokens, usd):
                    if fits_only:
                        return "too_big", account
                    if account.holds:
                        wait_s = min(h.expires for h in account.holds.values()) - t
                    # nothing else in flight: this call goes, as the account's last
                if not wait_s:
                    held = BudgetHold(tokens=tokens, usd=usd, expires=t + self.hold_s)
                    account = msgspec.structs.replace(account, holds={**live, hold_id: held})
                    if await self._write(ref.key, account, revision):
                        return "held", account
            if wait_s:
                await self._wait_change(ref.key, revision, wait_s)
            else:
                await _backoff(attempt)
        raise RuntimeError(f"budget {ref.key}: no write went through in {CAS_ATTEMPTS} tries")

    async def _change(self, key: str, hold_id: str, usage: Usage | None) -> None:
        for attempt in range(CAS_ATTEMPTS):
            async with self._lock(key):
                found = self._seen.get(key) or await self._read(key)
                if found is None:
                    return  # the account expired meanwhile: nothing left to charge
                account, revision = found
                holds = {k: h for k, h in account.holds.items() if k != hold_id}
                if usage is None:
                    changed = msgspec.structs.replace(account, holds=holds)
                else:
                    changed = msgspec.structs.replace(
                        account, holds=holds, spent=account.spent + usage, calls=account.calls + 1
                    )
                if await self._write(key, changed, revision):
                    return
            await _backoff(attempt)
        log.warning("could not settle a budget hold", extra={"key": key})

    def _lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            if len(self._locks) > CACHE_SIZE:  # forget the idle ones
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def _read(self, key: str) -> tuple[BudgetAccount, int] | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            self._seen.pop(key, None)
            return None
        if not entry.value:
            return None
        try:
            account = decode(entry.value, BudgetAccount)
        except InvalidMessage as exc:
            log.warning("unreadable budget account", extra={"key": key, "error": exc.reason})
            return None
        self._remember(key, account, entry.revision or 0)
        return account, entry.revision or 0

    async def _write(self, key: str, account: BudgetAccount, revision: int) -> bool:
        data = encode(account)
        try:
            if revision:
                new = await self.kv.update(key, data, last=revision)
            else:
                new = await self.kv.create(key, data)
        except KeyWrongLastSequenceError:
            self.conflicts += 1
            self._seen.pop(key, None)
            return False
        self._remember(key, account, new)
        return True

    async def _wait_change(self, key: str, revision: int, timeout: float) -> None:
        """Until the account changes after `revision` (a settle) or `timeout` passes."""
        watcher = await self.kv.watch(key)
        try:
            with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                async with asyncio.timeout(max(0.0, timeout)):
                    while True:
                        entry = await watcher.updates(timeout=max(0.01, timeout))  # type: ignore[no-untyped-call]
                        if entry is not None and (entry.revision or 0) > revision:
                            return
        finally:
            self._seen.pop(key, None)
            await watcher.stop()  # type: ignore[no-untyped-call]

    def _remember(self, key: str, account: BudgetAccount, revision: int) -> None:
        self._seen[key] = (account, revision)
        self._seen.move_to_end(key)
        while len(self._seen) > CACHE_SIZE:
            self._seen.popitem(last=False)

    def _note_absent(self, key: str) -> None:
        self._absent[key] = None
        while len(self._absent) > CACHE_SIZE:
            self._absent.popitem(last=False)
