"""System reads: the agent registry (KV `<prefix>-agents`) and the coordinator's metrics.

Used by the CLI (`chorus agents`), the gateway (health, metrics) and anyone else who wants
to know what runs. An entry that cannot be decoded (a forged or corrupt value) is skipped
and logged, never a failure of the whole read.

An entry's health is what its coordinator judged when it wrote it; readers judge it again
by the age of its last heartbeat (`judged_health`): an entry nobody keeps fresh any more (an
earlier `chorus up`'s, its coordinator gone) is never shown as healthy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import BucketNotFoundError, KeyDeletedError, KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from chorus.errors import InvalidMessage, NoResponders, NotFound
from chorus.messages import AgentRecord, Health, Metrics, decode
from chorus.nats.streams import ensure_agents_bucket
from chorus.subjects import Subjects

log = logging.getLogger("chorus.client.system")

# The coordinator rewrites an entry once its `last_seen` lags the instance's last heartbeat
# by this many heartbeat intervals (chorus.coordinator.service).
REGISTRY_LAG_INTERVALS = 3.0
# An entry whose last heartbeat is older than this many intervals is not healthy, whatever
# it says: the coordinator's own limit (CHORUS_UNHEALTHY_AFTER, 3) plus the lag above, plus
# one for the sweep's period and the write.
STALE_AFTER_INTERVALS = 7.0
DEAD_AFTER_INTERVALS = 12.0  # CHORUS_DEAD_AFTER (6) plus the same margin
DEFAULT_INTERVAL_S = 2.0  # for entries that do not say theirs (CHORUS_HEARTBEAT_INTERVAL)
# ... and never sooner than this (seconds): with short intervals a loaded machine delays
# registry writes by more than 7 intervals (0.2 s heartbeats: 1.4 s) while the instance lives.
STALE_MIN_S = 10.0
DEAD_MIN_S = 20.0


def judged_health(record: AgentRecord, now: float) -> Health:
    """The record's health, judged again by the age of its last heartbeat against the
    instance's own interval: `unhealthy` past STALE_AFTER_INTERVALS (at least STALE_MIN_S),
    `dead` past DEAD_AFTER_INTERVALS (at least DEAD_MIN_S), never better than what the
    coordinator wrote."""
    interval = record.interval_s or DEFAULT_INTERVAL_S
    silent_s = now - record.last_seen
    if record.health == "dead" or silent_s > max(DEAD_AFTER_INTERVALS * interval, DEAD_MIN_S):
        return "dead"
    stale_s = max(STALE_AFTER_INTERVALS * interval, STALE_MIN_S)
    if record.health == "unhealthy" or silent_s > stale_s:
        return "unhealthy"
    return "healthy"


def judged(record: AgentRecord, now: float) -> AgentRecord:
    """The record with its health judged again (`judged_health`)."""
    health = judged_health(record, now)
    return record if health == record.health else msgspec.structs.replace(record, health=health)


class RegistryChange:
    """One change seen by `SystemClient.watch_agents`: a record, or `record=None` when the
    instance left the registry."""

    __slots__ = ("instance", "record")

    def __init__(self, instance: str, record: AgentRecord | None) -> None:
        self.instance = instance
        self.record = record


class SystemClient:
    def __init__(self, nc: Client, subjects: Subjects, *, timeout: float = 1.0) -> None:
        self.nc = nc
        self.subjects = subjects
        self.timeout = timeout  # for the coordinator: short, health checks must answer fast
        self._registry: KeyValue | None = None

    async def _bucket(self, *, create: bool) -> KeyValue:
        if self._registry is None:
            js = self.nc.jetstream()
            if create:
                self._registry = await ensure_agents_bucket(js, self.subjects)
            else:
                try:
                    self._registry = await js.key_value(self.subjects.agents_bucket)
                except BucketNotFoundError:
                    raise NotFound(
                        "no registry yet: start a coordinator (chorus coordinator or chorus up)"
                    ) from None
        return self._registry

    async def agents(self, *, create: bool = True, judge: bool = True) -> list[AgentRecord]:
        """Every instance in the registry, by agent name then instance, each health judged
        again by the age of its last heartbeat (`judged_health`; as stored with
        `judge=False`). With `create=False` a missing registry is NotFound instead of being
        created empty."""
        registry = await self._bucket(create=create)
        try:
            keys = await registry.keys()
        except NoKeysError:
            return []
        records = []
        for key in keys:
            try:
                entry = await registry.get(key)
            except (KeyNotFoundError, KeyDeletedError):
                continue  # the instance left between listing and reading
            record = _record(key, entry.value)
            if record is not None:
                records.append(judged(record, time.time()) if judge else record)
        return sorted(records, key=lambda r: (r.name, r.instance))

    async def watch_agents(self, *, judge: bool = True) -> AsyncIterator[RegistryChange]:
        """Every registry change from now on (after the current entries, once each), health
        judged again as by `agents`."""
        registry = await self._bucket(create=False)
        watcher = await registry.watchall()
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=5.0)  # type: ignore[no-untyped-call]
                except TimeoutError:
                    continue
                if entry is None:
                    continue
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    yield RegistryChange(entry.key, None)
                    continue
                record = _record(entry.key, entry.value)
                if record is not None:
                    yield RegistryChange(
                        entry.key, judged(record, time.time()) if judge else record
                    )
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    async def metrics(self) -> Metrics:
        """The coordinator's metrics; NoResponders when no coordinator answers in time."""
        try:
            reply = await self.nc.request(self.subjects.metrics, b"", timeout=self.timeout)
        except (NoRespondersError, NatsTimeout):
            raise NoResponders(
                f"no coordinator answered on {self.subjects.metrics} within {self.timeout}s: "
                "start one with `chorus coordinator` (or `chorus up`)"
            ) from None
        try:
            return decode(reply.data, Metrics)
        except InvalidMessage as exc:
            raise NoResponders(f"the coordinator answered with no metrics: {exc.reason}") from None

    async def coordinator_answers(self) -> bool:
        try:
            await self.metrics()
        except NoResponders:
            return False
        return True


def _record(key: str, value: bytes | None) -> AgentRecord | None:
    if not value:
        return None
    try:
        return decode(value, AgentRecord)
    except InvalidMessage as exc:
        log.warning(
            "skipping an unreadable registry entry", extra={"key": key, "error": exc.reason}
        )
        return None
