"""The routing policy: which instance gets the next task for a target.

Score of a candidate (higher wins), weights configurable (`CHORUS_ROUTING_WEIGHTS`):

    score = w_load * (1 - load / max_concurrency)
          + w_success * success_rate
          + w_resp * fastest_mean_ms / this_mean_ms

`success_rate` is an exponentially weighted mean of the outcomes this coordinator saw
(1.0 for an instance with no history, so a new instance gets work). Responsiveness is
normalised against the fastest candidate, so it matters for model calls that take
seconds (the guide's `1 / (mean_ms + 1)` is near zero for any of them). An instance with
no latency yet counts as fast. Only healthy, ready instances with a free slot and a
closed (or half-open, one trial task) circuit breaker are candidates.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable

import msgspec

from chorus.coordinator.registry import HEALTHY, Clock, InstanceView
from chorus.errors import ConfigError

EWMA_ALPHA = 0.3
MAX_COOLDOWN_S = 300.0


class Weights(msgspec.Struct, frozen=True):
    load: float = 0.4
    success: float = 0.4
    responsiveness: float = 0.2

    @classmethod
    def parse(cls, text: str) -> Weights:
        try:
            load, success, responsiveness = (float(part) for part in text.split(","))
        except ValueError:
            raise ConfigError(
                f"CHORUS_ROUTING_WEIGHTS={text!r}: give three numbers, load,success,"
                "responsiveness (default 0.4,0.4,0.2)"
            ) from None
        return cls(load, success, responsiveness)


class Router:
    """Picks the instance for each task among a target's candidates; keeps their breakers.

    `clock` (monotonic seconds) times the breaker's cooldown; injected so tests move time.
    """

    def __init__(
        self,
        weights: Weights,
        *,
        breaker_failures: int,
        breaker_cooldown: float,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.weights = weights
        self.breaker_failures = breaker_failures
        self.breaker_cooldown = breaker_cooldown
        self.clock = clock
        self.rng = rng or random.Random()

    def available(self, view: InstanceView) -> bool:
        if view.health != HEALTHY or view.heartbeat.state != "ready" or view.free < 1:
            return False
        if view.breaker == "open":
            if self.clock() < view.breaker_until:
                return False
            view.breaker = "half_open"
        if view.breaker == "half_open":
            return not view.trial_in_flight  # one trial task at a time
        return True

    def candidates(self, views: Iterable[InstanceView], target: str) -> list[InstanceView]:
        return [v for v in views if v.serves(target) and self.available(v)]

    def score(self, view: InstanceView, fastest_ms: float) -> float:
        w = self.weights
        load_factor = 1.0 - view.load / max(view.heartbeat.max_concurrency, 1)
        mean = view.latency_ms
        responsiveness = 1.0 if not mean or fastest_ms <= 0 else min(1.0, fastest_ms / mean)
        return (
            w.load * load_factor
            + w.success * view.success_rate
            + w.responsiveness * (responsiveness)
        )

    def choose(self, views: Iterable[InstanceView], target: str) -> InstanceView | None:
        """The best candidate; ties broken at random so equal instances share the work."""
        candidates = self.candidates(views, target)
        if not candidates:
            return None
        known = [v.latency_ms for v in candidates if v.latency_ms]
        fastest = min(known) if known else 0.0
        scored = [(self.score(v, fastest), self.rng.random(), v) for v in candidates]
        best = max(scored, key=lambda item: (item[0], item[1]))[2]
        if best.breaker == "half_open":
            best.trial_in_flight = True
        return best

    def succeeded(self, view: InstanceView, latency_ms: float) -> None:
        view.latency_ms = _ewma(view.latency_ms, latency_ms)
        view.success = _ewma(view.success if view.success is not None else 1.0, 1.0)
        view.consecutive_failures = 0
        view.trial_in_flight = False
        view.breaker = "closed"
        view.breaker_cooldown = 0.0

    def failed(self, view: InstanceView) -> None:
        view.success = _ewma(view.success if view.success is not None else 1.0, 0.0)
        view.consecutive_failures += 1
        if view.breaker == "open":
            return  # a task sent before it opened: the cooldown already counts it
        was_trial = view.trial_in_flight
        view.trial_in_flight = False
        if was_trial or view.consecutive_failures >= self.breaker_failures:
            view.breaker_cooldown = min(
                MAX_COOLDOWN_S, (view.breaker_cooldown * 2) or self.breaker_cooldown
            )
            view.breaker = "open"
            view.breaker_until = self.clock() + view.breaker_cooldown

    def released(self, view: InstanceView) -> None:
        """A task ended without telling anything about the instance (it was lost or drained)."""
        view.trial_in_flight = False


def _ewma(previous: float | None, sample: float) -> float:
    return sample if previous is None else previous + EWMA_ALPHA * (sample - previous)
