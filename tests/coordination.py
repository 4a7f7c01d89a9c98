"""Helpers for coordinator tests: an in-process coordinator and waits on KV and metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nats.aio.client import Client
from nats.js.kv import KeyValue

from chorus.config import Settings
from chorus.messages import AgentRecord, Metrics, decode
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
