"""The coordinator: heartbeats in, registry and health out, durable dispatch, metrics.

It can restart at any time: queued tasks wait in JetStream, tasks in flight are redelivered
after their claim lapses (their outcome is recorded once), and the registry is rebuilt from
the next heartbeats. The KV copy is read at start so `chorus agents` never goes blank, but
each entry is judged by its age and rewritten at once: none is healthy (or gets a task)
until a heartbeat of its own arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import KeyDeletedError, KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service

from chorus import __version__
from chorus.client.approvals import ApprovalBook
from chorus.client.control import ensure_control_bucket
from chorus.client.system import REGISTRY_LAG_INTERVALS
from chorus.config import Settings
from chorus.coordinator.approvals import sweep_forever
from chorus.coordinator.dispatch import Dispatcher
from chorus.coordinator.registry import (
    DEAD,
    HEALTHY,
    Change,
    Clock,
    InstanceView,
    Registry,
    clamp_interval,
)
from chorus.coordinator.routing import Router, Weights
from chorus.errors import InvalidMessage
from chorus.messages import (
    AgentMetrics,
    AgentRecord,
    AgentStatusChange,
    Heartbeat,
    Metrics,
    decode,
    encode,
)
from chorus.nats import wire
from chorus.nats.streams import (
    ensure_agents_bucket,
    ensure_budgets_bucket,
    ensure_chunk_stream,
    ensure_effects_bucket,
    ensure_events_stream,
    ensure_limits_bucket,
    ensure_sessions_bucket,
    ensure_tasks_bucket,
)
from chorus.state.bucket import StateBucket
from chorus.telemetry.metrics import DispatchInstruments, snapshot

log = logging.getLogger("chorus.coordinator")

# An entry is rewritten when it changed (at most every REGISTRY_CHANGE_S) and, unchanged,
# every REGISTRY_REFRESH_S so it outlives the bucket's 60 s TTL only while we are alive, and
# when its `last_seen` lags the last heartbeat by REGISTRY_LAG_INTERVALS, so readers can
# judge liveness from the entry alone (chorus.client.system.judged_health).
REGISTRY_CHANGE_S = 2.0
REGISTRY_REFRESH_S = 20.0


class Coordinator:
    def __init__(self, nc: Client, settings: Settings, *, clock: Clock = time.monotonic) -> None:
        self.nc = nc
        self.settings = settings
        self.subjects = settings.subjects
        self.clock = clock
        self.registry = Registry(
            unhealthy_after=settings.unhealthy_after,
            dead_after=settings.dead_after,
            clock=clock,
        )
        self.router = Router(
            Weights.parse(settings.routing_weights),
            breaker_failures=settings.breaker_failures,
            breaker_cooldown=settings.breaker_cooldown,
            clock=clock,
        )
        self._agents: KeyValue | None = None
        self._dispatcher: Dispatcher | None = None
        self._written: dict[str, float] = {}
        self._written_seen: dict[str, float] = {}  # the last_seen each entry was written with
        self._last_record: dict[str, tuple[object, ...]] = {}
        self._subscriptions: list[Subscription] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._approval_sweeper: asyncio.Task[None] | None = None
        self._service: Service | None = None
        # Its own Prometheus registry: /metrics on CHORUS_METRICS_PORT, and in Metrics replies.
        self.dispatch_metrics = DispatchInstruments()

    @property
    def dispatcher(self) -> Dispatcher:
        assert self._dispatcher is not None, "start() the coordinator first"
        return self._dispatcher

    async def start(self) -> None:
        js = self.nc.jetstream()
        # What agents use but, under generated credentials, may not create (chorus.auth).
        # Their replica count (CHORUS_REPLICAS) is the coordinator's to set.
        replicas = self.settings.replicas
        await ensure_events_stream(js, self.subjects, replicas=replicas)
        await ensure_chunk_stream(
            js, self.subjects, self.settings.stream_max_age, replicas=replicas
        )
        await StateBucket.ensure(self.nc, self.subjects, replicas=replicas)
        await ensure_sessions_bucket(
            js, self.subjects, self.settings.session_ttl, replicas=replicas
        )
        await ensure_effects_bucket(js, self.subjects, replicas=replicas)
        await ensure_limits_bucket(js, self.subjects, replicas=replicas)
        await ensure_budgets_bucket(js, self.subjects, replicas=replicas)
        self._agents = await ensure_agents_bucket(js, self.subjects, replicas=replicas)
        tasks = await ensure_tasks_bucket(js, self.subjects, replicas=replicas)
        # agents read it, may not create it
        await ensure_control_bucket(js, self.subjects, replicas=replicas)
        self._dispatcher = Dispatcher(
            self.nc, self.settings, self.registry, self.router, tasks, self.dispatch_metrics
        )
        await self._restore_registry(self._agents)
        await self._dispatcher.start()
        self._subscriptions = [
            await self.nc.subscribe(self.subjects.all_heartbeats, cb=self._on_heartbeat),
        ]
        # A NATS micro service, so `$SRV.PING/INFO/STATS` show the coordinator; its metrics
        # requests are an endpoint (counted in STATS).
        self._service = await add_service(
            self.nc,
            name=self.subjects.role_service("coordinator"),
            version=__version__,
            description="Chorus coordinator: agent registry, health, routing, durable dispatch",
            metadata={"role": "coordinator"},
        )
        await self._service.add_endpoint(
            EndpointConfig(
                name="metrics",
                subject=self.subjects.metrics,
                queue_group=self.subjects.coordinator_queue,
                handler=self._on_metrics,
            )
        )
        self._sweeper = asyncio.create_task(self._sweep_loop())
        self.approvals = ApprovalBook(self.nc, self.subjects, replicas=self.settings.replicas)
        await self.approvals.bucket()  # agents may use it, not create it (chorus.auth)
        self._approval_sweeper = asyncio.create_task(
            sweep_forever(self.approvals, self.settings.approval_sweep)
        )
        await self.nc.flush(timeout=5)
        log.info("coordinator ready", extra={"targets": self._dispatcher.targets})

    async def stop(self) -> None:
        """Stop taking heartbeats and tasks (idempotent)."""
        subscriptions, self._subscriptions = self._subscriptions, []
        for sub in subscriptions:
            await sub.unsubscribe()
        if self._service is not None:
            await self._service.stop()
        for sweeper in (self._sweeper, self._approval_sweeper):
            if sweeper:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
        if self._dispatcher:
            await self._dispatcher.stop()
        log.info("coordinator stopped")

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = decode(msg.data, Heartbeat)
        except InvalidMessage as exc:
            log.warning(
                "ignoring malformed heartbeat", extra={"subject": msg.subject, "error": str(exc)}
            )
            return
        if msg.subject != self.subjects.heartbeat(hb.instance) or (
            self.subjects.instance_agent(hb.instance) != hb.name
        ):
            # Credentials confine an agent to the subjects of its own name: a heartbeat for
            # another agent's instance, or on another instance's subject, is a forgery.
            log.warning(
                "ignoring heartbeat not from its instance",
                extra={"subject": msg.subject, "instance": hb.instance, "name": hb.name},
            )
            return
        change = self.registry.observe(hb)
        if change is not None:
            await self._changed(change)

    async def _restore_registry(self, agents: KeyValue) -> None:
        """Read the entries an earlier coordinator left, judged by age, and rewrite them at
        once with that health: readers of the bucket must not see the previous run's
        instances as healthy for the rest of the entries' TTL."""
        try:
            keys = await agents.keys()
        except NoKeysError:
            return
        for key in keys:
            try:
                entry = await agents.get(key)
                record = decode(entry.value or b"", AgentRecord)
            except (KeyNotFoundError, KeyDeletedError):
                continue
            except InvalidMessage as exc:
                log.warning("unreadable registry entry", extra={"key": key, "error": exc.reason})
                continue
            view = self.registry.restore(record, self.settings.heartbeat_interval)
            if view is not None:
                log.info(
                    "registry entry restored",
                    extra={"instance": view.instance, "health": view.health},
                )
                await self._write(view.instance)

    async def _changed(self, change: Change) -> None:
        view = change.view
        if change.health in ("up", HEALTHY):
            self.dispatcher.serve_instance(view)  # idempotent; a restored entry beat again
        log.info(
            "agent status",
            extra={"instance": view.instance, "health": change.health, "previous": change.previous},
        )
        notice = AgentStatusChange(
            instance=view.instance,
            name=view.heartbeat.name,
            health=change.health,
            previous=change.previous,
        )
        await wire.publish(
            self.nc, self.subjects.agent_status(view.instance, change.health), encode(notice)
        )
        assert self._agents is not None
        if change.health in ("left", "forgotten"):
            self._written.pop(view.instance, None)
            self._written_seen.pop(view.instance, None)
            self._last_record.pop(view.instance, None)
            await self._agents.delete(view.instance)
        else:
            await self._write(view.instance)

    async def _write(self, instance: str) -> None:
        view = self.registry.get(instance)
        if view is None or self._agents is None:
            return
        record = view.record()
        await self._agents.put(instance, encode(record))
        self._written[instance] = self.clock()
        self._written_seen[instance] = record.last_seen
        self._last_record[instance] = _fingerprint(view)

    async def _sweep_loop(self) -> None:
        interval = max(self.settings.heartbeat_interval / 2, 0.05)
        while True:
            try:
                for change in self.registry.sweep(self.settings.forget_after):
                    await self._changed(change)
                now = self.clock()
                for view in self.registry:
                    if view.health == DEAD:
                        continue
                    since = now - self._written.get(view.instance, 0)
                    changed = self._last_record.get(view.instance) != _fingerprint(view)
                    lag = view.last_seen_wall - self._written_seen.get(view.instance, 0.0)
                    lagging = lag > REGISTRY_LAG_INTERVALS * clamp_interval(
                        view.heartbeat.interval_s
                    )
                    if (
                        since > REGISTRY_REFRESH_S
                        or lagging
                        or (changed and since > REGISTRY_CHANGE_S)
                    ):
                        await self._write(view.instance)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("registry sweep failed")
            await asyncio.sleep(interval)  # the sweep is periodic by nature: health is age

    def metrics(self, queues: dict[str, int]) -> Metrics:
        views = list(self.registry)
        capacity = sum(v.heartbeat.max_concurrency for v in views if v.health != DEAD)
        load = sum(v.load for v in views if v.health != DEAD)
        counters = self.dispatcher.counters
        return Metrics(
            total_agents=len(views),
            healthy_agents=sum(1 for v in views if v.health == "healthy"),
            queue_length=sum(queues.values()) - counters.active,
            active_jobs=counters.active,
            total_tasks=counters.completed + counters.failed + counters.active,
            completed_tasks=counters.completed,
            failed_tasks=counters.failed,
            retried_tasks=counters.retried,
            dead_lettered=counters.dead_lettered,
            current_load=round(load / capacity, 4) if capacity else 0.0,
            agents=[
                AgentMetrics(
                    instance=v.instance,
                    name=v.heartbeat.name,
                    health=v.health,
                    load=v.load,
                    max_concurrency=v.heartbeat.max_concurrency,
                    success_rate=round(v.success_rate, 4),
                    mean_latency_ms=round(v.mean_latency_ms, 3),
                    breaker=v.breaker,
                )
                for v in views
            ],
            queues=queues,
            families=snapshot(self.dispatch_metrics.registry),
        )

    async def _on_metrics(self, request: Request) -> None:
        queues = await self.dispatcher.queue_lengths()
        await wire.respond(request, encode(self.metrics(queues)))


def _fingerprint(view: InstanceView) -> tuple[object, ...]:
    """What a registry entry shows, cheaply: compared on every sweep for every instance."""
    hb = view.heartbeat
    return (
        hb.in_flight,
        hb.waiting,
        hb.processed,
        hb.failed,
        hb.state,
        view.health,
        view.breaker,
        view.reserved,
        view.latency_ms,
        view.success,
    )
