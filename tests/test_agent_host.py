"""The agent host in-process, on a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import json

import msgspec
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from chorus.agent import Agent, Context
from chorus.client import ChorusClient
from chorus.config import Settings
from chorus.errors import ChorusError, NoHelper, TaskFailed
from chorus.llm.offline import OfflineModel
from chorus.messages import ErrorReply, Heartbeat, Result, Task, decode, encode
from tests.helpers import StartHost


def researcher() -> Agent:
    return Agent(name="researcher", instructions="Research it.", capabilities=["research"])


async def test_direct_task_is_answered_by_that_instance(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    host = await start_host(researcher())
    client = ChorusClient(nc, settings.subjects)

    result = await client.run_task(Task(input="what is NATS?"), instance=host.instance)

    assert result.instance == host.instance
    assert result.agent == "researcher"
    assert result.output == "[offline] Research it.: what is NATS?"
    assert result.usage.total_tokens > 0


async def test_task_by_capability_reaches_an_instance_with_it(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    await start_host(Agent(name="writer", capabilities=["writing"]))
    host = await start_host(researcher())

    result = await ChorusClient(nc, settings.subjects).run_task(
        Task(input="q"), capability="research"
    )

    assert result.instance == host.instance


async def test_structured_output_is_returned_as_data(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    host = await start_host(researcher())
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}

    result = await ChorusClient(nc, settings.subjects).run_task(
        Task(input="q", json_schema=schema), instance=host.instance
    )

    assert result.data == {"answer": "offline"}
    assert json.loads(result.output) == result.data


async def _raw_request(nc: Client, subject: str, payload: bytes) -> Msg:
    return await nc.request(subject, payload, timeout=5)


async def test_malformed_json_gets_an_error_reply_and_the_agent_keeps_serving(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    host = await start_host(researcher())
    subject = settings.subjects.agent_task(host.instance)

    reply = await _raw_request(nc, subject, b"{not json")
    error = decode(reply.data, ErrorReply)
    assert error.code == "invalid_message"
    assert "invalid Task" in error.reason
    # The micro convention: a number in the header (HTTP-like), the text code in the body.
    assert reply.headers and reply.headers["Nats-Service-Error-Code"] == "400"

    ok = await _raw_request(nc, subject, encode(Task(input="still there?")))
    assert decode(ok.data, Result).output.endswith("still there?")


async def test_wrong_field_type_is_named_in_the_error(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    host = await start_host(researcher())

    reply = await _raw_request(nc, settings.subjects.agent_task(host.instance), b'{"input": 42}')

    error = decode(reply.data, ErrorReply)
    assert error.code == "invalid_message"
    assert "$.input" in error.reason
    assert "Expected `str`, got `int`" in error.reason


async def test_missing_required_field_is_named(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    host = await start_host(researcher())

    reply = await _raw_request(nc, settings.subjects.agent_task(host.instance), b"{}")

    assert "missing required field `input`" in decode(reply.data, ErrorReply).reason


async def test_unknown_fields_are_tolerated(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    host = await start_host(researcher())
    payload = b'{"input": "hi", "priority": "high", "from_a_newer_version": {"x": 1}}'

    reply = await _raw_request(nc, settings.subjects.agent_task(host.instance), payload)

    assert decode(reply.data, Result).output.endswith("hi")


async def test_a_message_of_another_type_is_rejected_by_its_tag(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    host = await start_host(researcher())
    payload = b'{"type": "event", "topic": "x", "input": "hi"}'

    reply = await _raw_request(nc, settings.subjects.agent_task(host.instance), payload)

    error = decode(reply.data, ErrorReply)
    assert error.code == "invalid_message"
    assert "$.type" in error.reason


async def test_oversized_message_is_refused_with_payload_too_large(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    small = msgspec.structs.replace(settings, max_message_bytes=1000)
    host = await start_host(researcher(), settings=small)
    payload = encode(Task(input="x" * 5000))

    reply = await _raw_request(nc, settings.subjects.agent_task(host.instance), payload)

    error = decode(reply.data, ErrorReply)
    assert error.code == "payload_too_large"
    assert "over the limit of 1000" in error.reason


async def test_handler_exception_becomes_task_failed_with_its_message(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    agent = Agent(name="broken", capabilities=["broken"])

    @agent.on_task
    async def fail(task: Task, ctx: Context) -> str:
        raise RuntimeError("the database is on fire")

    await start_host(agent)

    with pytest.raises(TaskFailed) as caught:
        await ChorusClient(nc, settings.subjects).run_task(Task(input="x"), capability="broken")

    assert "RuntimeError: the database is on fire" in caught.value.reason


async def test_help_request_is_answered_by_a_capable_peer(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    await start_host(researcher())
    asker = Agent(name="analyst", capabilities=["analysis"])

    @asker.on_task
    async def analyse(task: Task, ctx: Context) -> str:
        help_reply = await ctx.ask_help("research", f"facts about {task.input}", timeout=5)
        return f"analysis using [{help_reply.answer}] from {help_reply.helper}"

    await start_host(asker)

    result = await ChorusClient(nc, settings.subjects).run_task(
        Task(input="NATS"), capability="analysis"
    )

    assert result.output == (
        "analysis using [[offline] Research it.: facts about NATS] from researcher"
    )
    assert result.usage.total_tokens > 0  # the helper's tokens count toward the task


async def test_help_request_with_no_capable_peer_is_a_clear_error(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    asker = Agent(name="analyst", capabilities=["analysis"])

    @asker.on_task
    async def analyse(task: Task, ctx: Context) -> str:
        return (await ctx.ask_help("astrology", task.input, timeout=2)).answer

    await start_host(asker)

    with pytest.raises(NoHelper) as caught:
        await ChorusClient(nc, settings.subjects).run_task(Task(input="x"), capability="analysis")

    assert "no agent with capability 'astrology'" in caught.value.reason


async def test_heartbeats_carry_correct_counters(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    agent = Agent(name="counter", capabilities=["count"], max_concurrency=3)

    @agent.on_task
    async def count(task: Task, ctx: Context) -> str:
        if task.input == "fail":
            raise ValueError("asked to fail")
        return "ok"

    host = await start_host(agent)
    client = ChorusClient(nc, settings.subjects)
    for text in ("a", "b", "c", "fail"):
        with contextlib.suppress(ChorusError):
            await client.run_task(Task(input=text), instance=host.instance)

    beats: asyncio.Queue[Heartbeat] = asyncio.Queue()

    async def on_beat(msg: Msg) -> None:
        await beats.put(decode(msg.data, Heartbeat))

    await nc.subscribe(settings.subjects.heartbeat(host.instance), cb=on_beat)
    beat = await asyncio.wait_for(beats.get(), 5)

    assert (beat.processed, beat.failed, beat.in_flight) == (3, 1, 0)
    assert beat.max_concurrency == 3
    assert beat.capabilities == ["count"]
    assert beat.name == "counter" and beat.instance == host.instance
    assert beat.mean_latency_ms >= 0 and beat.state == "ready"
    assert beat.usage.total_tokens == 0  # this handler never called its model


async def test_heartbeats_count_the_tokens_an_instance_used(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    host = await start_host(researcher())
    client = ChorusClient(nc, settings.subjects)
    results = [
        await client.run_task(Task(input=f"q {i}"), instance=host.instance) for i in range(3)
    ]
    beats: asyncio.Queue[Heartbeat] = asyncio.Queue()

    async def on_beat(msg: Msg) -> None:
        await beats.put(decode(msg.data, Heartbeat))

    await nc.subscribe(settings.subjects.heartbeat(host.instance), cb=on_beat)
    beat = await asyncio.wait_for(beats.get(), 5)

    assert beat.usage.total_tokens == sum(r.usage.total_tokens for r in results) > 0


async def test_srv_ping_discovers_every_instance(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    first = await start_host(researcher())
    second = await start_host(Agent(name="writer", capabilities=["writing"]))

    found = await ChorusClient(nc, settings.subjects).discover(timeout=0.5)

    instances = {entry["metadata"]["instance"]: entry["metadata"] for entry in found}
    assert {first.instance, second.instance} <= set(instances)
    assert instances[first.instance]["capabilities"] == "research"
    assert instances[second.instance]["agent"] == "writer"


async def test_max_concurrency_is_never_exceeded_under_a_burst(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    running = 0
    peak = 0
    agent = Agent(name="limited", capabilities=["limited"], max_concurrency=3)

    @agent.on_task
    async def work(task: Task, ctx: Context) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await ctx.ask_model(task.input)
        finally:
            running -= 1
        return "ok"

    host = await start_host(agent, model=OfflineModel(delay=0.02))
    client = ChorusClient(nc, settings.subjects)

    results = await asyncio.gather(
        *(client.run_task(Task(input=str(i)), capability="limited") for i in range(30))
    )

    assert len(results) == 30
    assert peak == 3  # measured inside the handler: the limit was reached and never passed
    assert host.stats.peak_in_flight == 3


async def test_handlers_share_state_through_the_context(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    agent = Agent(name="tally", capabilities=["tally"], max_concurrency=4)

    @agent.on_task
    async def tally(task: Task, ctx: Context) -> str:
        state = await ctx.state()
        total = await state.update("tally.total", lambda n: n + int(task.input), default=0)
        return str(total.value)

    await start_host(agent)
    await start_host(agent)
    client = ChorusClient(nc, settings.subjects)

    await asyncio.gather(*(client.run_task(Task(input="1"), capability="tally") for _ in range(20)))

    from chorus.state import SharedState

    reader = await SharedState(nc, settings.subjects, "test").open()
    value = await reader.get("tally.total")
    assert value is not None and value.value == 20
    await reader.close()
