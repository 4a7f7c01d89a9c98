"""`GET /api/tail/stream`: the system's traffic, decoded like `chorus tail`, as Server-Sent Events.

The gateway subscribes (core NATS, nothing stored) to the subjects an observer may follow
(`Subjects.observable`: events, heartbeats, agent status, run progress and cancels, dead
letters, live output; never the request subjects, where a subscriber could take work) that
can meet the filters, and sends each message as one `message` event: `{time, subject,
type, run, agent, summary, tools, data}`. A task's streamed deltas are gathered into lines
(`Condenser`), as in the terminal. Filters: `subject` (a NATS pattern), `kind` (comma-separated
subject kinds: event, heartbeat, status, run_progress, run_cancel, dead_letter, stream_chunk),
`run`, `agent` (a name or an instance), `heartbeats=false`. A client slower than the traffic
loses messages, never the gateway's memory: past `QUEUE_SIZE` waiting messages the rest are
counted and said in a `dropped` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response

from chorus.config import Settings
from chorus.errors import InvalidMessage
from chorus.gateway.bodies import TailLine
from chorus.gateway.system import require_connected
from chorus.logs import iso_utc
from chorus.messages import StreamChunk, now
from chorus.messages.summary import (
    Condenser,
    agent_of,
    decoded,
    run_id_of,
    short,
    to_builtins,
    tools_line,
    type_of,
)
from chorus.subjects import Subjects

QUEUE_SIZE: Final = 1000  # messages waiting for one slow client before some are dropped
DATA_CHARS: Final = 20_000  # of a message's JSON sent with it (the summary is always whole)
PING_S: Final = 15.0
SEND_TIMEOUT_S: Final = 30.0
MAX_FILTER: Final = 256  # characters of any filter parameter
_FALSE: Final = frozenset({"false", "0", "no"})


def _tokens_valid(pattern: str) -> bool:
    tokens = pattern.split(".")
    if any(not t or any(c.isspace() for c in t) for t in tokens):
        return False
    return all(t != ">" for t in tokens[:-1])


def overlaps(a: str, b: str) -> bool:
    """Whether some subject matches both NATS patterns (`*` one token, `>` one or more)."""
    left, right = a.split("."), b.split(".")
    for x, y in zip(left, right, strict=False):
        if ">" in (x, y):
            return True
        if x != y and "*" not in (x, y):
            return False
    return len(left) == len(right)  # else the shorter one ends where the other goes on


def matches(pattern: str, subject: str) -> bool:
    """Whether `subject` (no wildcards) matches the NATS `pattern`."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def kinds_of(subjects: Subjects) -> frozenset[str]:
    """The kinds of subject the tail follows."""
    return frozenset(str(subjects.classify(p)) for p in subjects.observable)


def _param(request: Request, name: str) -> str:
    value = request.query_params.get(name, "").strip()
    if len(value) > MAX_FILTER:
        raise InvalidMessage(f"query parameter `{name}` is longer than {MAX_FILTER} characters")
    return value


@dataclass(frozen=True)
class TailFilter:
    """What one follower wants to see."""

    subject: str  # a NATS pattern
    kinds: frozenset[str] = frozenset()  # of Subjects.classify; empty: every kind
    run: str = ""
    agent: str = ""
    heartbeats: bool = True

    @classmethod
    def of(cls, request: Request, subjects: Subjects) -> TailFilter:
        subject = _param(request, "subject") or f"{subjects.prefix}.>"
        if not _tokens_valid(subject):
            raise InvalidMessage(
                f"query parameter `subject` must be a NATS subject pattern (tokens separated "
                f"by '.', `*` for one token, `>` last for the rest), not {subject!r}"
            )
        known = kinds_of(subjects)
        kinds = frozenset(k.strip() for k in _param(request, "kind").split(",") if k.strip())
        if kinds - known:
            raise InvalidMessage(
                f"query parameter `kind` names {', '.join(sorted(kinds - known))}; the kinds "
                f"the tail follows are {', '.join(sorted(known))}"
            )
        heartbeats = request.query_params.get("heartbeats", "true").lower() not in _FALSE
        return cls(
            subject,
            kinds,
            run=_param(request, "run"),
            agent=_param(request, "agent"),
            heartbeats=heartbeats,
        )

    def follows(self, subjects: Subjects, pattern: str) -> bool:
        """Whether messages on the observable `pattern` can pass this filter."""
        if self.kinds and subjects.classify(pattern) not in self.kinds:
            return False
        if not self.heartbeats and subjects.classify(pattern) == "heartbeat":
            return False
        return overlaps(pattern, self.subject)

    def wants(self, subjects: Subjects, msg: Msg, message: Any) -> bool:
        if not matches(self.subject, msg.subject):
            return False
        if self.run and run_id_of(message, msg.headers) != self.run:
            return False
        if self.agent:
            agent = agent_of(message)
            named = self.agent in (agent, *msg.subject.split("."))
            if not named and not agent.startswith(f"{self.agent}-"):
                return False
        return True


