"""The OpenAI provider, driven through the real `openai` client against a local fake server."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec
import pytest

from chorus.errors import ConfigError, MissingApiKey, ModelError
from chorus.llm import ModelRequest, create_model
from chorus.llm.openai_provider import OpenAIModel, strict_schema
from chorus.messages import Usage
from tests.fake_openai import CHAT, RESPONSES, FakeOpenAI


class Citation(msgspec.Struct):
    url: str
    page: int | None = None


class Answer(msgspec.Struct):
    summary: str
    confidence: float
    verdict: Literal["yes", "no"]
    citations: list[Citation] = []


ANSWER_SCHEMA = msgspec.json.schema(Answer)


class SleepRecorder:
    """Stands in for asyncio.sleep so backoff is observed, not waited for."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
async def make_model(fake_openai: FakeOpenAI) -> AsyncIterator[Any]:
    models: list[OpenAIModel] = []

    def make(**options: Any) -> OpenAIModel:
        options.setdefault("retry_base", 0.01)
        options.setdefault("api_key", "sk-test")
        options.setdefault("base_url", fake_openai.base_url)
        models.append(OpenAIModel("gpt-5-mini", **options))
        return models[-1]

    yield make
    for model in models:
        await model.close()


def ask(text: str = "What is NATS?", schema: dict[str, Any] | None = None) -> ModelRequest:
    return ModelRequest(
        model="openai:gpt-5-mini",
        instructions="You are a terse researcher.\nCite sources.",
        input=text,
        json_schema=schema,
        schema_name="answer",
    )


async def test_request_carries_instructions_and_input_and_returns_text_and_usage(
    fake_openai: FakeOpenAI, make_model: Any
) -> None:
    reply = await make_model().complete(ask())

    [(path, body)] = fake_openai.requests
    assert path == RESPONSES
    assert body["model"] == "gpt-5-mini"
    assert body["instructions"] == "You are a terse researcher.\nCite sources."
    assert body["input"] == "What is NATS?"
    assert body["store"] is False
    assert "text" not in body
    assert fake_openai.headers[0]["authorization"] == "Bearer sk-test"
    assert reply.text == "echo: What is NATS?"
    assert reply.data is None
    assert reply.usage == Usage(input_tokens=10, output_tokens=4, total_tokens=14)
    assert reply.model == "gpt-5-mini"


async def test_structured_output_sends_strict_schema_and_returns_parsed_data(
    fake_openai: FakeOpenAI, make_model: Any
) -> None:
    reply = await make_model().complete(ask(schema=ANSWER_SCHEMA))

    fmt = fake_openai.requests[0][1]["text"]["format"]
    assert fmt["type"] == "json_schema"
    assert fmt["name"] == "answer"
    assert fmt["strict"] is True
    assert fmt["schema"] == strict_schema(ANSWER_SCHEMA)
    assert fmt["schema"]["type"] == "object"
    assert fmt["schema"]["additionalProperties"] is False
    assert fmt["schema"]["required"] == ["summary", "confidence", "verdict", "citations"]
    assert json.loads(reply.text) == reply.data
    assert isinstance(msgspec.convert(reply.data, Answer), Answer)


async def test_invalid_json_for_a_schema_is_a_model_error(
    fake_openai: FakeOpenAI, make_model: Any
) -> None:
    fake_openai.reply = lambda path, body: "Sure! Here is the JSON you asked for"

    with pytest.raises(ModelError, match="invalid JSON for schema answer"):
        await make_model().complete(ask(schema=ANSWER_SCHEMA))


async def test_chat_completions_fallback_works_without_the_responses_api(
    fake_openai: FakeOpenAI,
) -> None:
    fake_openai.disable_responses = True
    env = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": fake_openai.base_url,
        "CHORUS_OPENAI_API": "chat",
    }
    model = create_model("openai:gpt-5-mini", env=env)
    try:
        reply = await model.complete(ask())
        structured = await model.complete(ask(schema=ANSWER_SCHEMA))
    finally:
        await model.close()

    assert fake_openai.paths() == [CHAT, CHAT]
    body = fake_openai.requests[0][1]
    assert body["messages"] == [
        {"role": "system", "content": "You are a terse researcher.\nCite sources."},
        {"role": "user", "content": "What is NATS?"},
    ]
    assert reply.text == "echo: What is NATS?"
    assert reply.usage == Usage(10, 4, 14)
    fmt = fake_openai.requests[1][1]["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"] == {
        "name": "answer",
        "schema": strict_schema(ANSWER_SCHEMA),
        "strict": True,
    }
    assert isinstance(msgspec.convert(structured.data, Answer), Answer)


async def test_server_without_responses_api_fails_at_once_suggesting_chat(
    fake_openai: FakeOpenAI, make_model: Any
) -> None:
    fake_openai.disable_responses = True

    with pytest.raises(ModelError, match=r"HTTP 404.*CHORUS_OPENAI_API=chat"):
        await make_model().complete(ask())
    assert len(fake_openai.requests) == 1


async def test_rate_limit_is_retried_until_success(
    fake_openai: FakeOpenAI, make_model: Any
) -> None:
    fake_openai.fail_next(429, 2)

    reply = await make_model().complete(ask())

    assert reply.text == "echo: What is NATS?"
    assert len(fake_openai.requests) == 3


