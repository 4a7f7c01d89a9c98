"""`chorus tail`'s stored side: which JetStream streams hold what a pattern selects, and a
replay of them in stored-time order before the live messages.

A pattern may span several streams (`chorus.>` covers the events, the live output of tasks
and the dead letters) and subjects no stream keeps (heartbeats, run progress): each stream
whose subjects overlap the pattern is read from its start by an ordered consumer filtered on
the overlap, and the rest is a core subscription that skips what those consumers deliver.
Work queues are never read: a consumer there would take their messages.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, RetentionPolicy
from nats.js.errors import APIError

from chorus.nats.jetstream import every_stream, ordered_watch

CATCH_UP_S = 30.0  # how long the replay waits for every stream's stored messages

Show = Callable[[Msg, float], None]


def overlap(a: str, b: str) -> str | None:
    """The subjects two NATS subject patterns both match, as one pattern; None when none.

    `chorus.>` and `chorus.event.>` overlap in `chorus.event.>`; `chorus.*.x` and
    `chorus.event.>` in `chorus.event.x`; a literal subject overlaps a pattern in itself
    when the pattern matches it."""
    left, right = a.split("."), b.split(".")
    common: list[str] = []
    for i in range(max(len(left), len(right))):
        x = left[i] if i < len(left) else None
        y = right[i] if i < len(right) else None
        if x == ">" and y is not None:
            return ".".join(common + right[i:])
        if y == ">" and x is not None:
            return ".".join(common + left[i:])
        if x is None or y is None:
            return None
        if x == "*":
            common.append(y)
        elif y == "*" or x == y:
            common.append(x)
        else:
            return None
    return ".".join(common)


@dataclass(frozen=True)
class Source:
    """One stream's share of a pattern: read with a consumer filtered on `subject`."""

    stream: str
    subject: str


async def sources(js: JetStreamContext, pattern: str) -> list[Source]:
    """The streams (not work queues) whose subjects overlap `pattern`, with the overlap."""
    found: list[Source] = []
    for info in await every_stream(js):
        config = info.config
        if config.name is None or config.retention not in (None, RetentionPolicy.LIMITS):
            continue
        for subject in config.subjects or []:
            shared = overlap(pattern, subject)
            if shared is not None:
                found.append(Source(config.name, shared))
    return found


def stored_at(msg: Msg) -> float:
    """When the stream stored the message (its JetStream metadata timestamp)."""
    return msg.metadata.timestamp.timestamp()


@dataclass
class Replay:
    """Stored messages of some sources, then their live ones, handed to `show` with their
    stored time: the backlog of every source sorted by time first, then as they come."""

    show: Show
    replaying: bool = True
    backlog: list[tuple[float, int, Msg]] = field(default_factory=list)
    _caught_up: dict[Source, asyncio.Event] = field(default_factory=dict)
    _subscriptions: list[Any] = field(default_factory=list)

    async def add(self, nc: Client, source: Source, *, history: bool) -> None:
        """Follow `source`: from its first stored message with `history`, else from now."""
        caught_up = self._caught_up.setdefault(source, asyncio.Event())
        if not history:
            caught_up.set()

        async def on_msg(msg: Msg) -> None:
            at = stored_at(msg)
            if self.replaying:
                self.backlog.append((at, len(self.backlog), msg))
                if (msg.metadata.num_pending or 0) == 0:
                    caught_up.set()
            else:
                self.show(msg, at)

        js = nc.jetstream()
        subscription = await ordered_watch(
            js,
            source.subject,
            stream=source.stream,
            cb=on_msg,
            deliver_policy=DeliverPolicy.ALL if history else DeliverPolicy.NEW,
        )
        self._subscriptions.append(subscription)
        if history and not caught_up.is_set():
            with contextlib.suppress(APIError):
                if (await subscription.consumer_info()).num_pending == 0:
                    caught_up.set()  # nothing stored, or all of it delivered already

    async def play(self, within: float = CATCH_UP_S) -> bool:
        """Wait until every source's stored messages are in, show them oldest first, then
        switch to showing messages as they come. False when some did not arrive in time
        (what did is shown)."""
        waits = [event.wait() for event in self._caught_up.values()]
        complete = True
        try:
            await asyncio.wait_for(asyncio.gather(*waits), within)
        except TimeoutError:
            complete = False
        backlog, self.backlog = sorted(self.backlog, key=lambda item: item[:2]), []
        self.replaying = False  # no await from here: nothing arrives between the two
        for at, _, msg in backlog:
            self.show(msg, at)
        return complete
