"""The sliding window of one shared limit, as pure functions over a `LimitWindow` value.

A window counts requests and tokens in slots of `window_s / 60` seconds. A call is let
through at time t when the slots from `slot(t - window_s - margin_s - slice_s)` to
`slot(t)`, plus this call, stay within the limits: whole slots are counted, so every
interval of `window_s + margin_s` seconds holds at most the limit, even for a call a
process booked ahead (a slice, used within `slice_s`) and for the time from letting a call
through to the provider receiving it (`margin_s`, default one slot). In steady state the
window lets through at least `window_s / (window_s + margin_s + slice_s + slot)` of the
limit: 96% with 60 s windows and the defaults.

Tokens are booked as expected before the call and corrected to what it used after, so the
window's tokens are exact once calls end; while they run, the ceiling on tokens holds as
far as the expectation is not below what a call uses.

`Round` is one compare-and-set's worth of changes (corrections, ended leases, calls let
through, a slice booked ahead), applied to the window as last read.
"""

from __future__ import annotations

import math
from typing import Final

import msgspec

from chorus.messages import LimitWindow

SLOTS: Final = 60  # per window
MAX_SLICE_S: Final = 0.25


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
    def slice_s(self) -> float:
        """How long a call booked ahead may wait in its process before it goes."""
        return min(MAX_SLICE_S, self.slot_s)

    @property
    def counted_s(self) -> float:
        """How far back bookings count at the time of a new one."""
        return self.window_s + self.margin + self.slice_s


def slot_of(t: float, rates: Rates) -> int:
    return math.floor(t / rates.slot_s)


def clamp_tokens(tokens: int, rates: Rates) -> int:
    """A call expected to use more than the whole limit books the whole limit: it waits for
    an empty window instead of never going."""
    return min(tokens, rates.tokens) if rates.tokens else tokens


class Round:
    """Changes to a window as read at time `t`, then `window()` to write back."""

    def __init__(self, window: LimitWindow, t: float, rates: Rates) -> None:
        self.t = t
        self.rates = rates
        oldest = slot_of(t - rates.counted_s, rates)
        self.slots: dict[int, list[int]] = {
            n: [requests, tokens] for n, requests, tokens in window.slots if n >= oldest
        }
        self.leases = {k: v for k, v in window.leases.items() if v > t}
        self.writers = {k: v for k, v in window.writers.items() if v > t - rates.window_s}

    def used(self) -> tuple[int, int]:
        """Requests and tokens booked in the slots that count."""
        return (
            sum(s[0] for s in self.slots.values()),
            sum(s[1] for s in self.slots.values()),
        )

    def left(self) -> tuple[float, float]:
        """Requests and tokens that could still be booked now (inf: no limit)."""
        requests, tokens = self.used()
        return (
            self.rates.requests - requests if self.rates.requests else math.inf,
            self.rates.tokens - tokens if self.rates.tokens else math.inf,
        )

    def fits(self, requests: int, tokens: int) -> bool:
        left_requests, left_tokens = self.left()
        if requests > left_requests or clamp_tokens(tokens, self.rates) > left_tokens:
            return False
        return not (self.rates.concurrent and len(self.leases) >= self.rates.concurrent)

    def book(self, requests: int, tokens: int, lease: str = "", lease_s: float = 0.0) -> int:
        """Book calls at time t (checked with `fits` first); returns the slot."""
        slot = slot_of(self.t, self.rates)
        booked = self.slots.setdefault(slot, [0, 0])
        booked[0] += requests
        booked[1] += clamp_tokens(tokens, self.rates)
        if lease:
            self.leases[lease] = self.t + lease_s
        return slot

    def adjust(self, slot: int, requests: int, tokens: int) -> None:
        """Correct a slot's bookings (a settled call, a slice given back), if it still counts."""
        booked = self.slots.get(slot)
        if booked is not None:
            booked[0] = max(0, booked[0] + requests)
            booked[1] = max(0, booked[1] + tokens)

    def end_lease(self, lease: str) -> None:
        self.leases.pop(lease, None)

    def wrote(self, writer: str) -> None:
        self.writers[writer] = self.t

    def room_at(self, tokens: int) -> float:
        """When a call of `tokens` could fit, as far as this window knows (others' settles
        may free room sooner)."""
        requests_used, tokens_used = self.used()
        tokens = clamp_tokens(tokens, self.rates)
        times = [self.t + self.rates.slot_s]
        if self.rates.requests and requests_used + 1 > self.rates.requests:
            times.append(self._freed_at(0, requests_used + 1 - self.rates.requests))
        if self.rates.tokens and tokens_used + tokens > self.rates.tokens:
            times.append(self._freed_at(1, tokens_used + tokens - self.rates.tokens))
        if self.rates.concurrent and len(self.leases) >= self.rates.concurrent:
            times.append(min(self.leases.values()))
        return max(times)

    def _freed_at(self, measure: int, excess: int) -> float:
        freed = 0
        for slot in sorted(self.slots):
            freed += self.slots[slot][measure]
            if freed >= excess:
                # slot n counts while n >= slot_of(t - counted_s): until that is n + 1
                return (slot + 1) * self.rates.slot_s + self.rates.counted_s
        return self.t + self.rates.slot_s

    def window(self) -> LimitWindow:
        slots = [(n, r, tk) for n, (r, tk) in sorted(self.slots.items()) if r or tk]
        return LimitWindow(slots=slots, leases=self.leases, writers=self.writers, updated_at=self.t)


def used(window: LimitWindow) -> tuple[int, int]:
    """Requests and tokens booked in a window, all its slots."""
    return sum(s[1] for s in window.slots), sum(s[2] for s in window.slots)


def admit(
    window: LimitWindow, t: float, tokens: int, rates: Rates, lease: str, lease_s: float
) -> LimitWindow | float:
    """The window with one call of `tokens` booked at time t (and its lease, when the limit
    counts concurrency), or, when it does not fit, the time at which to look again."""
    booking = Round(window, t, rates)
    if not booking.fits(1, tokens):
        return booking.room_at(tokens)
    booking.book(1, tokens, lease if rates.concurrent else "", lease_s)
    return booking.window()


def settle(
    window: LimitWindow, t: float, rates: Rates, slot: int, booked: int, actual: int, lease: str
) -> LimitWindow:
    """The window once a call booked in `slot` ended: its tokens corrected from `booked` to
    `actual` (while its slot still counts) and its lease gone."""
    change = Round(window, t, rates)
    change.adjust(slot, 0, actual - booked)
    change.end_lease(lease)
    return change.window()
