"""A shared limit's sliding window, as pure functions: the ceiling, settling, waiting."""

from __future__ import annotations

import random

from chorus.messages import LimitWindow
from chorus.spend.window import Rates, admit, settle, slot_of, used

RATES = Rates(requests=10, tokens=1_000, window_s=2.0, margin_s=0.1)


def drive(rates: Rates, arrivals: list[float], tokens: int) -> list[float]:
    """Offer a call at each time (sorted); return the times of those let through."""
    window, admitted = LimitWindow(), []
    for t in arrivals:
        outcome = admit(window, t, tokens, rates, f"l{t}", 60.0)
        if isinstance(outcome, LimitWindow):
            window = outcome
            admitted.append(t)
    return admitted


def most_within(times: list[float], span: float) -> int:
    return max(sum(1 for u in times if t <= u < t + span) for t in times)


def test_no_interval_of_window_plus_margin_lets_more_than_the_limit_through() -> None:
    rng = random.Random(7)
    arrivals = sorted(rng.uniform(0, 20) for _ in range(2_000))

    admitted = drive(RATES, arrivals, tokens=10)

    assert most_within(admitted, RATES.window_s + RATES.margin) <= RATES.requests
    # and it is not starved: 10 in every counted span (window, margin, slice) and a slot
    assert len(admitted) >= 0.9 * 20 / (RATES.counted_s + RATES.slot_s) * 10


def test_tokens_are_the_ceiling_when_calls_are_large() -> None:
    admitted = drive(RATES, [i * 0.01 for i in range(1_000)], tokens=300)

    assert most_within(admitted, RATES.window_s + RATES.margin) == 3  # 3 x 300 <= 1,000


def test_a_full_window_says_when_its_oldest_slot_leaves() -> None:
    window = LimitWindow()
    for i in range(10):
        booked = admit(window, 100.0 + i * 0.01, 1, RATES, f"l{i}", 60.0)
        assert isinstance(booked, LimitWindow)
        window = booked

    retry_at = admit(window, 100.5, 1, RATES, "late", 60.0)

    assert isinstance(retry_at, float)
    first_slot = slot_of(100.0, RATES)
    assert retry_at == (first_slot + 1) * RATES.slot_s + RATES.counted_s
    assert isinstance(admit(window, retry_at, 1, RATES, "late", 60.0), LimitWindow)


def test_settling_corrects_the_tokens_and_ends_the_lease() -> None:
    rates = Rates(tokens=1_000, concurrent=1, window_s=2.0)
    booked = admit(LimitWindow(), 50.0, 900, rates, "first", 60.0)
    assert isinstance(booked, LimitWindow) and booked.leases.keys() == {"first"}
    assert isinstance(admit(booked, 50.1, 100, rates, "second", 60.0), float)  # one at a time

    settled = settle(booked, 50.2, rates, slot_of(50.0, rates), 900, 120, "first")

    assert used(settled) == (1, 120)
    assert settled.leases == {}
    assert isinstance(admit(settled, 50.3, 800, rates, "second", 60.0), LimitWindow)


def test_a_lease_of_a_call_whose_process_died_lapses() -> None:
    rates = Rates(concurrent=1, window_s=2.0)
    booked = admit(LimitWindow(), 10.0, 0, rates, "dead", lease_s=5.0)
    assert isinstance(booked, LimitWindow)

    assert admit(booked, 12.0, 0, rates, "next", 5.0) == 15.0
    assert isinstance(admit(booked, 15.0, 0, rates, "next", 5.0), LimitWindow)
