"""`NatsEventBus`: events of a run through the JetStream events stream.

Following a run replays the stream from the run's start with an ordered (ephemeral, in-order)
consumer and keeps the events whose `Chorus-Run-Id` header is the run's. An orchestrator that
resumes a run therefore also sees the events published while no one was watching.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import AsyncIterator

from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext

from chorus.client import ChorusClient
from chorus.errors import InvalidMessage
from chorus.messages import Event, decode, headers
from chorus.nats.jetstream import ordered_watch
from chorus.nats.streams import ensure_events_stream

log = logging.getLogger("chorus.workflows")


def topic_matches(pattern: str, topic: str) -> bool:
    """NATS subject matching for topics: `*` is one token, a final `>` one or more."""
    want, have = pattern.split("."), topic.split(".")
    for index, token in enumerate(want):
        if token == ">":
            return len(have) > index
        if index >= len(have) or (token != "*" and token != have[index]):
            return False
    return len(want) == len(have)


class RunEvents:
    """One run's events, in stream order."""

    def __init__(self, subscription: JetStreamContext.PushSubscription, run_id: str) -> None:
        self._sub = subscription
        self.run_id = run_id

    async def next(self, timeout: float) -> Event:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"no event of run {self.run_id} within {timeout}s")
            try:
                msg = await self._sub.next_msg(timeout=left)
            except NatsTimeout:
                continue
            if headers.read(msg.headers).run_id != self.run_id:
                continue
            try:
                event = decode(msg.data, Event)
            except InvalidMessage as exc:
                log.warning("skipping a malformed event", extra={"error": str(exc)})
                continue
            if event.run_id == self.run_id:
                return event


class NatsEventBus:
    def __init__(self, client: ChorusClient) -> None:
        self.client = client

    async def publish(self, event: Event) -> None:
        await self.client.publish_event(event)

    @contextlib.asynccontextmanager
    async def watch(self, run_id: str, since: float) -> AsyncIterator[RunEvents]:
        subjects = self.client.subjects
        js = self.client.nc.jetstream()
        await ensure_events_stream(js, subjects)
        start = datetime.datetime.fromtimestamp(since, datetime.UTC)
        subscription = await ordered_watch(
            js, subjects.all_events, stream=subjects.events_stream, start_time=start
        )
        try:
            yield RunEvents(subscription, run_id)
        finally:
            await subscription.unsubscribe()
