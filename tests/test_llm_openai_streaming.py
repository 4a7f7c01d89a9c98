"""The OpenAI provider's `stream`, through the real `openai` client against the fake server's
streamed replies (Responses API events and Chat Completions chunks)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chorus.agent.loop import run_loop
from chorus.agent.toolbox import Toolbox
from chorus.errors import ModelError
from chorus.llm import ModelReply, ModelRequest, TextDelta
from chorus.llm.base import FunctionCall, FunctionTool
from chorus.llm.openai_provider import Api, OpenAIModel
from chorus.messages import ToolCallRecord, Usage
from chorus.tools import ToolCallContext, tool
from tests.fake_openai import CHAT, RESPONSES, FakeCall, FakeOpenAI

APIS: list[Api] = ["responses", "chat"]
ANSWER = "NATS is a small, fast messaging system with streams, keys and values."


@pytest.fixture
async def make_model(fake_openai: FakeOpenAI) -> AsyncIterator[Any]:
    models: list[OpenAIModel] = []

    def make(api: Api, **options: Any) -> OpenAIModel:
        options.setdefault("retry_base", 0.01)
        models.append(
            OpenAIModel(
                "gpt-5-mini", api_key="sk-test", base_url=fake_openai.base_url, api=api, **options
            )
        )
        return models[-1]

    yield make
    for model in models:
        await model.close()


def ask(**fields: Any) -> ModelRequest:
    return ModelRequest(model="gpt-5-mini", instructions="Answer briefly.", input="NATS?", **fields)


async def events_of(model: OpenAIModel, request: ModelRequest) -> list[TextDelta | ModelReply]:
    return [event async for event in model.stream(request)]


@pytest.mark.parametrize("api", APIS)
async def test_text_arrives_in_several_deltas_in_order_then_the_reply_with_usage(
    api: Api, make_model: Any, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = lambda path, body: ANSWER

    events = await events_of(make_model(api), ask())

    *deltas, reply = events
    assert all(isinstance(d, TextDelta) for d in deltas)
    assert isinstance(reply, ModelReply)
    assert len(deltas) == len(ANSWER.split())  # a delta per word, as the server sent them
    assert "".join(d.text for d in deltas if isinstance(d, TextDelta)) == ANSWER
    assert reply.text == ANSWER
    assert reply.usage == Usage(3, 12, 15)  # "Answer briefly." + "NATS?" in, 12 words out
    assert reply.model == "gpt-5-mini"


@pytest.mark.parametrize(("api", "path"), [("responses", RESPONSES), ("chat", CHAT)])
async def test_the_request_asks_for_a_stream_and_chat_asks_for_the_usage(
    api: Api, path: str, make_model: Any, fake_openai: FakeOpenAI
) -> None:
    await events_of(make_model(api), ask())

    sent_path, body = fake_openai.requests[-1]
    assert (sent_path, body["stream"]) == (path, True)
    if api == "chat":
        assert body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("api", APIS)
async def test_streamed_function_calls_come_whole_on_the_reply(
    api: Api, make_model: Any, fake_openai: FakeOpenAI
) -> None:
    calls = [
        FakeCall("call_a", "lookup", '{"term": "JetStream", "limit": 3}'),
        FakeCall("call_b", "lookup", '{"term": "KV"}'),
    ]
    fake_openai.reply = lambda path, body: calls
    tools = (FunctionTool(name="lookup", parameters={"type": "object"}),)

    *deltas, reply = await events_of(make_model(api), ask(tools=tools))

    assert deltas == []
    assert isinstance(reply, ModelReply)
    assert reply.tool_calls == tuple(
        FunctionCall(call_id=c.call_id, name=c.name, arguments=c.arguments) for c in calls
    )
    assert reply.items == reply.tool_calls


@pytest.mark.parametrize("api", APIS)
async def test_structured_output_is_parsed_once_the_stream_is_whole(
    api: Api, make_model: Any
) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}

    *_, reply = await events_of(make_model(api), ask(json_schema=schema))

    assert isinstance(reply, ModelReply)
    assert reply.data == {"answer": "offline"} == json.loads(reply.text)


@pytest.mark.parametrize("api", APIS)
async def test_a_failure_before_the_first_delta_is_retried(
    api: Api, make_model: Any, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fail_next(503)

    *_, reply = await events_of(make_model(api), ask())

    assert isinstance(reply, ModelReply)
    assert reply.text == "echo: NATS?"
    assert len(fake_openai.requests) == 2


@pytest.mark.parametrize("api", APIS)
async def test_a_stream_cut_after_text_was_shown_is_an_error_not_a_silent_retry(
    api: Api, make_model: Any, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = lambda path, body: ANSWER
    fake_openai.cut_stream_after = 5  # a few deltas in, before the end
    shown: list[str] = []

    with pytest.raises(ModelError, match=r"broke after it began|ended before"):
        async for event in make_model(api).stream(ask()):
            if isinstance(event, TextDelta):
                shown.append(event.text)

    assert shown  # the first words were shown before it broke
    assert len(fake_openai.requests) == 1


class Recorder:
    """A loop sink that keeps what the loop told it, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def delta(self, text: str) -> None:
        self.seen.append(("delta", text))

    def tool_started(self, call: FunctionCall) -> None:
        self.seen.append(("tool_started", call.name))

    def tool_finished(self, call: FunctionCall, record: ToolCallRecord) -> None:
        self.seen.append(("tool_finished", record.output))


@tool
async def define(term: str) -> str:
    """Look a term up."""
    return f"{term}: a thing"


@pytest.mark.parametrize("api", APIS)
async def test_the_loop_streams_the_model_and_tells_of_each_tool_call(
    api: Api, make_model: Any, fake_openai: FakeOpenAI
) -> None:
    def reply(path: str, body: dict[str, Any]) -> str | list[FakeCall]:
        said = json.dumps(body.get("input") or body.get("messages"))
        if "function_call_output" in said or '"role": "tool"' in said:
            return "NATS: a thing, says the glossary."
        return [FakeCall("call_1", "define", '{"term": "NATS"}')]

    fake_openai.reply = reply
    sink = Recorder()

    result = await run_loop(
        make_model(api),
        ask(),
        Toolbox([define]),
        lambda call: ToolCallContext(agent="a", instance="a-1", call_id=call.call_id),
        sink=sink,
    )

    assert result.text == "NATS: a thing, says the glossary."
    assert sink.seen[:2] == [("tool_started", "define"), ("tool_finished", "NATS: a thing")]
    assert "".join(text for kind, text in sink.seen[2:] if kind == "delta") == result.text
    assert len(sink.seen) > 3  # the answer came in several deltas
