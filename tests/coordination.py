"""Helpers for coordinator tests: waits on KV and metrics, and a hand-made instance."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue

from chorus.config import Settings
from chorus.messages import AgentRecord, Heartbeat, InstanceState, Metrics, Task, decode, encode
from chorus.nats.streams import ensure_agents_bucket


async def wait_for_record(
    nc: Client,
    settings: Settings,
    instance: str,
    accept: Callable[[AgentRecord | None], bool],
    timeout: float = 10,
) -> AgentRecord | None:
    """Watch the registry entry of `instance` until `accept` holds for it (None = deleted)."""
    kv: KeyValue = await ensure_agents_bucket(nc.jetstream(), settings.subjects)
    watcher = await kv.watch(instance)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while (left := deadline - loop.time()) > 0:
            try:
                entry = await watcher.updates(timeout=left)
            except TimeoutError:
                break
            if entry is None:  # end of the initial values
                continue
            record = (
                None
                if entry.operation in ("DEL", "PURGE") or not entry.value
                else decode(entry.value, AgentRecord)
            )
            if accept(record):
                return record
    finally:
        await watcher.stop()
    raise AssertionError(f"registry entry of {instance} never matched within {timeout}s")


async def metrics(nc: Client, settings: Settings) -> Metrics:
    reply = await nc.request(settings.subjects.metrics, b"", timeout=5)
    return decode(reply.data, Metrics)


async def wait_for_metrics(
    nc: Client, settings: Settings, accept: Callable[[Metrics], bool], timeout: float = 10
) -> Metrics:
    """Ask for metrics whenever the coordinator's view may have changed, until `accept`."""
    seen = asyncio.Event()

    async def on_change(msg: object) -> None:
        seen.set()

    subs = [
        await nc.subscribe(settings.subjects.all_heartbeats, cb=on_change),
        await nc.subscribe(settings.subjects.outcome("*"), cb=on_change),
    ]
    try:
        async with asyncio.timeout(timeout):
            while True:
                current = await metrics(nc, settings)
                if accept(current):
                    return current
                seen.clear()
                await seen.wait()
    finally:
        for sub in subs:
            await sub.unsubscribe()


class FakeInstance:
    """An instance speaking the protocol by hand: it takes the tasks sent to it and never
    answers, and its heartbeats list whatever `holding` says (a lost task, a lost reply)."""

    def __init__(self, nc: Client, settings: Settings, *, name: str = "worker") -> None:
        self.nc = nc
        self.settings = settings
        self.name = name
        self.instance = f"{name}-fake{uuid.uuid4().hex[:6]}"
        self.holding: list[str] = []
        self.state: InstanceState = "ready"
        self.received: asyncio.Queue[Task] = asyncio.Queue()
        self._subscription: Subscription | None = None
        self._beating: asyncio.Task[None] | None = None

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(
            instance=self.instance,
            name=self.name,
            capabilities=["work"],
            in_flight=len(self.holding),
            max_concurrency=4,
            processed=0,
            failed=0,
            mean_latency_ms=0.0,
            interval_s=self.settings.heartbeat_interval,
            started_at=0.0,
            state=self.state,
            tasks=list(self.holding),
        )

    async def beat(self) -> None:
        subject = self.settings.subjects.heartbeat(self.instance)
        await self.nc.publish(subject, encode(self.heartbeat()))

    async def start(self) -> None:
        async def on_task(msg: Msg) -> None:
            await self.received.put(decode(msg.data, Task))  # and no reply, ever

        subject = self.settings.subjects.agent_task(self.instance)
        self._subscription = await self.nc.subscribe(subject, cb=on_task)
        await self.beat()

        async def beating() -> None:
            while True:
                await asyncio.sleep(self.settings.heartbeat_interval)  # a schedule
                await self.beat()

        self._beating = asyncio.create_task(beating())

    async def stop(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beating
        if self._subscription is not None:
            await self._subscription.unsubscribe()
