"""The registry: what the coordinator knows of each instance, built from heartbeats.

Health is measured, not assumed: an instance is `healthy` while its heartbeats arrive,
`unhealthy` after `unhealthy_after` missed intervals and `dead` after `dead_after`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from chorus.coordinator.pulse import Pulse
from chorus.messages import AgentRecord, Heartbeat

Clock = Callable[[], float]

HEALTHY = "healthy"
UNHEALTHY = "unhealthy"
DEAD = "dead"


@dataclass
class InstanceView:
    """One instance as the coordinator sees it; mutable, process-local."""

    heartbeat: Heartbeat
    last_seen: float  # coordinator clock
    last_seen_wall: float
    health: str = HEALTHY
    reserved: int = 0  # tasks this coordinator sent and is waiting on
    latency_ms: float | None = None  # EWMA of round trips measured by the dispatcher
    success: float | None = None  # EWMA of outcomes measured by the dispatcher
    consecutive_failures: int = 0
    breaker: str = "closed"
    breaker_until: float = 0.0
    breaker_cooldown: float = 0.0
    trial_in_flight: bool = False
    lost: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def instance(self) -> str:
        return self.heartbeat.instance

    @property
    def load(self) -> int:
        """Tasks on the instance: what we sent, or what it reports when that is more."""
        return max(self.reserved, self.heartbeat.in_flight + self.heartbeat.waiting)

    @property
    def free(self) -> int:
        return max(0, self.heartbeat.max_concurrency - self.load)

    @property
    def success_rate(self) -> float:
        if self.success is not None:
            return self.success
        done = self.heartbeat.processed + self.heartbeat.failed
        return self.heartbeat.processed / done if done else 1.0

    @property
    def mean_latency_ms(self) -> float:
        return self.latency_ms if self.latency_ms is not None else self.heartbeat.mean_latency_ms

    def serves(self, target: str) -> bool:
        kind, _, name = target.partition(".")
        if kind == "cap":
            return name in self.heartbeat.capabilities
        return name == self.heartbeat.name

    def record(self) -> AgentRecord:
        hb = self.heartbeat
        return AgentRecord(
            instance=hb.instance,
            name=hb.name,
            capabilities=hb.capabilities,
            health=self.health,
            state=hb.state,
            in_flight=self.load,
            max_concurrency=hb.max_concurrency,
            processed=hb.processed,
            failed=hb.failed,
            success_rate=round(self.success_rate, 4),
            mean_latency_ms=round(self.mean_latency_ms, 3),
            last_seen=self.last_seen_wall,
            started_at=hb.started_at,
            breaker=self.breaker,
            usage=hb.usage,
        )


def targets_of(hb: Heartbeat) -> list[str]:
    """The dispatch targets an instance serves: its agent name and each capability."""
    return [f"agent.{hb.name}", *(f"cap.{c}" for c in hb.capabilities)]


@dataclass(frozen=True)
class Change:
    """A health transition, published as an AgentStatusChange."""

    view: InstanceView
    previous: str
    health: str


class Registry:
    def __init__(
        self, *, unhealthy_after: float, dead_after: float, clock: Clock = time.monotonic
    ) -> None:
        self.unhealthy_after = unhealthy_after
        self.dead_after = dead_after
        self.clock = clock
        self._views: dict[str, InstanceView] = {}
        self._by_target: dict[str, dict[str, InstanceView]] = {}
        self.changed = Pulse()  # fired whenever capacity may have appeared

    def __iter__(self) -> Iterator[InstanceView]:
        return iter(list(self._views.values()))

    def __len__(self) -> int:
        return len(self._views)

    def get(self, instance: str) -> InstanceView | None:
        return self._views.get(instance)

    def serving(self, target: str) -> list[InstanceView]:
        """The instances that serve `target`: an index, so routing does not scan them all."""
        return list(self._by_target.get(target, {}).values())

    def _forget(self, view: InstanceView) -> None:
        self._views.pop(view.instance, None)
        for target in targets_of(view.heartbeat):
            self._by_target.get(target, {}).pop(view.instance, None)

    def observe(self, hb: Heartbeat) -> Change | None:
        """Take a heartbeat; returns the change when the instance is new, back, or leaving."""
        view = self._views.get(hb.instance)
        now = self.clock()
        if hb.state == "stopped":
            if view is None:
                return None
            self._forget(view)
            view.heartbeat = hb
            view.lost.set()
            return Change(view, view.health, "left")
        if view is None:
            view = InstanceView(heartbeat=hb, last_seen=now, last_seen_wall=time.time())
            self._views[hb.instance] = view
            for target in targets_of(hb):
                self._by_target.setdefault(target, {})[hb.instance] = view
            self.changed.fire()
            return Change(view, "", "up")
        had_room = view.free
        view.heartbeat = hb
        view.last_seen = now
        view.last_seen_wall = time.time()
        if view.health != HEALTHY or view.free > had_room:
            # Only a heartbeat that may open a slot wakes the dispatchers: with a thousand
            # instances beating every second, waking on each one is most of the CPU.
            self.changed.fire()
        if view.health != HEALTHY:
            previous, view.health = view.health, HEALTHY
            return Change(view, previous, HEALTHY)
        return None

    def sweep(self, forget_after: float) -> list[Change]:
        """Re-measure health from the age of each last heartbeat; forget long-dead instances."""
        now = self.clock()
        changes: list[Change] = []
        for view in list(self._views.values()):
            interval = max(view.heartbeat.interval_s, 0.001)
            silent = (now - view.last_seen) / interval
            health = (
                DEAD
                if silent > self.dead_after
                else UNHEALTHY
                if silent > self.unhealthy_after
                else HEALTHY
            )
            if health != view.health:
                changes.append(Change(view, view.health, health))
                view.health = health
                if health == DEAD:
                    view.lost.set()
            if health == DEAD and now - view.last_seen > forget_after + self.dead_after * interval:
                self._forget(view)
                changes.append(Change(view, DEAD, "forgotten"))
        return changes
