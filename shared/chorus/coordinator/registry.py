"""The registry: what the coordinator knows of each instance, built from heartbeats.

Health is measured, not assumed: an instance is `healthy` while its heartbeats arrive,
`unhealthy` after `unhealthy_after` missed intervals and `dead` after `dead_after`. An
instance the dispatcher found gone (no responders) is dead at once, until a heartbeat sent
later than the last one seen shows it is back. Entries restored from the registry bucket
at start (an earlier coordinator's) are judged by the age of their last heartbeat and are
never healthy until a heartbeat of their own arrives.

Each heartbeat may list the tasks the instance holds (`Heartbeat.tasks`): the dispatcher
waits on `InstanceView.beat` to learn that a task it sent is not there.

A heartbeat is untrusted input: its interval is clamped to MIN_INTERVAL_S..MAX_INTERVAL_S
(a ghost saying `interval_s: 1e308` must still die) and it may name at most
MAX_CAPABILITIES valid capabilities (each becomes a dispatch consumer).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final, Literal

import msgspec

from chorus.coordinator.pulse import Pulse
from chorus.errors import ConfigError
from chorus.messages import AgentRecord, BreakerState, Health, Heartbeat, StatusChange
from chorus.messages.agents import MAX_LISTED_TASKS
from chorus.subjects import check_token

log = logging.getLogger("chorus.coordinator")

Clock = Callable[[], float]

HEALTHY: Final = "healthy"
UNHEALTHY: Final = "unhealthy"
DEAD: Final = "dead"

MIN_INTERVAL_S = 0.05
MAX_INTERVAL_S = 60.0
MAX_CAPABILITIES = 64
MAX_NAME_LENGTH = 128


@dataclass
class InstanceView:
    """One instance as the coordinator sees it; mutable, process-local."""

    heartbeat: Heartbeat
    last_seen: float  # coordinator clock
    last_seen_wall: float
    health: Health = HEALTHY
    reserved: int = 0  # tasks this coordinator sent and is waiting on
    latency_ms: float | None = None  # EWMA of round trips measured by the dispatcher
    success: float | None = None  # EWMA of outcomes measured by the dispatcher
    consecutive_failures: int = 0
    breaker: BreakerState = "closed"
    breaker_until: float = 0.0
    breaker_cooldown: float = 0.0
    trial_in_flight: bool = False
    gone_after: float | None = None  # set by `gone`: the `sent_at` a heartbeat must beat
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    # The task ids its last heartbeat listed (None: it did not list them); `beats` counts
    # the heartbeats taken and `beat` fires on each, for dispatches waiting on the list.
    held: frozenset[str] | None = None
    beats: int = 0
    beat: Pulse = field(default_factory=Pulse)
    restored: bool = False  # from the registry bucket, no heartbeat of its own seen yet

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
        processed, failed = max(self.heartbeat.processed, 0), max(self.heartbeat.failed, 0)
        return processed / (processed + failed) if processed + failed else 1.0

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
            interval_s=clamp_interval(hb.interval_s),
        )


def targets_of(hb: Heartbeat) -> list[str]:
    """The dispatch targets an instance serves: its agent name and each capability."""
    return [f"agent.{hb.name}", *(f"cap.{c}" for c in hb.capabilities)]


def clamp_interval(interval_s: float) -> float:
    """A heartbeat interval the sweep can trust: finite and within MIN..MAX_INTERVAL_S."""
    if math.isnan(interval_s):
        return MAX_INTERVAL_S
    return min(max(interval_s, MIN_INTERVAL_S), MAX_INTERVAL_S)


def _is_name(value: str) -> bool:
    if len(value) > MAX_NAME_LENGTH:
        return False
    try:
        check_token(value, "name")
    except ConfigError:
        return False
    return True


def sanitize(hb: Heartbeat) -> tuple[Heartbeat | None, str]:
    """The heartbeat made safe to act on, and what was wrong with it ("" when nothing).

    None when its instance or agent name cannot be part of a subject. Otherwise the
    interval is clamped and only the first MAX_CAPABILITIES capabilities are read, keeping
    the valid names once each.
    """
    if not (_is_name(hb.instance) and _is_name(hb.name)):
        return None, (
            f"instance and agent name must be subject tokens of at most {MAX_NAME_LENGTH} "
            "characters"
        )
    interval = clamp_interval(hb.interval_s)
    capabilities = list(dict.fromkeys(c for c in hb.capabilities[:MAX_CAPABILITIES] if _is_name(c)))
    # A list longer than an instance sends is not read as complete: as if none were given.
    tasks = hb.tasks if hb.tasks is None or len(hb.tasks) <= MAX_LISTED_TASKS else None
    if interval == hb.interval_s and capabilities == hb.capabilities and tasks is hb.tasks:
        return hb, ""
    problems = []
    if interval != hb.interval_s:
        problems.append(f"interval_s {hb.interval_s!r} clamped to {interval}")
    if capabilities != hb.capabilities:
        problems.append(
            f"{len(hb.capabilities)} capabilities cut to {len(capabilities)} (at most "
            f"{MAX_CAPABILITIES}, valid and distinct)"
        )
    if tasks is not hb.tasks:
        problems.append(f"{len(hb.tasks or [])} tasks listed (at most {MAX_LISTED_TASKS}): ignored")
    return msgspec.structs.replace(
        hb, interval_s=interval, capabilities=capabilities, tasks=tasks
    ), "; ".join(problems)


@dataclass(frozen=True)
class Change:
    """A health transition, published as an AgentStatusChange."""

    view: InstanceView
    previous: StatusChange | Literal[""]  # "" when the instance just came up
    health: StatusChange


class Registry:
    """The instances known from heartbeats, indexed by dispatch target.

    `clock` measures heartbeat age (monotonic); `wall_clock` stamps `last_seen` for the
    records people read. Both are injected so tests can move time.
    """

    def __init__(
        self,
        *,
        unhealthy_after: float,
        dead_after: float,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        self.unhealthy_after = unhealthy_after
        self.dead_after = dead_after
        self.clock = clock
        self.wall_clock = wall_clock
        self._views: dict[str, InstanceView] = {}
        self._by_target: dict[str, dict[str, InstanceView]] = {}
        self._pending: list[Change] = []  # from `gone`, reported by the next sweep
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

    def _index(self, view: InstanceView) -> None:
        self._views[view.instance] = view
        for target in targets_of(view.heartbeat):
            self._by_target.setdefault(target, {})[view.instance] = view

    def _forget(self, view: InstanceView) -> None:
        self._views.pop(view.instance, None)
        for target in targets_of(view.heartbeat):
            self._by_target.get(target, {}).pop(view.instance, None)

    def observe(self, heartbeat: Heartbeat) -> Change | None:
        """Take a heartbeat; returns the change when the instance is new, back, or leaving."""
        view = self._views.get(heartbeat.instance)
        hb, problem = sanitize(heartbeat)
        if problem and (hb is None or view is None):  # once per instance, not every beat
            log.warning(
                "untrustworthy heartbeat", extra={"instance": heartbeat.instance, "error": problem}
            )
        if hb is None:
            return None
        now = self.clock()
        if hb.state == "stopped":
            if view is None:
                return None
            self._forget(view)
            view.heartbeat = hb
            view.lost.set()
            return Change(view, view.health, "left")
        if view is None:
            view = InstanceView(heartbeat=hb, last_seen=now, last_seen_wall=self.wall_clock())
            self._index(view)
            _took(view, hb)
            self.changed.fire()
            return Change(view, "", "up")
        if view.gone_after is not None:
            if not hb.sent_at > view.gone_after:
                return None  # sent before the instance was found gone: says nothing
            view.gone_after = None
        if view.health == DEAD:
            view.lost = asyncio.Event()  # the old one is set, and would fail every new task
        had_room = view.free
        reindex = targets_of(hb) != targets_of(view.heartbeat)
        if reindex:
            self._forget(view)  # so that forgetting it later finds every entry
        view.heartbeat = hb
        if reindex:
            self._index(view)
        view.last_seen = now
        view.last_seen_wall = self.wall_clock()
        _took(view, hb)
        if view.health != HEALTHY or view.free > had_room:
            # Only a heartbeat that may open a slot wakes the dispatchers: with a thousand
            # instances beating every second, waking on each one is most of the CPU.
            self.changed.fire()
        if view.health != HEALTHY:
            previous, view.health = view.health, HEALTHY
            return Change(view, previous, HEALTHY)
        return None

    def restore(self, record: AgentRecord, interval_s: float) -> InstanceView | None:
        """Take an entry an earlier coordinator left in the registry bucket.

        It is judged by the age of its `last_seen` (heartbeats every `interval_s` unless the
        entry says its own): dead when
        older than `dead_after` intervals, unhealthy otherwise, and healthy (routable) only
        once a heartbeat of its own arrives: a `chorus up` restarted on an old folder must
        not send tasks to the previous run's instances. None when the instance is known
        already (its heartbeat came first) or the entry cannot name an instance.
        """
        if record.instance in self._views:
            return None
        hb = Heartbeat(
            instance=record.instance,
            name=record.name,
            capabilities=record.capabilities,
            in_flight=record.in_flight,
            max_concurrency=record.max_concurrency,
            processed=record.processed,
            failed=record.failed,
            mean_latency_ms=record.mean_latency_ms,
            interval_s=record.interval_s or interval_s,
            started_at=record.started_at,
            sent_at=record.last_seen,
            state="ready" if record.state == "ready" else "draining",
            usage=record.usage,
        )
        safe, _ = sanitize(hb)
        if safe is None:
            return None
        interval = clamp_interval(safe.interval_s)
        age = max(0.0, self.wall_clock() - record.last_seen)
        view = InstanceView(
            heartbeat=safe,
            last_seen=self.clock() - age,
            last_seen_wall=record.last_seen,
            health=DEAD if age / interval > self.dead_after else UNHEALTHY,
            restored=True,
        )
        self._index(view)
        return view

    def gone(self, instance: str) -> bool:
        """Mark an instance dead now, on certain evidence it is gone (no responders).

        It stays dead, out of routing, until a heartbeat sent later than the last one seen
        arrives; tasks waiting on it are told (`lost`). The change is reported by the next
        `sweep`. Returns whether the instance was known and not already dead.
        """
        view = self._views.get(instance)
        if view is None:
            return False
        view.gone_after = view.heartbeat.sent_at
        view.lost.set()
        if view.health == DEAD:
            return False
        self._pending.append(Change(view, view.health, DEAD))
        view.health = DEAD
        return True

    def sweep(self, forget_after: float) -> list[Change]:
        """Re-measure health from the age of each last heartbeat; forget long-dead instances."""
        now = self.clock()
        changes, self._pending = self._pending, []
        # Drop those overtaken since: the instance came back, or left.
        changes = [c for c in changes if c.view.health == c.health and self.get(c.view.instance)]
        for view in list(self._views.values()):
            interval = clamp_interval(view.heartbeat.interval_s)
            silent = (now - view.last_seen) / interval
            health: Health = (
                DEAD
                if silent > self.dead_after or view.gone_after is not None
                else UNHEALTHY
                if silent > self.unhealthy_after or view.restored
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


def _took(view: InstanceView, hb: Heartbeat) -> None:
    """Note a heartbeat taken: the tasks it lists, and a beat for whoever waits on them."""
    view.restored = False
    view.held = None if hb.tasks is None else frozenset(hb.tasks)
    view.beats += 1
    view.beat.fire()
