"""`GET /api/tail/stream`: the console's tail, on a real uvicorn server and nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.agent import Agent
from chorus.client import ChorusClient
from chorus.config import Settings
from chorus.gateway.tail import matches, overlaps
from chorus.messages import Event
from tests.helpers import StartHost
from tests.test_gateway import running_gateway

WAIT_S = 10


@pytest.fixture
async def http(nc: Client, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_gateway(nc, settings) as client:
        yield client


async def sse(response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    """(event, data) of each Server-Sent Event, data decoded from JSON."""
    event, data = "message", []
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            yield event, json.loads("\n".join(data))
            event, data = "message", []


class Tail:
    def __init__(self, events: AsyncIterator[tuple[str, Any]]) -> None:
        self.events = events

    async def next(self, kind: str = "message") -> Any:
        async def wanted() -> Any:
            async for event, data in self.events:
                if event == kind:
                    return data
            raise AssertionError("the stream ended")

        return await asyncio.wait_for(wanted(), WAIT_S)


@contextlib.asynccontextmanager
async def tail_of(http: httpx.AsyncClient, **params: str) -> AsyncIterator[Tail]:
    async with http.stream("GET", "/api/tail/stream", params=params) as response:
        assert response.status_code == 200, await response.aread()
        tail = Tail(sse(response))
        await tail.next("open")  # subscribed from here on
        yield tail


async def test_an_event_arrives_decoded_with_its_subject_type_and_summary(
    http: httpx.AsyncClient, client: ChorusClient, settings: Settings
) -> None:
    async with tail_of(http, kind="event") as tail:
        await client.publish_event(Event(topic="orders.new", data={"order": 7}, run_id="r1"))

        line = await tail.next()

    assert line["subject"] == settings.subjects.event("orders.new")
    assert (line["type"], line["run"]) == ("event", "r1")
    assert line["summary"] == '{"order": 7}'
    assert line["data"]["topic"] == "orders.new"
    assert line["time"].endswith("Z")


async def test_only_subjects_matching_the_pattern_are_sent(
    http: httpx.AsyncClient, client: ChorusClient, settings: Settings
) -> None:
    async with tail_of(http, subject=f"{settings.prefix}.event.wanted.>") as tail:
        await client.publish_event(Event(topic="other.thing", data="no"))
        await client.publish_event(Event(topic="wanted.thing", data="yes"))

        line = await tail.next()

    assert line["subject"] == settings.subjects.event("wanted.thing")


async def test_heartbeats_are_left_out_when_asked(
    http: httpx.AsyncClient,
    nc: Client,
    client: ChorusClient,
    settings: Settings,
    start_host: StartHost,
) -> None:
    await start_host(Agent(name="beater", capabilities=["beating"]))
    beat = asyncio.Event()

    async def on_beat(msg: Msg) -> None:
        beat.set()

    async with tail_of(http, heartbeats="false") as tail:
        await nc.subscribe(settings.subjects.all_heartbeats, cb=on_beat)
        await asyncio.wait_for(beat.wait(), WAIT_S)  # one was sent while the tail followed
        await client.publish_event(Event(topic="after.beat", data="x"))

        line = await tail.next()

    assert line["type"] == "event"


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"kind": "task"}, "`kind`"),
        ({"subject": "chorus.>.x"}, "`subject`"),
        ({"subject": "chorus..x"}, "`subject`"),
        ({"run": "x" * 300}, "`run`"),
    ],
)
async def test_a_filter_the_tail_cannot_take_is_a_400_naming_it(
    http: httpx.AsyncClient, params: dict[str, str], named: str
) -> None:
    response = await http.get("/api/tail/stream", params=params)

    assert response.status_code == 400
    assert named in response.json()["error"]["reason"]


def test_subject_patterns_meet_as_nats_matches_them() -> None:
    assert overlaps("c.event.>", "c.>") and overlaps("c.hb.*.*", "c.hb.a.*")
    assert not overlaps("c.hb.*.*", "c.event.>") and not overlaps("c.hb.*.*", "c.hb.a")
    assert matches("c.>", "c.a.b") and not matches("c.>", "c")
    assert matches("c.*.x", "c.y.x") and not matches("c.*", "c.y.x")
