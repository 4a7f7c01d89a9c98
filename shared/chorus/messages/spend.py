"""What the spend controls keep in KV: shared rate-limit windows and provider pauses (bucket
`<prefix>-limits`) and budget accounts (bucket `<prefix>-budgets`). Every write is
compare-and-set on the revision read (chorus.spend)."""

from __future__ import annotations

import msgspec

from chorus.messages.codec import Message, Usage, now
from chorus.specs.budget import BudgetPolicy


class LimitWindow(Message, tag="limit_window"):
    """One shared limit (key `limit.<name>`): what it let through in its window, per slot.

    `slots` holds `[slot, requests, tokens]` for the slots still in the window (a slot is
    `window_s / 60` seconds; slot n starts at n x that, Unix time). `leases` are the calls in
    flight, for the concurrency limit: lease id -> the time the lease lapses if its process
    never ends it. `writers`: the processes that wrote in the last window (id -> when), so
    each can size its share."""

    slots: list[tuple[int, int, int]] = []
    leases: dict[str, float] = {}
    writers: dict[str, float] = {}
    updated_at: float = msgspec.field(default_factory=now)


class RatePause(Message, tag="rate_pause"):
    """A provider answered 429 for a model on an API key (key `pause.<key>.<model>`): no
    process calls that model with that key before `until` (Unix time)."""

    until: float
    reason: str = ""
    by: str = ""  # the instance that got the 429


class BudgetHold(msgspec.Struct, frozen=True, kw_only=True):
    """A model call in flight: what it is expected to spend, reserved until it settles or,
    if its process dies, until `expires`."""

    tokens: int
    usd: float
    expires: float


class BudgetAccount(Message, tag="budget_account"):
    """One budget (key `run.<run>`, or `agent.<name>.<hour|day>.<stamp>`): its limits, what
    was spent (settled) and what calls in flight hold. 0 is no limit on that measure."""

    tokens: int = 0
    usd: float = 0.0
    policy: BudgetPolicy = "stop"
    spent: Usage = Usage()
    calls: int = 0  # settled model calls
    holds: dict[str, BudgetHold] = {}
    created_at: float = msgspec.field(default_factory=now)

    @property
    def exhausted(self) -> bool:
        """Nothing left on one of its measures (settled spending only)."""
        return bool(
            (self.tokens and self.spent.total_tokens >= self.tokens)
            or (self.usd and self.spent.usd >= self.usd)
        )

    def describe(self) -> str:
        """`1,234 of 1,000 tokens, $0.0120 of $0.0100 spent` (the measures it limits)."""
        parts = []
        if self.tokens:
            parts.append(f"{self.spent.total_tokens:,} of {self.tokens:,} tokens")
        if self.usd:
            parts.append(f"${self.spent.usd:.4f} of ${self.usd:.4f}")
        return ", ".join(parts) + " spent"
