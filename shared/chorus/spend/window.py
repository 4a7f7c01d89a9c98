"""The sliding window of one shared limit, as pure functions over a `LimitWindow` value.

A window counts requests and tokens in slots of `window_s / 60` seconds. A call is let
through at time t when the slots from `slot(t - window_s - margin_s)` to `slot(t)`, plus
this call, stay within the limits: whole slots are counted, so every interval of
`window_s + margin_s` seconds holds at most the limit (the margin absorbs the time between
letting a call through and the provider receiving it). In steady state the window lets
through at least `window_s / (window_s + margin_s + slot)` of the limit: 96.7% with the
default margin of one slot.

Tokens are booked as expected before the call and corrected to what it used after
(`settle`), so the window's tokens are exact once calls end; while they run, the ceiling on
tokens holds as far as the expectation is not below what a call uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

import msgspec

from chorus.messages import LimitWindow

SLOTS: Final = 60  # per window

Slot = tuple[int, int, int]  # slot number, requests, tokens


class Rates(msgspec.Struct, frozen=True, kw_only=True):
    """What one limit allows per `window_s` seconds (0: no limit on that measure)."""

    requests: int = 0
    tokens: int = 0
    concurrent: int = 0
    window_s: float = 60.0
    margin_s: float | None = None  # default: one slot

    @property
    def slot_s(self) -> float:
        return self.window_s / SLOTS

    @property
    def margin(self) -> float:
        return self.slot_s if self.margin_s is None else self.margin_s

    @property
    def counts_calls(self) -> bool:
        """Whether calls must be booked in KV at all (a pause-only limit needs no window)."""
        return bool(self.requests or self.tokens or self.concurrent)


def slot_of(t: float, rates: Rates) -> int:
    return math.floor(t / rates.slot_s)


def first_counted(t: float, rates: Rates) -> int:
    """The oldest slot that still counts at time t."""
    return slot_of(t - rates.window_s - rates.margin, rates)


def pruned(window: LimitWindow, t: float, rates: Rates) -> LimitWindow:
    """Without the slots that no longer count and the leases that lapsed."""
    oldest = first_counted(t, rates)
    return LimitWindow(
        slots=[s for s in window.slots if s[0] >= oldest],
        leases={k: v for k, v in window.leases.items() if v > t},
        updated_at=t,
    )


def used(window: LimitWindow) -> tuple[int, int]:
    """Requests and tokens booked in the (pruned) window."""
    return sum(s[1] for s in window.slots), sum(s[2] for s in window.slots)


def clamp_tokens(tokens: int, rates: Rates) -> int:
    """A call expected to use more than the whole limit books the whole limit: it waits for
    an empty window instead of never going."""
    return min(tokens, rates.tokens) if rates.tokens else tokens


def admit(
    window: LimitWindow, t: float, tokens: int, rates: Rates, lease: str, lease_s: float
) -> LimitWindow | float:
    """The window with one call of `tokens` booked at time t (and its lease, when the limit
    counts concurrency), or, when it does not fit, the time at which to look again."""
    current = pruned(window, t, rates)
    requests_used, tokens_used = used(current)
    tokens = clamp_tokens(tokens, rates)
    retry_at: list[float] = []
    if rates.requests and requests_used + 1 > rates.requests:
        retry_at.append(
            _room_at(current, rates, lambda s: s[1], requests_used + 1 - rates.requests)
        )
    if rates.tokens and tokens_used + tokens > rates.tokens:
        retry_at.append(
            _room_at(current, rates, lambda s: s[2], tokens_used + tokens - rates.tokens)
        )
    if rates.concurrent and len(current.leases) >= rates.concurrent:
        retry_at.append(min(current.leases.values()))
    if retry_at:
        return max(retry_at)
    slot = slot_of(t, rates)
    slots = list(current.slots)
    if slots and slots[-1][0] == slot:
        _, requests, booked = slots[-1]
        slots[-1] = (slot, requests + 1, booked + tokens)
    else:
        slots.append((slot, 1, tokens))
    leases = dict(current.leases)
    if rates.concurrent:
        leases[lease] = t + lease_s
    return LimitWindow(slots=slots, leases=leases, updated_at=t)


def _room_at(
    window: LimitWindow, rates: Rates, measure: Callable[[Slot], int], excess: int
) -> float:
    """When enough of the oldest slots have left the window to free `excess`."""
    freed = 0
    for slot in window.slots:
        freed += measure(slot)
        if freed >= excess:
            # slot n counts while n >= slot_of(t - window - margin): until that is n + 1
            return (slot[0] + 1) * rates.slot_s + rates.window_s + rates.margin
    return window.updated_at + rates.slot_s  # booked tokens were refunded meanwhile


def settle(
    window: LimitWindow, t: float, rates: Rates, slot: int, booked: int, actual: int, lease: str
) -> LimitWindow:
    """The window once a call booked in `slot` ended: its tokens corrected from `booked` to
    `actual` (while its slot still counts) and its lease gone."""
    current = pruned(window, t, rates)
    slots = [
        (n, requests, max(0, tokens + actual - booked)) if n == slot else (n, requests, tokens)
        for n, requests, tokens in current.slots
    ]
    leases = {k: v for k, v in current.leases.items() if k != lease}
    return LimitWindow(slots=slots, leases=leases, updated_at=t)