async def test_persistent_server_error_gives_up_after_max_attempts(
    fake_openai: FakeOpenAI, make_model: Any
) -> None:
    fake_openai.fail_next(500, 10)

    with pytest.raises(ModelError) as caught:
        await make_model(max_retries=2).complete(ask())

    assert len(fake_openai.requests) == 3
    message = str(caught.value)
    assert "gpt-5-mini" in message
    assert "after 3 attempts" in message
    assert "HTTP 500: fake failure 500" in message


async def test_unauthorized_fails_at_once_pointing_at_the_api_key(
    fake_openai: FakeOpenAI, make_model: Any
) -> None:
    fake_openai.fail_next(401, 5)

    with pytest.raises(ModelError, match=r"HTTP 401.*OPENAI_API_KEY"):
        await make_model().complete(ask())
    assert len(fake_openai.requests) == 1


async def test_bad_request_is_not_retried(fake_openai: FakeOpenAI, make_model: Any) -> None:
    fake_openai.fail_next(400, 5)

    with pytest.raises(ModelError, match="HTTP 400: fake failure 400"):
        await make_model().complete(ask())
    assert len(fake_openai.requests) == 1


async def test_backoff_grows_exponentially_with_jitter_up_to_the_cap(
    fake_openai: FakeOpenAI, make_model: Any
) -> None:
    fake_openai.fail_next(503, 5)
    sleep = SleepRecorder()

    model = make_model(max_retries=4, retry_base=1.0, retry_cap=4.0, sleep=sleep)
    with pytest.raises(ModelError, match="after 5 attempts"):
        await model.complete(ask())

    bounds = [1.0, 2.0, 4.0, 4.0]
    assert len(sleep.delays) == len(bounds)
    for delay, bound in zip(sleep.delays, bounds, strict=True):
        assert bound / 2 <= delay <= bound


async def test_retry_after_header_is_honoured_and_capped(
    fake_openai: FakeOpenAI, make_model: Any
) -> None:
    fake_openai.fail_next(429, 1, retry_after=1.5)
    fake_openai.fail_next(429, 1, retry_after=600)
    sleep = SleepRecorder()

    await make_model(retry_after_cap=20.0, sleep=sleep).complete(ask())

    assert sleep.delays == [1.5, 20.0]


async def test_connection_errors_are_retried_then_reported(make_model: Any) -> None:
    with FakeOpenAI() as gone:
        dead_url = gone.base_url
    sleep = SleepRecorder()

    with pytest.raises(ModelError, match=r"after 3 attempts: connection error"):
        await make_model(base_url=dead_url, max_retries=2, sleep=sleep).complete(ask())
    assert len(sleep.delays) == 2


async def test_concurrent_calls_are_limited_per_model(
    fake_openai: FakeOpenAI, make_model: Any
) -> None:
    pair = threading.Barrier(2, timeout=10)  # passes only when two calls are in flight at once
    lock, in_flight, peak = threading.Lock(), [0], [0]

    def reply(path: str, body: dict[str, Any]) -> str:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        pair.wait()
        with lock:
            in_flight[0] -= 1
        return "ok"

    fake_openai.reply = reply
    model = make_model(concurrency=2)

    replies = await asyncio.gather(*(model.complete(ask()) for _ in range(6)))

    assert [r.text for r in replies] == ["ok"] * 6
    assert peak[0] == 2


def test_missing_api_key_fails_when_the_model_is_created() -> None:
    with pytest.raises(MissingApiKey, match=r"OPENAI_API_KEY is not set.*model: offline"):
        create_model("openai:gpt-5-mini", env={})
    with pytest.raises(MissingApiKey):
        create_model("openai:gpt-5-mini", env={"OPENAI_API_KEY": ""})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("CHORUS_OPENAI_API", "completions"),
        ("CHORUS_OPENAI_MAX_RETRIES", "three"),
        ("CHORUS_OPENAI_TIMEOUT", "-1"),
        ("CHORUS_OPENAI_CONCURRENCY", "1.5"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_variable(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key):
        create_model("openai:gpt-5-mini", env={"OPENAI_API_KEY": "sk-test", key: value})


async def test_settings_are_read_from_the_environment() -> None:
    env = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "CHORUS_OPENAI_API": "chat",
        "CHORUS_OPENAI_MAX_RETRIES": "5",
        "CHORUS_OPENAI_TIMEOUT": "7.5",
        "CHORUS_OPENAI_CONCURRENCY": "2",
    }
    model = OpenAIModel.from_env("gpt-5-mini", env)
    try:
        assert (model.name, model.api, model.max_retries) == ("gpt-5-mini", "chat", 5)
        assert str(model._client.base_url) == "http://127.0.0.1:9/v1/"
        assert model._client.timeout == 7.5
        assert model._client.max_retries == 0
        assert model._limit._value == 2
    finally:
        await model.close()


def test_strict_schema_inlines_the_root_and_closes_every_object() -> None:
    schema = strict_schema(ANSWER_SCHEMA)

    assert "$ref" not in schema
    assert schema["type"] == "object"
    assert "default" not in json.dumps(schema["properties"]["citations"])
    citation = schema["$defs"]["Citation"]
    assert citation["additionalProperties"] is False
    assert citation["required"] == ["url", "page"]
    assert {"type": "null"} in citation["properties"]["page"]["anyOf"]
    assert ANSWER_SCHEMA["$ref"] == "#/$defs/Answer"  # the input is left alone


def test_strict_schema_rejects_a_non_object_root() -> None:
    with pytest.raises(ConfigError, match="object at the schema root"):
        strict_schema(msgspec.json.schema(list[int]))
