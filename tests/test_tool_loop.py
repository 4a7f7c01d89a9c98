"""The agent loop: model turns, tool calls and their outputs, limits, records on the Result."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from nats.aio.client import Client

from chorus.agent import Agent
from chorus.agent.loop import run_loop
from chorus.agent.toolbox import Toolbox
from chorus.client import ChorusClient
from chorus.config import Settings
from chorus.errors import ConfigError, MaxTurnsExceeded
from chorus.llm.base import FunctionCall, FunctionCallOutput, ModelRequest
from chorus.llm.offline import OfflineModel
from chorus.messages import ErrorReply, Task, decode_result, encode
from chorus.specs.agent import AgentSpec
from chorus.specs.tools import ToolSpec
from chorus.tools import ToolCallContext, tool
from tests.helpers import StartHost

WAIT_S = 5.0


@tool
async def lookup(term: str) -> str:
    """Look a term up in the glossary."""
    return f"{term} is a messaging system"


def request(text: str = "NATS") -> ModelRequest:
    return ModelRequest(model="offline", instructions="Answer briefly.", input=text)


def context_for(call: FunctionCall) -> ToolCallContext:
    return ToolCallContext(agent="tester", instance="tester-1", call_id=call.call_id)


def outputs_seen(model: OfflineModel) -> list[dict[str, Any]]:
    """What the model was given back for each tool call, over all its turns."""
    last = model.calls[-1]
    return [json.loads(i.output) for i in last.items if isinstance(i, FunctionCallOutput)]


def calling(*calls: FunctionCall, then: str = "done") -> Any:
    """A script: ask for `calls` on the first turn, answer `then` once outputs are in."""

    def script(req: ModelRequest) -> Any:
        return then if req.items else list(calls)

    return script


def call(name: str, call_id: str = "c1", **arguments: Any) -> FunctionCall:
    return FunctionCall(call_id=call_id, name=name, arguments=json.dumps(arguments))


async def test_offline_model_calls_the_tool_then_answers_citing_its_output() -> None:
    model = OfflineModel()

    result = await run_loop(model, request(), Toolbox([lookup]), context_for)

    assert result.text == (
        "[offline] Answer briefly.: NATS (tool lookup: NATS is a messaging system)"
    )
    assert result.turns == 2
    [record] = result.tool_calls
    assert (record.name, json.loads(record.arguments), record.turn) == (
        "lookup",
        {"term": "NATS"},
        1,
    )
    assert record.output == "NATS is a messaging system" and record.error == ""


async def test_two_calls_of_one_turn_run_concurrently() -> None:
    started = {"a": asyncio.Event(), "b": asyncio.Event()}

    @tool
    async def meet(me: str, other: str) -> str:
        """Wait for the other call to have started."""
        started[me].set()
        await asyncio.wait_for(started[other].wait(), WAIT_S)  # only if both run at once
        return f"{me} met {other}"

    model = OfflineModel(
        script=calling(call("meet", "1", me="a", other="b"), call("meet", "2", me="b", other="a"))
    )

    result = await run_loop(model, request(), Toolbox([meet]), context_for)

    assert [r.output for r in result.tool_calls] == ["a met b", "b met a"]
    assert [r.error for r in result.tool_calls] == ["", ""]


async def test_calls_beyond_max_parallel_wait_for_a_free_slot() -> None:
    running, peak = 0, 0
    gate = asyncio.Event()

    @tool
    async def work(n: int) -> int:
        """Count how many run at once."""
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if peak == 2:
            gate.set()
        await asyncio.wait_for(gate.wait(), WAIT_S)
        running -= 1
        return n

    calls = [call("work", str(n), n=n) for n in range(5)]
    model = OfflineModel(script=calling(*calls))

    result = await run_loop(model, request(), Toolbox([work]), context_for, max_parallel=2)

    assert peak == 2
    assert [r.output for r in result.tool_calls] == ["0", "1", "2", "3", "4"]


async def test_a_tool_that_raises_gives_the_model_the_error_and_it_answers() -> None:
    @tool
    async def broken(term: str) -> str:
        """Always fails."""
        raise RuntimeError("the glossary is offline")

    model = OfflineModel(script=calling(call("broken", term="NATS"), then="sorry, no glossary"))

    result = await run_loop(model, request(), Toolbox([broken]), context_for)

    assert outputs_seen(model) == [{"error": "RuntimeError: the glossary is offline"}]
    assert result.text == "sorry, no glossary"
    assert result.tool_calls[0].error == "RuntimeError: the glossary is offline"


async def test_invalid_arguments_reach_the_model_naming_the_field() -> None:
    @tool
    async def repeat(text: str, times: int) -> str:
        """Repeat a text."""
        return text * times

    model = OfflineModel(script=calling(call("repeat", text="a", times="three")))

    await run_loop(model, request(), Toolbox([repeat]), context_for)

    [seen] = outputs_seen(model)
    assert "$.times" in seen["error"] and "Expected `int`, got `str`" in seen["error"]


async def test_a_tool_past_its_timeout_is_a_timed_out_error_for_the_model() -> None:
    @tool(timeout_s=0.05)
    async def stuck(term: str) -> str:
        """Never answers."""
        await asyncio.Event().wait()
        return term

    model = OfflineModel(script=calling(call("stuck", term="x")))

    result = await run_loop(model, request(), Toolbox([stuck]), context_for)

    assert outputs_seen(model) == [{"error": "stuck timed out after 0.05 s"}]
    assert result.text == "done"


async def test_a_value_that_cannot_be_encoded_is_an_error_for_the_model() -> None:
    @tool
    async def opaque(term: str) -> Any:
        """Returns something JSON cannot hold."""
        return object()

    model = OfflineModel(script=calling(call("opaque", term="x")))

    await run_loop(model, request(), Toolbox([opaque]), context_for)

    [seen] = outputs_seen(model)
    assert "cannot be encoded" in seen["error"]


async def test_an_unknown_tool_name_is_an_error_naming_the_tools() -> None:
    model = OfflineModel(script=calling(call("nosuch")))

    await run_loop(model, request(), Toolbox([lookup]), context_for)

    assert outputs_seen(model) == [{"error": "there is no tool 'nosuch'; the tools are: lookup"}]


async def test_max_turns_raises_with_the_calls_made_so_far() -> None:
    model = OfflineModel(script=lambda req: call("lookup", f"c{len(req.items)}", term="again"))

    with pytest.raises(MaxTurnsExceeded) as caught:
        await run_loop(model, request(), Toolbox([lookup]), context_for, max_turns=3)

    assert len(model.calls) == 3
    assert [r.turn for r in caught.value.tool_calls] == [1, 2]
    assert "no final answer after 3 model turns" in caught.value.reason
    assert "turn 2 lookup" in caught.value.reason


async def test_usage_is_summed_over_turns() -> None:
    model = OfflineModel()

    result = await run_loop(model, request(), Toolbox([lookup]), context_for)

    replies = [await OfflineModel().complete(r) for r in model.calls]
    assert result.usage.total_tokens == sum(r.usage.total_tokens for r in replies)
    assert result.usage.total_tokens > replies[0].usage.total_tokens


async def test_each_turn_reports_the_loops_own_cost() -> None:
    result = await run_loop(OfflineModel(), request(), Toolbox([lookup]), context_for)

    assert len(result.overhead_ms) == result.turns == 2
    assert all(0 <= ms < 1000 for ms in result.overhead_ms)


async def test_tool_calls_are_recorded_on_the_result_over_nats(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    host = await start_host(Agent(name="glossary", instructions="Define it.").use(lookup))
    client = ChorusClient(nc, settings.subjects)

    result = await client.run_task(Task(input="JetStream"), instance=host.instance)

    assert (
        result.output
        == "[offline] Define it.: JetStream (tool lookup: JetStream is a messaging system)"
    )
    [record] = result.tool_calls
    assert record.name == "lookup" and record.output == "JetStream is a messaging system"
    assert record.instance == "" and record.duration_ms >= 0


async def test_max_turns_error_reply_carries_the_partial_trace(
    start_host: StartHost, nc: Client, settings: Settings
) -> None:
    spec = AgentSpec(name="looper", max_turns=2)
    model = OfflineModel(script=lambda req: call("lookup", f"c{len(req.items)}", term="more"))
    host = await start_host(Agent(spec).use(lookup), model=model)

    msg = await nc.request(
        settings.subjects.agent_task(host.instance), encode(Task(input="x")), timeout=WAIT_S
    )

    reply = decode_result(msg.data)
    assert isinstance(reply, ErrorReply) and reply.code == "max_turns_exceeded"
    assert [(r.name, r.turn, r.output) for r in reply.tool_calls] == [
        ("lookup", 1, "more is a messaging system")
    ]


async def test_a_hosted_tool_with_the_offline_model_fails_at_start(
    start_host: StartHost,
) -> None:
    spec = AgentSpec(name="searcher", tools=[ToolSpec(hosted="web_search")])

    with pytest.raises(ConfigError, match="hosted tools \\(web_search\\)"):
        await start_host(Agent(spec))
