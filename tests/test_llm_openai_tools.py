"""Function calling through the real `openai` client against the local fake server: the
Responses API's function_call / function_call_output items and chat completions' tool_calls
and `role: tool` messages, driven by the agent loop."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chorus.agent.loop import run_loop
from chorus.agent.toolbox import Toolbox
from chorus.errors import ConfigError
from chorus.llm import ModelRequest
from chorus.llm.base import FunctionCall
from chorus.llm.openai_provider import OpenAIModel
from chorus.tools import ToolCallContext, tool
from tests.fake_openai import CHAT, RESPONSES, FakeCall, FakeOpenAI


@tool
async def lookup(term: str) -> dict[str, str]:
    """Look a term up in the glossary."""
    return {"term": term, "definition": f"{term} is a messaging system"}


LOOKUP_PARAMETERS = {
    "type": "object",
    "properties": {"term": {"type": "string"}},
    "required": ["term"],
    "additionalProperties": False,
}


def ask() -> ModelRequest:
    return ModelRequest(model="gpt-5-mini", instructions="Use the glossary.", input="NATS?")


def context_for(call: FunctionCall) -> ToolCallContext:
    return ToolCallContext(agent="tester", instance="tester-1", call_id=call.call_id)


def calls_then_text(*calls: FakeCall) -> Any:
    """The fake's script: make `calls` on the first request, answer text on the next."""

    def reply(path: str, body: dict[str, Any]) -> str | list[FakeCall]:
        conversation = body.get("messages") or body.get("input")
        return (
            "NATS is a messaging system."
            if isinstance(conversation, list) and len(conversation) > 2
            else list(calls)
        )

    return reply


@pytest.fixture
async def make_model(fake_openai: FakeOpenAI) -> AsyncIterator[Any]:
    models: list[OpenAIModel] = []

    def make(api: Any = "responses") -> OpenAIModel:
        models.append(
            OpenAIModel("gpt-5-mini", api_key="sk-test", base_url=fake_openai.base_url, api=api)
        )
        return models[-1]

    yield make
    for model in models:
        await model.close()


def term_call(call_id: str, term: str) -> FakeCall:
    return FakeCall(call_id, "lookup", json.dumps({"term": term}))


async def test_responses_function_call_round_trip(fake_openai: FakeOpenAI, make_model: Any) -> None:
    fake_openai.reply = calls_then_text(term_call("call_a", "NATS"))

    result = await run_loop(make_model(), ask(), Toolbox([lookup]), context_for)

    (path1, first), (path2, second) = fake_openai.requests
    assert path1 == path2 == RESPONSES
    assert first["tools"] == [
        {
            "type": "function",
            "name": "lookup",
            "description": "Look a term up in the glossary.",
            "parameters": LOOKUP_PARAMETERS,
            "strict": False,
        }
    ]
    assert first["input"] == "NATS?"
    assert second["input"] == [
        {"role": "user", "content": "NATS?"},
        {
            "type": "function_call",
            "call_id": "call_a",
            "name": "lookup",
            "arguments": '{"term": "NATS"}',
        },
        {
            "type": "function_call_output",
            "call_id": "call_a",
            "output": '{"term":"NATS","definition":"NATS is a messaging system"}',
        },
    ]
    assert result.text == "NATS is a messaging system."
    assert result.usage.total_tokens > 0


async def test_responses_parallel_calls_send_back_every_output(
    fake_openai: FakeOpenAI, make_model: Any
) -> None:
    fake_openai.reply = calls_then_text(term_call("call_a", "NATS"), term_call("call_b", "KV"))

    result = await run_loop(make_model(), ask(), Toolbox([lookup]), context_for)

    sent = fake_openai.requests[1][1]["input"]
    outputs = {
        i["call_id"]: json.loads(i["output"])
        for i in sent
        if i.get("type") == "function_call_output"
    }
    assert outputs == {
        "call_a": {"term": "NATS", "definition": "NATS is a messaging system"},
        "call_b": {"term": "KV", "definition": "KV is a messaging system"},
    }
    assert [r.call_id for r in result.tool_calls] == ["call_a", "call_b"]


async def test_chat_tool_calls_and_tool_messages_round_trip(
    fake_openai: FakeOpenAI, make_model: Any
) -> None:
    fake_openai.reply = calls_then_text(term_call("call_a", "NATS"), term_call("call_b", "KV"))

    result = await run_loop(make_model(api="chat"), ask(), Toolbox([lookup]), context_for)

    (path1, first), (_, second) = fake_openai.requests
    assert path1 == CHAT
    assert first["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": "Look a term up in the glossary.",
                "parameters": LOOKUP_PARAMETERS,
            },
        }
    ]
    system, user, assistant, *tools = second["messages"]
    assert (system["role"], user["content"]) == ("system", "NATS?")
    assert assistant["role"] == "assistant"
    assert [c["id"] for c in assistant["tool_calls"]] == ["call_a", "call_b"]
    assert assistant["tool_calls"][0]["function"] == {
        "name": "lookup",
        "arguments": '{"term": "NATS"}',
    }
    assert [(t["role"], t["tool_call_id"]) for t in tools] == [
        ("tool", "call_a"),
        ("tool", "call_b"),
    ]
    assert json.loads(tools[1]["content"])["term"] == "KV"
    assert result.text == "NATS is a messaging system."


async def test_hosted_tools_are_passed_to_the_responses_api_as_given(
    fake_openai: FakeOpenAI, make_model: Any
) -> None:
    web_search = {"type": "web_search", "search_context_size": "low"}

    await run_loop(make_model(), ask(), Toolbox([lookup], hosted=[web_search]), context_for)

    tools = fake_openai.requests[0][1]["tools"]
    assert [t["type"] for t in tools] == ["function", "web_search"]
    assert tools[1] == web_search


async def test_a_hosted_tool_with_the_chat_api_is_a_config_error_at_start(make_model: Any) -> None:
    toolbox = Toolbox(hosted=[{"type": "web_search"}])

    with pytest.raises(ConfigError, match="hosted tools \\(web_search\\) need a provider"):
        await toolbox.start(make_model(api="chat"))
