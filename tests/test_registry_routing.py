"""Registry health and routing policy as pure functions of heartbeats, outcomes and a clock.

No NATS and no sleeps: a fake clock moves time, so each behaviour is exact and instant.
"""

from __future__ import annotations

import random

import pytest

from chorus.config import Settings
from chorus.coordinator.registry import (
    DEAD,
    HEALTHY,
    MAX_CAPABILITIES,
    MAX_INTERVAL_S,
    MIN_INTERVAL_S,
    UNHEALTHY,
    InstanceView,
    Registry,
    targets_of,
)
from chorus.coordinator.routing import Router, Weights
from chorus.messages import Heartbeat

INTERVAL = 1.0
UNHEALTHY_AFTER = 3.0
DEAD_AFTER = 6.0
COOLDOWN = 10.0
FAILURES = 3


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> Registry:
    return Registry(
        unhealthy_after=UNHEALTHY_AFTER,
        dead_after=DEAD_AFTER,
        clock=clock,
        wall_clock=lambda: 1.7e9,
    )


def make_router(clock: FakeClock, weights: Weights | None = None) -> Router:
    return Router(
        weights or Weights(),
        breaker_failures=FAILURES,
        breaker_cooldown=COOLDOWN,
        clock=clock,
        rng=random.Random(7),
    )


@pytest.fixture
def router(clock: FakeClock) -> Router:
    return make_router(clock)


def heartbeat(instance: str = "w-1", **fields: object) -> Heartbeat:
    values: dict[str, object] = {
        "name": "worker",
        "capabilities": ["work"],
        "in_flight": 0,
        "max_concurrency": 4,
        "processed": 0,
        "failed": 0,
        "mean_latency_ms": 0.0,
        "interval_s": INTERVAL,
        "started_at": 1.0,
        "sent_at": 100.0,
    }
    values.update(fields)
    return Heartbeat(instance=instance, **values)  # type: ignore[arg-type]


def join(registry: Registry, instance: str = "w-1", **fields: object) -> InstanceView:
    registry.observe(heartbeat(instance, **fields))
    view = registry.get(instance)
    assert view is not None
    return view


def choose(router: Router, registry: Registry) -> str | None:
    view = router.choose(registry.serving("cap.work"), "cap.work")
    return view.instance if view else None


def health_after(registry: Registry, clock: FakeClock, seconds: float) -> str:
    clock.advance(seconds)
    registry.sweep(forget_after=3600)
    view = registry.get("w-1")
    assert view is not None
    return view.health


# Health from heartbeat age


def test_an_instance_is_healthy_until_it_misses_unhealthy_after_intervals(
    registry: Registry, clock: FakeClock
) -> None:
    join(registry)

    assert health_after(registry, clock, UNHEALTHY_AFTER * INTERVAL) == HEALTHY
    assert health_after(registry, clock, 0.01) == UNHEALTHY


def test_an_unhealthy_instance_is_dead_after_dead_after_intervals(
    registry: Registry, clock: FakeClock
) -> None:
    join(registry)

    assert health_after(registry, clock, DEAD_AFTER * INTERVAL) == UNHEALTHY
    assert health_after(registry, clock, 0.01) == DEAD


def test_the_sweep_reports_each_health_change_once(registry: Registry, clock: FakeClock) -> None:
    join(registry)

    clock.advance(UNHEALTHY_AFTER + 0.5)
    first = [(c.previous, c.health) for c in registry.sweep(forget_after=3600)]
    again = registry.sweep(forget_after=3600)

    assert first == [(HEALTHY, UNHEALTHY)]
    assert again == []


def test_a_heartbeat_brings_a_dead_instance_back(registry: Registry, clock: FakeClock) -> None:
    view = join(registry)
    health_after(registry, clock, DEAD_AFTER + 1)

    change = registry.observe(heartbeat(sent_at=200.0))

    assert change is not None
    assert (change.previous, change.health) == (DEAD, HEALTHY)
    assert view.health == HEALTHY
    assert choose(make_router(clock), registry) == "w-1"


def test_an_instance_back_from_dead_does_not_fail_its_new_tasks_as_lost(
    registry: Registry, clock: FakeClock
) -> None:
    view = join(registry)
    health_after(registry, clock, DEAD_AFTER + 1)
    assert view.lost.is_set()

    registry.observe(heartbeat(sent_at=200.0))

    assert not view.lost.is_set()


