"""The live output of tasks: what agents publish while they work, and who reads it back.

Real agents (in process) on a real nats-server, the chunks read with `ChorusClient.stream`
(an ordered JetStream consumer), retries through the durable queue and a coordinator, the
gateway's Server-Sent Events across a gateway restart, and a nats-server restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import msgspec
import pytest
from nats.aio.client import Client

from chorus.agent import Agent, Context
from chorus.agent.host import AgentHost
from chorus.client import ChorusClient, TaskQueue
from chorus.client.runs import RunClient
from chorus.client.streams import ChunkReader, LiveText
from chorus.config import Settings
from chorus.errors import TaskFailed
from chorus.gateway import create_app
from chorus.gateway.options import GatewayOptions
from chorus.llm.offline import OfflineModel
from chorus.messages import RunRequest, StreamChunk, Task, decode
from chorus.nats.connection import connect
from chorus.nats.server import NatsServer
from chorus.specs.workflow import Pipeline, Step
from chorus.tools import tool
from tests.helpers import StartCoordinator, StartHost, StartOrchestrator
from tests.test_gateway import OPEN_ON_LOOPBACK, running
from tests.test_gateway_security import Keys, bearer

WAIT_S = 10.0
LONG_INPUT = "what makes a message system a good fit for teams of agents that talk a lot?"


def writer() -> Agent:
    return Agent(name="writer", instructions="Write it.", capabilities=["writing"])


def new_run() -> str:
    return f"run-{uuid.uuid4().hex[:8]}"


async def until_final(reader: ChunkReader, *, attempt: int = 1) -> list[StreamChunk]:
    """Chunks until the final of `attempt`, waiting at most WAIT_S for each."""
    chunks: list[StreamChunk] = []
    while not chunks or not (chunks[-1].kind == "final" and chunks[-1].attempt == attempt):
        chunks.append(await reader.next(WAIT_S))
    return chunks


def deltas(chunks: list[StreamChunk]) -> str:
    return "".join(c.text for c in chunks if c.kind == "delta")


# an agent publishes what happens while it works


async def test_a_tasks_chunks_arrive_in_order_and_its_deltas_add_up_to_the_answer(
    start_host: StartHost, client: ChorusClient
) -> None:
    host = await start_host(writer(), model=OfflineModel(chunk_delay=0.004))
    run_id = new_run()
    task = Task(input=LONG_INPUT, run_id=run_id)

    async with client.stream(run_id, task.task_id) as reader:
        result = await client.run_task(task, instance=host.instance)
        chunks = await until_final(reader)

    assert [c.seq for c in chunks] == list(range(1, len(chunks) + 1))
    assert [c.stream_seq for c in chunks] == sorted({c.stream_seq for c in chunks})
    assert {c.kind for c in chunks[:-1]} == {"delta"}
    assert len(chunks) > 3  # the words came in several batches, not in one
    assert deltas(chunks) == result.output == chunks[-1].text
    assert {(c.run_id, c.task_id, c.attempt, c.agent) for c in chunks} == {
        (run_id, task.task_id, 1, "writer")
    }


@tool
async def define(term: str) -> str:
    """Look a term up in the glossary."""
    return f"{term}: a subject-based messaging system"


async def test_tool_calls_show_as_they_start_and_finish_before_the_answer(
    start_host: StartHost, client: ChorusClient
) -> None:
    host = await start_host(writer().use(define))
    run_id = new_run()
    task = Task(input="NATS", run_id=run_id)

    async with client.stream(run_id) as reader:
        result = await client.run_task(task, instance=host.instance)
        chunks = await until_final(reader)

    started, finished = chunks[0], chunks[1]
    assert (started.kind, started.tool, json.loads(started.text)) == (
        "tool_started",
        "define",
        {"term": "NATS"},
    )
    assert (finished.kind, finished.tool, finished.text) == (
        "tool_finished",
        "define",
        "NATS: a subject-based messaging system",
    )
    assert deltas(chunks) == result.output
    assert "NATS: a subject-based messaging system" in result.output


async def test_a_handler_may_stream_text_of_its_own(
    start_host: StartHost, client: ChorusClient
) -> None:
    agent = writer()

    @agent.on_task
    async def handle(task: Task, ctx: Context) -> str:
        assert ctx.stream is not None
        for word in ("one ", "two ", "three"):
            ctx.stream.delta(word)
        return "one two three"

    host = await start_host(agent)
    run_id = new_run()

    async with client.stream(run_id) as reader:
        await client.run_task(Task(input="count", run_id=run_id), instance=host.instance)
        chunks = await until_final(reader)

    assert deltas(chunks) == "one two three"
    assert chunks[-1].text == "one two three"


async def test_a_task_of_no_run_streams_under_the_no_run_token(
    start_host: StartHost, client: ChorusClient
) -> None:
    host = await start_host(writer())
    task = Task(input="q")

    async with client.stream("", task.task_id) as reader:
        result = await client.run_task(task, instance=host.instance)
        chunks = await until_final(reader)

    assert chunks[-1].run_id == ""
    assert deltas(chunks) == result.output


# retries: the old attempt is superseded


def flaky_writer(first_words: str) -> Agent:
    """Streams some words on attempt 1 and fails; answers with the loop on attempt 2."""
    agent = writer()

    @agent.on_task
    async def handle(task: Task, ctx: Context) -> str:
        if ctx.attempt == 1:
            assert ctx.stream is not None
            ctx.stream.delta(first_words)
            raise RuntimeError("the model went away")
        return (await ctx.run_loop(task.input)).text

    return agent


async def test_a_retried_attempt_first_marks_the_failed_one_superseded(
    start_host: StartHost,
    start_coordinator: StartCoordinator,
    nc: Client,
    settings: Settings,
    client: ChorusClient,
) -> None:
    await start_coordinator()
    await start_host(flaky_writer("half an ans"))
    run_id = new_run()
    task = Task(input="q", run_id=run_id)

    async with client.stream(run_id) as reader:
        result = await TaskQueue(nc, settings.subjects).run(task, capability="writing", timeout=20)
        chunks = await until_final(reader, attempt=2)

    first = [c for c in chunks if c.attempt == 1]
    assert [(c.kind, c.seq, c.text) for c in first] == [
        ("delta", 1, "half an ans"),
        ("superseded", 0, "attempt 2 replaces it"),
    ]
    marker = chunks.index(first[-1])
    assert all(c.attempt == 2 for c in chunks[marker + 1 :])  # the marker comes first
    live = LiveText()
    for chunk in chunks:
        live.add(chunk)
    shown = live.current(task.task_id)
    assert shown is not None and shown.done
    assert shown.text == result.output  # never the two answers glued together
    assert live.attempts[(task.task_id, 1)].text == ""


async def test_a_failed_task_keeps_what_it_streamed_readable(
    start_host: StartHost, client: ChorusClient
) -> None:
    host = await start_host(flaky_writer("so far"))
    run_id = new_run()

    async with client.stream(run_id) as reader:
        with pytest.raises(TaskFailed):
            await client.run_task(Task(input="q", run_id=run_id), instance=host.instance)
        chunk = await reader.next(WAIT_S)
        assert await reader.caught_up()  # no final: the attempt failed

    assert (chunk.kind, chunk.text, chunk.attempt) == ("delta", "so far", 1)


# readers come back and resume


async def test_a_reader_that_comes_back_from_its_last_seq_gets_the_rest_once(
    start_host: StartHost, client: ChorusClient
) -> None:
    host = await start_host(writer(), model=OfflineModel(chunk_delay=0.004))
    run_id = new_run()

    async with client.stream(run_id) as first:
        task = Task(input=LONG_INPUT, run_id=run_id)
        result = await client.run_task(task, instance=host.instance)
        seen = [await first.next(WAIT_S) for _ in range(2)]
    async with client.stream(run_id, from_seq=seen[-1].stream_seq + 1) as second:
        seen += await until_final(second)
        assert await second.caught_up()

    assert [c.seq for c in seen] == list(range(1, len(seen) + 1))  # no gap, no repeat
    assert deltas(seen) == result.output


class Paced:
    """A handler that streams its first words, waits to be let go, then streams the rest."""

    def __init__(self, before: int, after: int) -> None:
        self.words = [f"w{n} " for n in range(before + after)]
        self.before = before
        self.halfway = asyncio.Event()
        self.go_on = asyncio.Event()

    @property
    def first_part(self) -> str:
        return "".join(self.words[: self.before])

    @property
    def answer(self) -> str:
        return "".join(self.words)

    def agent(self) -> Agent:
        agent = writer()

        @agent.on_task
        async def handle(task: Task, ctx: Context) -> str:
            assert ctx.stream is not None
            for word in self.words[: self.before]:
                ctx.stream.delta(word)
            self.halfway.set()
            await self.go_on.wait()
            for word in self.words[self.before :]:
                ctx.stream.delta(word)
            return self.answer

        return agent


async def test_no_chunk_is_lost_across_a_nats_server_restart(
    own_nats_server: NatsServer, tmp_path: Path
) -> None:
    settings = Settings(
        nats_url=own_nats_server.url, prefix=f"r{uuid.uuid4().hex[:6]}", heartbeat_interval=0.5
    )
    paced = Paced(before=5, after=20)
    host = AgentHost(paced.agent(), settings, model=OfflineModel())
    await host.start()
    reconnected = asyncio.Event()
    nc = await connect(settings, "test", service=True, reconnected=reconnected)
    client = ChorusClient(nc, settings.subjects, timeout=30)
    run_id = new_run()
    task = Task(input="q", run_id=run_id)
    try:
        reply = asyncio.create_task(client.run_task(task, instance=host.instance))
        await asyncio.wait_for(paced.halfway.wait(), WAIT_S)
        before: list[StreamChunk] = []
        async with client.stream(run_id) as reader:
            while deltas(before) != paced.first_part:
                before.append(await reader.next(WAIT_S))

        own_nats_server.stop()
        own_nats_server.start()
        await asyncio.wait_for(reconnected.wait(), 20)
        paced.go_on.set()  # the agent goes on publishing, as its connection comes back

        async with client.stream(run_id, from_seq=before[-1].stream_seq + 1) as resumed:
            after = await until_final(resumed)
        result = await asyncio.wait_for(reply, 30)
    finally:
        await host.stop(timeout=5)
        await nc.close()

    seen = before + after
    assert [c.seq for c in seen] == list(range(1, len(seen) + 1))  # no gap, none twice
    assert deltas(seen) == seen[-1].text == result.output == paced.answer


# the gateway serves a run's chunks as Server-Sent Events


class SseEvent(msgspec.Struct):
    id: str = ""
    event: str = ""
    data: str = ""


async def sse_events(response: httpx.Response) -> AsyncIterator[SseEvent]:
    """The events of a text/event-stream response, as a browser's EventSource reads them."""
    event = SseEvent()
    async for line in response.aiter_lines():
        if not line:
            if event.data or event.event:
                yield event
            event = SseEvent()
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                event.data = f"{event.data}\n{value}" if event.data else value
            elif name in ("id", "event"):
                setattr(event, name, value)