def _data(message: Any) -> Any:
    value = to_builtins(message)
    text = json.dumps(value, default=str)
    return value if len(text) <= DATA_CHARS else text[: DATA_CHARS - 1] + "…"


class Follower:
    """One client's subscriptions and the lines waiting for it."""

    def __init__(self, nc: Client, subjects: Subjects, wanted: TailFilter) -> None:
        self.nc = nc
        self.subjects = subjects
        self.wanted = wanted
        self.lines: asyncio.Queue[TailLine] = asyncio.Queue(QUEUE_SIZE)
        self.dropped = 0
        self.condenser = Condenser()
        self.subscriptions: list[Any] = []
        self.following: list[str] = []  # the patterns subscribed to

    async def open(self) -> None:
        for pattern in self.subjects.observable:
            if self.wanted.follows(self.subjects, pattern):
                self.subscriptions.append(await self.nc.subscribe(pattern, cb=self.received))
                self.following.append(pattern)
        await self.nc.flush(timeout=5)  # subscribed before the stream says it is open

    async def close(self) -> None:
        for subscription in self.subscriptions:
            with contextlib.suppress(Exception):  # the connection may be closing already
                await subscription.unsubscribe()

    async def received(self, msg: Msg) -> None:
        message = decoded(self.subjects, msg.subject, msg.data)
        if not self.wanted.wants(self.subjects, msg, message):
            return
        summaries = (
            self.condenser.lines(msg.subject, message)
            if isinstance(message, StreamChunk)
            else [short(message)]
        )
        for summary in summaries:
            line = TailLine(
                time=iso_utc(now()),
                subject=msg.subject,
                type=type_of(message),
                run=run_id_of(message, msg.headers),
                agent=agent_of(message),
                summary=summary,
                tools=tools_line(message),
                data=_data(message),
            )
            try:
                self.lines.put_nowait(line)
            except asyncio.QueueFull:
                self.dropped += 1


class TailRoute:
    """The route, over the gateway's connection."""

    def __init__(self, nc: Client, settings: Settings, *, stopping: asyncio.Event) -> None:
        self.nc = nc
        self.subjects = settings.subjects
        self.stopping = stopping

    async def stream(self, request: Request) -> Response:
        """`GET /api/tail/stream` (see the module doc)."""
        wanted = TailFilter.of(request, self.subjects)
        require_connected(self.nc)
        follower = Follower(self.nc, self.subjects, wanted)
        try:
            await follower.open()
        except BaseException:
            await follower.close()
            raise
        return EventSourceResponse(self._events(follower), ping=PING_S, send_timeout=SEND_TIMEOUT_S)

    async def _events(self, follower: Follower) -> AsyncIterator[ServerSentEvent]:
        stopping = asyncio.create_task(self.stopping.wait())
        upcoming: asyncio.Task[TailLine] | None = None
        try:
            opened = {"subject": follower.wanted.subject, "following": follower.following}
            yield ServerSentEvent(json.dumps(opened), event="open")
            while True:
                if follower.dropped:
                    said, follower.dropped = follower.dropped, 0
                    yield ServerSentEvent(json.dumps({"dropped": said}), event="dropped")
                if upcoming is None:
                    upcoming = asyncio.create_task(follower.lines.get())
                await asyncio.wait({upcoming, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not upcoming.done():
                    return  # the gateway is stopping
                line, upcoming = upcoming.result(), None
                yield ServerSentEvent(msgspec.json.encode(line).decode(), event="message")
        finally:
            for task in (upcoming, stopping):
                if task is not None:
                    task.cancel()
            await follower.close()