def test_a_long_dead_instance_is_forgotten(registry: Registry, clock: FakeClock) -> None:
    join(registry)
    clock.advance(DEAD_AFTER * INTERVAL + 30 + 1)

    changes = [(c.previous, c.health) for c in registry.sweep(forget_after=30)]

    assert changes == [(HEALTHY, DEAD), (DEAD, "forgotten")]
    assert registry.get("w-1") is None
    assert registry.serving("cap.work") == []


# Who may be chosen


def test_a_draining_instance_is_never_chosen(registry: Registry, router: Router) -> None:
    join(registry, "w-1", state="draining")

    assert choose(router, registry) is None


def test_a_stopped_instance_leaves_the_registry_and_routing(
    registry: Registry, router: Router
) -> None:
    view = join(registry)

    change = registry.observe(heartbeat(state="stopped"))

    assert change is not None and change.health == "left"
    assert view.lost.is_set()
    assert registry.get("w-1") is None
    assert choose(router, registry) is None


def test_unhealthy_and_dead_instances_are_never_chosen(
    registry: Registry, router: Router, clock: FakeClock
) -> None:
    join(registry)

    health_after(registry, clock, UNHEALTHY_AFTER + 0.5)
    assert choose(router, registry) is None
    health_after(registry, clock, DEAD_AFTER)
    assert choose(router, registry) is None


@pytest.mark.parametrize(
    ("in_flight", "waiting", "reserved"),
    [(4, 0, 0), (0, 0, 4), (2, 2, 0), (3, 0, 4)],
    ids=["reported-in-flight", "reserved-here", "in-flight-plus-waiting", "both"],
)
def test_a_busy_instance_is_never_chosen(
    registry: Registry, router: Router, in_flight: int, waiting: int, reserved: int
) -> None:
    view = join(registry, in_flight=in_flight, waiting=waiting, max_concurrency=4)
    view.reserved = reserved

    assert [choose(router, registry) for _ in range(20)] == [None] * 20


def test_among_equal_instances_the_one_with_more_free_slots_wins(
    registry: Registry, router: Router
) -> None:
    join(registry, "w-1", in_flight=3)
    join(registry, "w-2", in_flight=1)

    assert {choose(router, registry) for _ in range(20)} == {"w-2"}


def test_equal_instances_share_the_work(registry: Registry, router: Router) -> None:
    join(registry, "w-1")
    join(registry, "w-2")

    assert {choose(router, registry) for _ in range(50)} == {"w-1", "w-2"}


def test_routing_looks_only_at_the_target_served(registry: Registry, router: Router) -> None:
    join(registry, "w-1", capabilities=["work"])
    join(registry, "r-1", name="reader", capabilities=["read"])

    assert router.choose(registry.serving("cap.read"), "cap.read") is registry.get("r-1")
    assert router.choose(registry.serving("agent.worker"), "agent.worker") is registry.get("w-1")


# The score, number by number


def test_the_first_failure_moves_the_success_ewma_from_one_by_alpha(
    registry: Registry, router: Router
) -> None:
    view = join(registry)

    router.failed(view)
    assert view.success_rate == pytest.approx(0.7)
    router.succeeded(view, latency_ms=100.0)
    assert view.success_rate == pytest.approx(0.7 + 0.3 * (1 - 0.7))


def test_the_latency_ewma_starts_at_the_first_sample_and_moves_by_alpha(
    registry: Registry, router: Router
) -> None:
    view = join(registry)

    router.succeeded(view, latency_ms=100.0)
    assert view.mean_latency_ms == pytest.approx(100.0)
    router.succeeded(view, latency_ms=200.0)
    assert view.mean_latency_ms == pytest.approx(130.0)


def test_the_score_is_load_success_and_responsiveness_weighted(
    registry: Registry, router: Router
) -> None:
    view = join(registry, in_flight=1, max_concurrency=4)
    router.failed(view)  # success 0.7; its latency unknown
    router.succeeded(view, latency_ms=400.0)  # success 0.79

    score = router.score(view, fastest_ms=100.0)

    assert score == pytest.approx(0.4 * (1 - 1 / 4) + 0.4 * 0.79 + 0.2 * (100 / 400))