@contextlib.asynccontextmanager
async def gateway(nc: Client, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    stop = asyncio.Event()
    async with running(create_app(nc, settings, OPEN_ON_LOOPBACK, stopping=stop), stop) as http:
        yield http


async def read_sse(
    http: httpx.AsyncClient,
    run_id: str,
    enough: Callable[[list[SseEvent]], bool],
    last_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> list[SseEvent]:
    """The run's stream (after `last_id`) until `enough` of it was read, or it ended."""
    headers = {**(headers or {}), **({"Last-Event-ID": last_id} if last_id else {})}
    got: list[SseEvent] = []
    async with (
        asyncio.timeout(WAIT_S),
        http.stream("GET", f"/api/runs/{run_id}/stream", headers=headers) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for event in sse_events(response):
            got.append(event)
            if enough(got):
                break
    return got


def chunks_of(events: list[SseEvent]) -> list[StreamChunk]:
    return [decode(e.data.encode(), StreamChunk) for e in events if e.event != "end"]


async def test_sse_resumes_after_last_event_id_across_a_gateway_restart(
    start_host: StartHost, nc: Client, settings: Settings, client: ChorusClient
) -> None:
    paced = Paced(before=4, after=40)
    host = await start_host(paced.agent())
    run_id = new_run()
    everything = await client.stream(run_id).open()  # what is stored, to compare with
    reply = asyncio.create_task(
        client.run_task(Task(input="q", run_id=run_id), instance=host.instance)
    )
    await asyncio.wait_for(paced.halfway.wait(), WAIT_S)

    async with gateway(nc, settings) as http:
        first = await read_sse(http, run_id, lambda got: len(got) == 1)
    paced.go_on.set()
    result = await asyncio.wait_for(reply, WAIT_S)
    async with gateway(nc, settings) as http:  # another gateway, on another port
        second = await read_sse(
            http, run_id, lambda got: got[-1].event == "final", last_id=first[-1].id
        )

    events = first + second
    chunks = chunks_of(events)
    assert [int(e.id) for e in events] == [c.stream_seq for c in chunks]
    assert [e.event for e in events] == [c.kind for c in chunks]
    async with everything:
        stored = await until_final(everything)
    assert [c.stream_seq for c in stored] == [c.stream_seq for c in chunks]  # none missed
    assert [c.seq for c in chunks] == list(range(1, len(chunks) + 1))  # none twice
    assert deltas(chunks) == chunks[-1].text == result.output


async def test_sse_ends_with_an_end_event_once_the_run_has_finished(
    start_host: StartHost,
    start_orchestrator: StartOrchestrator,
    nc: Client,
    settings: Settings,
) -> None:
    await start_host(writer(), model=OfflineModel(chunk_delay=0.002))
    await start_orchestrator(durable_tasks=False)
    runs = RunClient(nc, settings.subjects)
    workflow = Pipeline(
        name="two", steps=[Step(name="draft", agent="writer"), Step(name="edit", agent="writer")]
    )
    pending = await runs.submit(RunRequest(workflow=workflow, input=LONG_INPUT))
    record = await runs.wait(pending.run_id, timeout=WAIT_S)

    async with gateway(nc, settings) as http:
        events = await read_sse(http, pending.run_id, lambda got: False)  # until it ends

    assert events[-1].event == "end"
    assert json.loads(events[-1].data) == {"run_id": pending.run_id, "status": "completed"}
    chunks = chunks_of(events)
    finals = {c.task_id: c.text for c in chunks if c.kind == "final"}
    assert finals == {step.name: step.output for step in record.steps}


async def test_the_stream_needs_a_key_with_the_read_scope(
    start_host: StartHost, nc: Client, settings: Settings, client: ChorusClient, tmp_path: Path
) -> None:
    keys = Keys(tmp_path)
    options = GatewayOptions.build("127.0.0.1", keys_file=str(keys.path))
    host = await start_host(writer())
    run_id = new_run()
    async with client.stream(run_id) as reader:
        await client.run_task(Task(input="q", run_id=run_id), instance=host.instance)
        await until_final(reader)
    stop = asyncio.Event()
    async with running(create_app(nc, settings, options, stopping=stop), stop) as http:
        refused = await http.get(f"/api/runs/{run_id}/stream", headers=bearer(keys.execute))
        events = await read_sse(
            http, run_id, lambda got: got[-1].event == "final", headers=bearer(keys.read)
        )

    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "forbidden"
    assert [e.event for e in events][-1] == "final"
