"""Other agents as tools: direct and durable calls, descriptions, the depth limit, a peer
killed mid-call. The tools are called as the agent loop would call them."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client

from chorus.agent import Agent, Context
from chorus.client import ChorusClient, TaskQueue
from chorus.config import Settings
from chorus.coordinator.service import Coordinator
from chorus.errors import ConfigError, ToolFailed
from chorus.messages import Task
from chorus.specs.agent import load_spec
from chorus.tools.base import ToolCallContext
from chorus.tools.peers import DEFAULT_INPUT_SCHEMA, PeerTools, PeerToolSpec, peer_tool
from tests.helpers import SpawnAgent, StartHost, first_busy_instance, write_spec

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}


def researcher(**spec: object) -> Agent:
    agent = Agent(name="researcher", capabilities=["research"], **spec)

    @agent.on_task
    async def answer(task: Task, ctx: Context) -> str:
        return f"found: {task.input}"

    return agent


def caller_ctx(
    client: ChorusClient, queue: TaskQueue | None = None, **kw: object
) -> ToolCallContext:
    fields: dict[str, object] = {"task_id": "job1", "run_id": "run1", **kw}
    return ToolCallContext(
        agent="caller",
        instance="caller-x1",
        client=client,
        queue=queue,
        **fields,  # type: ignore[arg-type]
    )


async def test_direct_peer_call_returns_the_answer_and_the_answering_instance(
    start_host: StartHost, client: ChorusClient
) -> None:
    host = await start_host(researcher())
    tool = peer_tool({"capability": "research", "durable": False})

    out = await tool.call({"input": "tides"}, caller_ctx(client))

    assert tool.definition.name == "ask_research"
    assert out.output == "found: tides"
    assert out.instance == host.instance and out.agent == "researcher"
    assert out.task_id == "job1-ask_research-1"


async def test_durable_peer_call_completes_through_the_coordinator(
    coordinator: Coordinator,
    start_host: StartHost,
    client: ChorusClient,
    nc: Client,
    settings: Settings,
) -> None:
    host = await start_host(researcher())
    queue = TaskQueue(nc, settings.subjects)
    tool = peer_tool(PeerToolSpec(agent="researcher"))

    out = await tool.call({"input": "moons"}, caller_ctx(client, queue, attempt=2))

    assert tool.definition.name == "agent_researcher"
    assert (out.output, out.instance) == ("found: moons", host.instance)
    outcome = await queue.outcome("job1-agent_researcher-a2-1")
    assert outcome is not None and outcome.status == "completed"


async def test_peer_description_and_input_schema_reach_the_tool_definition(
    start_host: StartHost, client: ChorusClient, nc: Client, settings: Settings
) -> None:
    received: list[Task] = []
    agent = Agent(
        name="weather",
        capabilities=["forecast"],
        description="Forecasts the weather of a city.",
        input_schema=SCHEMA,
    )

    @agent.on_task
    async def forecast(task: Task, ctx: Context) -> str:
        received.append(task)
        return "sunny"

    await start_host(agent)
    (tool,) = await PeerTools(
        [{"capability": "forecast", "durable": False}], nc, settings.subjects
    ).start()

    assert tool.definition.description == "Forecasts the weather of a city."
    assert tool.definition.parameters == SCHEMA
    out = await tool.call({"city": "Oslo", "days": 2}, caller_ctx(client))
    assert out.output == "sunny"
    assert received[0].data == {"city": "Oslo", "days": 2}
    with pytest.raises(ToolFailed, match="'city'"):
        await tool.call({"days": 2}, caller_ctx(client))


async def test_peer_started_after_the_tools_is_described_at_the_next_call(
    start_host: StartHost, client: ChorusClient, nc: Client, settings: Settings
) -> None:
    source = PeerTools(
        [{"agent": "researcher", "durable": False}], nc, settings.subjects, discover_timeout=0.1
    )
    (tool,) = await source.start()
    assert tool.definition.parameters == DEFAULT_INPUT_SCHEMA
    assert "researcher" not in tool.definition.description

    await start_host(researcher(description="Finds sources on any topic."))
    out = await tool.call({"input": "eels"}, caller_ctx(client))

    assert out.output == "found: eels"
    assert tool.definition.description == "Finds sources on any topic."


async def test_peer_not_running_is_a_tool_error_naming_it(client: ChorusClient) -> None:
    tool = peer_tool({"capability": "nobody", "durable": False})

    with pytest.raises(ToolFailed, match=r"capability 'nobody'.*no_responders"):
        await tool.call({"input": "hello?"}, caller_ctx(client))


def test_peer_tool_entry_must_name_one_peer() -> None:
    with pytest.raises(ConfigError, match="exactly one of"):
        peer_tool({"capability": "a", "agent": "b"})


def ping_pong(name: str, other: str, ran: list[tuple[str, int]]) -> Agent:
    """An agent whose handler asks `other` (as a tool) and passes its answer on."""
    agent = Agent(name=name, capabilities=[name])
    tool = peer_tool({"agent": other, "durable": False})

    @agent.on_task
    async def relay(task: Task, ctx: Context) -> str:
        ran.append((name, task.depth))
        call = ToolCallContext(
            agent=name,
            instance=ctx.instance,
            task_id=task.task_id,
            run_id=task.run_id,
            attempt=task.attempt,
            depth=ctx.depth,
            client=ctx.client,
            queue=ctx.queue,
        )
        try:
            out = await tool.call({"input": f"{task.input}>{name}"}, call)
        except ToolFailed as exc:
            return f"{name}@{ctx.depth} stopped: {exc.reason}"
        return out.output

    return agent


async def test_agents_calling_each_other_stop_at_max_depth(
    start_host: StartHost, client: ChorusClient, settings: Settings
) -> None:
    tuned = msgspec.structs.replace(settings, max_depth=3)
    ran: list[tuple[str, int]] = []
    await start_host(ping_pong("ping", "pong", ran), settings=tuned)
    await start_host(ping_pong("pong", "ping", ran), settings=tuned)
    tool = peer_tool({"agent": "ping", "durable": False})

    out = await tool.call({"input": "go"}, caller_ctx(client))

    assert ran == [("ping", 1), ("pong", 2), ("ping", 3)]
    assert out.output.startswith("ping@3 stopped: agent 'pong' did not answer: depth_exceeded")


async def test_durable_call_past_max_depth_fails_at_once_with_depth_exceeded(
    coordinator: Coordinator,
    start_host: StartHost,
    client: ChorusClient,
    nc: Client,
    settings: Settings,
) -> None:
    await start_host(researcher())
    queue = TaskQueue(nc, settings.subjects)
    tool = peer_tool({"capability": "research"})

    with pytest.raises(ToolFailed, match=r"after 1 attempt.*depth_exceeded"):
        await tool.call({"input": "deep"}, caller_ctx(client, queue, depth=settings.max_depth))


SLOW = """
name: slow
capabilities: [slow]
max_concurrency: 2
handler: tests.agents.handlers:take_time
"""


@pytest.mark.slow
async def test_peer_killed_mid_durable_call_answers_from_another_instance(
    coordinator: Coordinator,
    spawn_agent: SpawnAgent,
    client: ChorusClient,
    nc: Client,
    settings: Settings,
    tmp_path: Path,
) -> None:
    spec = write_spec(tmp_path, "slow", SLOW)
    agents = {a.instance: a for a in [await spawn_agent(spec), await spawn_agent(spec)]}
    busy = await first_busy_instance(nc, settings)
    tool = peer_tool({"capability": "slow", "timeout_s": 30})
    ctx = caller_ctx(client, TaskQueue(nc, settings.subjects))
    call = asyncio.create_task(tool.call({"input": "survive"}, ctx))
    victim = await asyncio.wait_for(busy, 10)

    agents[victim].signal(signal.SIGKILL)
    out = await call

    assert out.output == "done: survive"
    assert out.instance != victim and out.instance in agents


def test_input_schema_without_an_object_root_is_refused() -> None:
    with pytest.raises(ConfigError, match="input_schema must be a JSON schema"):
        Agent(name="bad", input_schema={"type": "string"})


async def test_a_spec_peer_tool_is_called_by_the_agent_loop_and_recorded_with_its_instance(
    start_host: StartHost, client: ChorusClient, tmp_path: Path
) -> None:
    writer = await start_host(researcher())
    lead_spec = load_spec(
        write_spec(
            tmp_path,
            "lead",
            "name: lead\ncapabilities: [leading]\n"
            "tools:\n  - capability: research\n    durable: false\n",
        )
    )
    await start_host(Agent(lead_spec))

    result = await client.run_task(Task(input="NATS subjects"), capability="leading")

    [call] = result.tool_calls
    assert call.name == "ask_research"
    assert call.instance == writer.instance
    assert call.error == ""
    assert "NATS subjects" in call.output