def test_an_instance_with_no_latency_yet_counts_as_fastest(
    registry: Registry, router: Router
) -> None:
    view = join(registry)

    assert router.score(view, fastest_ms=100.0) == pytest.approx(0.4 + 0.4 + 0.2)


def test_a_failing_instance_loses_to_an_equal_one_that_succeeds(
    registry: Registry, router: Router
) -> None:
    failing = join(registry, "w-1")
    good = join(registry, "w-2")
    router.failed(failing)
    router.succeeded(good, latency_ms=100.0)
    router.succeeded(failing, latency_ms=100.0)  # closes nothing; success 0.79 < 1.0

    assert {choose(router, registry) for _ in range(20)} == {"w-2"}


def test_the_faster_instance_wins_by_its_latency_ratio(registry: Registry, router: Router) -> None:
    fast = join(registry, "w-1")
    slow = join(registry, "w-2")
    router.succeeded(fast, latency_ms=100.0)
    router.succeeded(slow, latency_ms=1000.0)

    assert router.score(slow, 100.0) == pytest.approx(0.4 + 0.4 + 0.2 * 0.1)
    assert {choose(router, registry) for _ in range(20)} == {"w-1"}


@pytest.mark.parametrize(
    ("weights", "winner"),
    [("1,0,0", "idle-but-failing"), ("0,1,0", "busy-but-reliable"), ("0,0,1", "busy-but-reliable")],
)
def test_weights_from_settings_change_the_choice(
    registry: Registry, clock: FakeClock, weights: str, winner: str
) -> None:
    router = make_router(clock, Weights.parse(Settings(routing_weights=weights).routing_weights))
    idle = join(registry, "idle-but-failing", in_flight=0)
    busy = join(registry, "busy-but-reliable", in_flight=3)
    router.succeeded(idle, latency_ms=1000.0)
    router.failed(idle)
    router.succeeded(busy, latency_ms=100.0)

    assert {choose(router, registry) for _ in range(20)} == {winner}


# The circuit breaker


def fail(router: Router, view: InstanceView, times: int) -> None:
    for _ in range(times):
        router.failed(view)


def test_the_breaker_opens_after_consecutive_failures(registry: Registry, router: Router) -> None:
    view = join(registry)

    fail(router, view, FAILURES - 1)
    assert (view.breaker, choose(router, registry)) == ("closed", "w-1")
    router.released(view)
    router.failed(view)
    assert (view.breaker, choose(router, registry)) == ("open", None)


def test_a_success_between_failures_keeps_the_breaker_closed(
    registry: Registry, router: Router
) -> None:
    view = join(registry)

    fail(router, view, FAILURES - 1)
    router.succeeded(view, latency_ms=10.0)
    fail(router, view, FAILURES - 1)

    assert view.breaker == "closed"


def test_an_open_breaker_stays_open_for_the_cooldown(
    registry: Registry, router: Router, clock: FakeClock
) -> None:
    view = join(registry)
    fail(router, view, FAILURES)

    clock.advance(COOLDOWN - 0.01)
    assert choose(router, registry) is None
    clock.advance(0.01)
    assert choose(router, registry) == "w-1"


def test_a_half_open_breaker_lets_exactly_one_trial_through(
    registry: Registry, router: Router, clock: FakeClock
) -> None:
    view = join(registry, max_concurrency=8)
    fail(router, view, FAILURES)
    clock.advance(COOLDOWN)

    chosen = [choose(router, registry) for _ in range(5)]

    assert chosen == ["w-1", None, None, None, None]
    assert view.breaker == "half_open"


def test_a_successful_trial_closes_the_breaker(
    registry: Registry, router: Router, clock: FakeClock
) -> None:
    view = join(registry, max_concurrency=8)
    fail(router, view, FAILURES)
    clock.advance(COOLDOWN)
    choose(router, registry)

    router.succeeded(view, latency_ms=50.0)

    assert view.breaker == "closed"
    assert [choose(router, registry) for _ in range(3)] == ["w-1"] * 3


