"""System reads: the agent registry (KV `<prefix>-agents`) and the coordinator's metrics.

Used by the CLI (`chorus agents`), the gateway (health, metrics) and anyone else who wants
to know what runs. An entry that cannot be decoded (a forged or corrupt value) is skipped
and logged, never a failure of the whole read.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import BucketNotFoundError, KeyDeletedError, KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from chorus.errors import InvalidMessage, NoResponders, NotFound
from chorus.messages import AgentRecord, Metrics, decode
from chorus.nats.streams import ensure_agents_bucket
from chorus.subjects import Subjects

log = logging.getLogger("chorus.client.system")


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

    async def agents(self, *, create: bool = True) -> list[AgentRecord]:
        """Every instance in the registry, by agent name then instance. With `create=False`
        a missing registry is NotFound instead of being created empty."""
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
                records.append(record)
        return sorted(records, key=lambda r: (r.name, r.instance))

    async def watch_agents(self) -> AsyncIterator[RegistryChange]:
        """Every registry change from now on (after the current entries, once each)."""
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
                    yield RegistryChange(entry.key, record)
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