def test_a_failed_trial_reopens_the_breaker_for_twice_the_cooldown(
    registry: Registry, router: Router, clock: FakeClock
) -> None:
    view = join(registry)
    fail(router, view, FAILURES)
    clock.advance(COOLDOWN)
    choose(router, registry)

    router.failed(view)

    assert view.breaker == "open"
    clock.advance(2 * COOLDOWN - 0.01)
    assert choose(router, registry) is None
    clock.advance(0.01)
    assert choose(router, registry) == "w-1"


def test_the_cooldown_resets_once_a_trial_succeeds(
    registry: Registry, router: Router, clock: FakeClock
) -> None:
    view = join(registry)
    fail(router, view, FAILURES)
    clock.advance(COOLDOWN)
    choose(router, registry)
    router.failed(view)  # cooldown now 2x
    clock.advance(2 * COOLDOWN)
    choose(router, registry)
    router.succeeded(view, latency_ms=10.0)

    fail(router, view, FAILURES)

    clock.advance(COOLDOWN)
    assert choose(router, registry) == "w-1"


def test_late_failures_of_tasks_sent_before_the_breaker_opened_do_not_extend_it(
    registry: Registry, router: Router, clock: FakeClock
) -> None:
    view = join(registry)
    fail(router, view, FAILURES)

    fail(router, view, 4)  # the rest of a full instance's tasks fail afterwards

    clock.advance(COOLDOWN)
    assert choose(router, registry) == "w-1"


def test_a_released_trial_lets_another_trial_through(
    registry: Registry, router: Router, clock: FakeClock
) -> None:
    view = join(registry)
    fail(router, view, FAILURES)
    clock.advance(COOLDOWN)
    choose(router, registry)

    router.released(view)

    assert choose(router, registry) == "w-1"


# Untrusted heartbeats


@pytest.mark.parametrize("interval_s", [1e308, float("inf"), float("nan")])
def test_a_heartbeat_claiming_a_huge_interval_still_dies_within_the_longest_allowed(
    registry: Registry, clock: FakeClock, interval_s: float
) -> None:
    join(registry, interval_s=interval_s)

    assert health_after(registry, clock, DEAD_AFTER * MAX_INTERVAL_S + 0.01) == DEAD


@pytest.mark.parametrize("interval_s", [0.0, -1.0, -1e308, 1e-300])
def test_a_heartbeat_claiming_no_interval_is_judged_on_the_shortest_allowed(
    registry: Registry, clock: FakeClock, interval_s: float
) -> None:
    view = join(registry, interval_s=interval_s)

    assert view.heartbeat.interval_s == MIN_INTERVAL_S
    assert health_after(registry, clock, (UNHEALTHY_AFTER - 0.5) * MIN_INTERVAL_S) == HEALTHY
    assert health_after(registry, clock, DEAD_AFTER * MIN_INTERVAL_S) == DEAD


def test_a_sane_interval_is_kept_as_sent(registry: Registry) -> None:
    view = join(registry, interval_s=2.5)

    assert view.heartbeat.interval_s == 2.5


@pytest.mark.parametrize("sent_at", [1e308, -1e308, 0.0])
def test_health_is_measured_from_arrival_whatever_the_heartbeat_says_it_was_sent(
    registry: Registry, clock: FakeClock, sent_at: float
) -> None:
    join(registry, sent_at=sent_at)

    assert health_after(registry, clock, DEAD_AFTER * INTERVAL + 0.01) == DEAD


def test_a_heartbeat_with_too_many_capabilities_serves_only_the_first_allowed(
    registry: Registry,
) -> None:
    view = join(registry, capabilities=[f"c{i}" for i in range(1000)])

    assert view.heartbeat.capabilities == [f"c{i}" for i in range(MAX_CAPABILITIES)]
    assert len(targets_of(view.heartbeat)) == MAX_CAPABILITIES + 1
    assert registry.serving(f"cap.c{MAX_CAPABILITIES}") == []


def test_capabilities_that_cannot_be_a_subject_token_are_dropped(registry: Registry) -> None:
    view = join(registry, capabilities=["work", "a.b", ">", "*", "", "x" * 129, "work", "ok-1"])

    assert view.heartbeat.capabilities == ["work", "ok-1"]
    assert registry.serving("cap.a.b") == []


@pytest.mark.parametrize(
    ("instance", "name"), [("w.1", "worker"), ("w-1", "work.er"), ("w-1", ">"), ("x" * 129, "w")]
)
def test_a_heartbeat_whose_instance_or_name_is_not_a_token_is_ignored(
    registry: Registry, instance: str, name: str
) -> None:
    assert registry.observe(heartbeat(instance, name=name)) is None
    assert len(registry) == 0


# No responders: gone at once


def test_a_gone_instance_is_dead_and_never_chosen_again(registry: Registry, router: Router) -> None:
    view = join(registry)

    assert registry.gone("w-1") is True

    assert view.health == DEAD
    assert view.lost.is_set()
    assert [choose(router, registry) for _ in range(5)] == [None] * 5


def test_a_gone_instance_is_reported_dead_by_the_next_sweep(registry: Registry) -> None:
    join(registry)
    registry.gone("w-1")

    changes = [(c.previous, c.health) for c in registry.sweep(forget_after=3600)]

    assert changes == [(HEALTHY, DEAD)]
    assert registry.sweep(forget_after=3600) == []


def test_a_gone_instance_stays_dead_though_its_last_heartbeat_is_recent(
    registry: Registry, router: Router, clock: FakeClock
) -> None:
    join(registry)
    registry.gone("w-1")

    assert health_after(registry, clock, 0.1) == DEAD
    assert choose(router, registry) is None


def test_a_heartbeat_sent_before_the_instance_was_found_gone_does_not_revive_it(
    registry: Registry, router: Router
) -> None:
    join(registry, sent_at=100.0)
    registry.gone("w-1")

    assert registry.observe(heartbeat(sent_at=100.0)) is None
    assert registry.observe(heartbeat(sent_at=99.0)) is None
    assert choose(router, registry) is None


def test_a_later_heartbeat_brings_a_gone_instance_back(registry: Registry, router: Router) -> None:
    view = join(registry, sent_at=100.0)
    registry.gone("w-1")

    change = registry.observe(heartbeat(sent_at=100.5))

    assert change is not None and (change.previous, change.health) == (DEAD, HEALTHY)
    assert not view.lost.is_set()
    assert choose(router, registry) == "w-1"
    assert registry.sweep(forget_after=3600) == []  # the dead notice was overtaken


def test_a_gone_instance_is_still_forgotten_in_time(registry: Registry, clock: FakeClock) -> None:
    join(registry)
    registry.gone("w-1")
    clock.advance(DEAD_AFTER * INTERVAL + 30 + 1)

    changes = [(c.previous, c.health) for c in registry.sweep(forget_after=30)]

    assert changes == [(HEALTHY, DEAD), (DEAD, "forgotten")]
    assert registry.get("w-1") is None


def test_gone_for_an_unknown_or_already_dead_instance_changes_nothing(
    registry: Registry, clock: FakeClock
) -> None:
    join(registry)
    health_after(registry, clock, DEAD_AFTER + 1)

    assert registry.gone("nobody") is False
    assert registry.gone("w-1") is False
    assert registry.sweep(forget_after=3600) == []


def test_an_instance_that_changes_its_capabilities_is_indexed_by_the_new_ones(
    registry: Registry, clock: FakeClock
) -> None:
    join(registry, capabilities=["a"])
    registry.observe(heartbeat(capabilities=["b"]))
    assert registry.serving("cap.a") == []
    assert registry.serving("cap.b") == [registry.get("w-1")]

    clock.advance(DEAD_AFTER * INTERVAL + 30 + 1)
    registry.sweep(forget_after=30)

    assert registry.serving("cap.b") == []
    assert registry.serving("agent.worker") == []


@pytest.mark.parametrize(
    ("processed", "failed", "rate"), [(100, -99, 1.0), (-5, 5, 0.0), (3, 1, 0.75), (0, 0, 1.0)]
)
def test_the_reported_success_rate_stays_between_zero_and_one(
    registry: Registry, processed: int, failed: int, rate: float
) -> None:
    view = join(registry, processed=processed, failed=failed)

    assert view.success_rate == pytest.approx(rate)


def test_a_heartbeat_with_negative_failures_does_not_outscore_an_honest_instance(
    registry: Registry, router: Router
) -> None:
    join(registry, "ghost", processed=100, failed=-99, in_flight=2)
    join(registry, "honest", processed=10, failed=0)

    assert {choose(router, registry) for _ in range(20)} == {"honest"}
