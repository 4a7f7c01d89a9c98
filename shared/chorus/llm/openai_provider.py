"""The OpenAI provider: the Responses API, or Chat Completions for compatible servers.

The client's own retries are off (`max_retries=0`): this module retries 429, 5xx, connection
errors and timeouts itself, with exponential backoff, jitter and `retry-after`, so the number
of attempts and the final error message are ours. Concurrency per model is bounded by a
semaphore that is not held while waiting to retry.

`stream` is the same call with `stream=True` (and, for chat, `stream_options={"include_usage":
True}`), read by `chorus.llm.openai_stream`.

Tools: the Responses API gets `tools=[{"type": "function", ...}]` plus hosted tools as
given, and the conversation as input items (stateless: `store=False`, the prior output items
sent back, never `previous_response_id`). Chat Completions gets `tools=[{"type": "function",
"function": {...}}]`, the calls as the assistant message's `tool_calls` and the outputs as
`role: tool` messages; it cannot run hosted tools.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from typing import Any, Literal

import msgspec
import openai
from openai.types.responses import Response

from chorus.errors import ConfigError, MissingApiKey, ModelError, RateLimited
from chorus.llm.base import (
    AssistantMessage,
    FunctionCall,
    FunctionCallOutput,
    Item,
    ModelEvent,
    ModelReply,
    ModelRequest,
    ProviderItem,
    TextDelta,
    UserMessage,
    reply_items,
)
from chorus.llm.openai_stream import ChatStream, chat_usage, response_event
from chorus.messages import Usage
from chorus.spend.limits import account_id

Api = Literal["responses", "chat"]
DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Keys whose values are data, not sub-schemas: never rewritten.
_DATA_KEYS = frozenset({"enum", "const", "examples"})
# Keys whose values map names to sub-schemas.
_SCHEMA_MAPS = frozenset({"properties", "$defs", "definitions"})


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a (msgspec-generated) JSON schema into the form OpenAI strict mode accepts.

    A root `$ref` is inlined so the root is an object; every object gets
    `additionalProperties: false` and lists all its properties in `required` (optional
    fields keep their `null` alternative); `default`, which strict mode rejects, is dropped.
    """
    root: dict[str, Any] = _strict(schema)
    ref = root.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        target = root.get("$defs", {}).get(ref.removeprefix("#/$defs/"))
        if target is None:
            raise ConfigError(f"JSON schema root refers to a missing definition: {ref}")
        root = {**{k: v for k, v in root.items() if k != "$ref"}, **target}
    if root.get("type") != "object":
        raise ConfigError(
            "OpenAI structured output needs an object at the schema root "
            f"(a Struct or a dict-like type), got type {root.get('type', 'unknown')!r}"
        )
    return root


def _strict(node: Any) -> Any:
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "default":
            continue
        if key in _DATA_KEYS:
            out[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        else:
            out[key] = _strict(value)
    if out.get("type") == "object" or "properties" in out:
        properties = out.setdefault("properties", {})
        out["required"] = list(properties)
        out["additionalProperties"] = False
    return out


def _env_number(env: Mapping[str, str], key: str, default: float, *, integer: bool) -> float:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key} must be {kind}, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{key} must not be negative, got {raw!r}")
    return value


def _error_message(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return exc.message


def _retry_after(exc: openai.APIStatusError) -> float | None:
    headers = exc.response.headers
    for header, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers[header]) / divisor)
        except (KeyError, ValueError):
            continue
    return None  # absent, or an HTTP date: use the backoff


class _Answer(msgspec.Struct, frozen=True):
    text: str
    usage: Usage
    model: str
    calls: tuple[FunctionCall, ...] = ()
    items: tuple[Item, ...] = ()


def responses_input(request: ModelRequest) -> str | list[dict[str, Any]]:
    """The Responses API `input`: the task's text alone, or the session's earlier turns, the
    task's text and this loop's items."""
    if not request.items and not request.history:
        return request.input
    out = _responses_items(request.history)
    out.append({"role": "user", "content": request.input})
    out.extend(_responses_items(request.items))
    return out


def _responses_items(items: Sequence[Item]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, UserMessage):
            out.append({"role": "user", "content": item.text})
        elif isinstance(item, AssistantMessage):
            out.append({"role": "assistant", "content": item.text})
        elif isinstance(item, FunctionCall):
            out.append(
                {
                    "type": "function_call",
                    "call_id": item.call_id,
                    "name": item.name,
                    "arguments": item.arguments,
                }
            )
        elif isinstance(item, FunctionCallOutput):
            out.append(
                {"type": "function_call_output", "call_id": item.call_id, "output": item.output}
            )
        elif item.provider == "openai":
            out.append(item.data)
    return out


def chat_messages(request: ModelRequest) -> list[dict[str, Any]]:
    """Chat Completions `messages`; an assistant text and the calls after it are one message."""
    out: list[dict[str, Any]] = [{"role": "system", "content": request.instructions}]
    _chat_items(out, request.history)
    out.append({"role": "user", "content": request.input})
    _chat_items(out, request.items)
    return out


def _chat_items(out: list[dict[str, Any]], items: Sequence[Item]) -> None:
    for item in items:
        if isinstance(item, UserMessage):
            out.append({"role": "user", "content": item.text})
        elif isinstance(item, AssistantMessage):
            out.append({"role": "assistant", "content": item.text})
        elif isinstance(item, FunctionCall):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = out[-1]
            if last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutput):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})


class OpenAIModel:
    """One OpenAI (or OpenAI-compatible) model; safe to call from many tasks at once."""

    def __init__(
        self,
        name: str,
        *,
        api_key: str,
        base_url: str | None = None,
        api: Api = "responses",
        max_retries: int = 3,
        timeout: float = 120.0,
        concurrency: int = 8,
        retry_base: float = 0.5,
        retry_cap: float = 8.0,
        retry_after_cap: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        retry_rate_limits: bool = True,
    ) -> None:
        self.name = name
        # False: a 429 raises RateLimited at once, for chorus.llm.limited to pause every
        # process sharing the key and to retry through the shared limits.
        self.retry_rate_limits = retry_rate_limits
        self.account = account_id(api_key)
        self.api: Api = api
        self.hosted_tools = api == "responses"  # chat completions has no hosted tools
        self.max_retries = max_retries
        self.retry_base, self.retry_cap = retry_base, retry_cap
        self.retry_after_cap = retry_after_cap
        self._sleep = sleep
        self._limit = asyncio.Semaphore(max(1, concurrency))
        self._client = openai.AsyncOpenAI(
            api_key=api_key, base_url=base_url or DEFAULT_BASE_URL, max_retries=0, timeout=timeout
        )

    @classmethod
    def from_env(cls, model_name: str, env: Mapping[str, str], **options: Any) -> OpenAIModel:
        """Configure from the environment; fails at start-up when the API key is missing."""
        api_key = env.get("OPENAI_API_KEY", "").strip()
        if not api_key:
            raise MissingApiKey(
                "OPENAI_API_KEY is not set: export it, or use model: offline for the offline model"
            )
        api = env.get("CHORUS_OPENAI_API", "").strip() or "responses"
        if api not in ("responses", "chat"):
            raise ConfigError(f"CHORUS_OPENAI_API must be 'responses' or 'chat', got {api!r}")
        return cls(
            model_name,
            api_key=api_key,
            base_url=env.get("OPENAI_BASE_URL", "").strip() or None,
            api="chat" if api == "chat" else "responses",
            max_retries=int(_env_number(env, "CHORUS_OPENAI_MAX_RETRIES", 3, integer=True)),
            timeout=_env_number(env, "CHORUS_OPENAI_TIMEOUT", 120.0, integer=False),
            concurrency=int(_env_number(env, "CHORUS_OPENAI_CONCURRENCY", 8, integer=True)),
            **options,
        )

    def _schema(self, request: ModelRequest) -> dict[str, Any] | None:
        """The strict schema of the request; ConfigError for what this API cannot do."""
        schema = strict_schema(request.json_schema) if request.json_schema is not None else None
        if request.hosted_tools and not self.hosted_tools:
            raise ConfigError(
                f"openai model {self.name}: hosted tools need the Responses API "
                "(CHORUS_OPENAI_API=responses), not chat completions"
            )
        return schema

    async def complete(self, request: ModelRequest) -> ModelReply:
        schema = self._schema(request)
        attempts = max(0, self.max_retries) + 1
        for attempt in range(1, attempts + 1):
            try:
                async with self._limit:
                    answer = await self._call(request, schema)
                break
            except openai.OpenAIError as exc:
                failure, delay = self._retryable(exc)
            await self._before_retry(attempt, attempts, failure, delay)
        return self._reply(request, answer)

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        """`complete`, streamed (`stream=True`). A failure before the first delta is retried
        as `complete` retries; one after it is a ModelError (what was shown cannot be taken
        back by a silent retry: the task's own retry supersedes it)."""
        schema = self._schema(request)
        attempts = max(0, self.max_retries) + 1
        for attempt in range(1, attempts + 1):
            began = False
            try:
                async with self._limit, aclosing(self._stream_call(request, schema)) as events:
                    async for event in events:
                        if isinstance(event, _Answer):
                            answer = event
                        else:
                            began = True
                            yield TextDelta(event)
                break
            except openai.OpenAIError as exc:
                if began:
                    raise ModelError(
                        f"openai model {self.name}: the stream broke after it began: {exc}"
                    ) from exc
                failure, delay = self._retryable(exc)
            await self._before_retry(attempt, attempts, failure, delay)
        yield self._reply(request, answer)

    def _retryable(self, exc: openai.OpenAIError) -> tuple[str, float | None]:
        """What went wrong and the delay the server asked for, when it is worth retrying;
        a ModelError saying what to do otherwise."""
        if isinstance(exc, openai.APIStatusError):
            status, message = exc.status_code, _error_message(exc)
            if status == 429 and not self.retry_rate_limits:
                raise RateLimited(
                    f"openai model {self.name}: HTTP 429: {message}", _retry_after(exc)
                ) from exc
            if status == 401:
                raise ModelError(
                    f"openai model {self.name}: HTTP 401 unauthorized: {message}; "
                    "check OPENAI_API_KEY"
                ) from exc
            if status not in (408, 429) and status < 500:
                hint = ""
                if status == 404 and self.api == "responses":
                    hint = " (a server without /v1/responses needs CHORUS_OPENAI_API=chat)"
                raise ModelError(
                    f"openai model {self.name}: HTTP {status}: {message}{hint}"
                ) from exc
            return f"HTTP {status}: {message}", _retry_after(exc)
        if isinstance(exc, openai.APIConnectionError):
            timed_out = isinstance(exc, openai.APITimeoutError)
            return f"{'timed out' if timed_out else 'connection error'}: {exc.message}", None
        raise ModelError(f"openai model {self.name}: {exc}") from exc

    async def _before_retry(
        self, attempt: int, attempts: int, failure: str, delay: float | None
    ) -> None:
        """Wait before the next attempt; a ModelError after the last one."""
        if attempt == attempts:
            raise ModelError(
                f"openai model {self.name}: gave up after {attempts} attempts: {failure}"
            )
        if delay is None:
            backoff = min(self.retry_cap, self.retry_base * 2 ** (attempt - 1))
            delay = random.uniform(backoff / 2, backoff)
        await self._sleep(min(delay, self.retry_after_cap))

    def _reply(self, request: ModelRequest, answer: _Answer) -> ModelReply:
        text, data = answer.text, None
        if request.json_schema is not None and not answer.calls:
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise ModelError(
                    f"model returned invalid JSON for schema {request.schema_name}: {exc}: "
                    f"{text[:200]!r}"
                ) from exc
        return ModelReply(
            text=text,
            data=data,
            usage=answer.usage,
            model=answer.model,
            tool_calls=answer.calls,
            items=answer.items,
        )

    async def _call(self, request: ModelRequest, schema: dict[str, Any] | None) -> _Answer:
        if self.api == "chat":
            completion = await self._client.chat.completions.create(
                **self._chat_params(request, schema)
            )
            if not completion.choices:
                raise ModelError(f"openai model {self.name}: the reply has no choices")
            message = completion.choices[0].message
            text = message.content or ""
            usage = chat_usage(completion.usage)
            calls = tuple(
                FunctionCall(call_id=c.id, name=c.function.name, arguments=c.function.arguments)
                for c in message.tool_calls or ()
                if c.type == "function"
            )
            model = completion.model or self.name
            return _Answer(text, usage, model, calls, reply_items(text, calls))
        response = await self._client.responses.create(**self._responses_params(request, schema))
        return self._response_answer(response)

    async def _stream_call(
        self, request: ModelRequest, schema: dict[str, Any] | None
    ) -> AsyncGenerator[str | _Answer]:
        """The text as it comes, then the answer."""
        if self.api == "chat":
            chunks = await self._client.chat.completions.create(
                **self._chat_params(request, schema),
                stream=True,
                stream_options={"include_usage": True},
            )
            read = ChatStream(model=self.name)
            async with chunks:
                async for chunk in chunks:
                    text = read.add(chunk)
                    if text:
                        yield text
            if not read.finished:
                raise ModelError(f"openai model {self.name}: the stream ended before the reply did")
            whole, calls = "".join(read.text), read.calls
            yield _Answer(whole, read.usage, read.model, calls, reply_items(whole, calls))
            return
        events = await self._client.responses.create(
            **self._responses_params(request, schema), stream=True
        )
        async with events:
            async for event in events:
                said = response_event(event, self.name)
                if isinstance(said, str):
                    yield said
                elif said is not None:
                    yield self._response_answer(said)
                    return
        raise ModelError(f"openai model {self.name}: the stream ended before the reply did")

    def _responses_params(
        self, request: ModelRequest, schema: dict[str, Any] | None
    ) -> dict[str, Any]:
        tools: list[dict[str, Any]] = [
            {
                "type": "function",
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
                "strict": False,  # tool schemas are the tools' own, not rewritten for strict
            }
            for t in request.tools
        ]
        tools += [dict(t) for t in request.hosted_tools]
        return {
            "model": self.name,
            "instructions": request.instructions,
            "input": responses_input(request),
            "tools": tools or openai.omit,
            "store": False,
            "text": openai.omit
            if schema is None
            else {
                "format": {
                    "type": "json_schema",
                    "name": request.schema_name,
                    "schema": schema,
                    "strict": True,
                }
            },
        }

    def _response_answer(self, response: Response) -> _Answer:
        u = response.usage
        usage = Usage(u.input_tokens, u.output_tokens, u.total_tokens) if u else Usage()
        if u and u.input_tokens_details:  # prompt-cache hits, priced lower
            usage = msgspec.structs.replace(
                usage, cached_tokens=u.input_tokens_details.cached_tokens
            )
        calls: list[FunctionCall] = []
        items: list[Item] = []
        for output in response.output:
            if output.type == "message":
                text = "".join(part.text for part in output.content if part.type == "output_text")
                if text:
                    items.append(AssistantMessage(text=text))
            elif output.type == "function_call":
                call = FunctionCall(
                    call_id=output.call_id, name=output.name, arguments=output.arguments
                )
                calls.append(call)
                items.append(call)
            elif output.type == "reasoning" and output.encrypted_content:
                # Without `store`, only a reasoning item that carries its content can be sent
                # back; hosted tool calls ran server-side and need no round trip.
                items.append(
                    ProviderItem(provider="openai", data=output.model_dump(exclude_none=True))
                )
        model = response.model or self.name
        return _Answer(response.output_text, usage, model, tuple(calls), tuple(items))

    def _chat_params(self, request: ModelRequest, schema: dict[str, Any] | None) -> dict[str, Any]:
        tools = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                },
            }
            for t in request.tools
        ]
        return {
            "model": self.name,
            "messages": chat_messages(request),
            "tools": tools or openai.omit,
            "response_format": openai.omit
            if schema is None
            else {
                "type": "json_schema",
                "json_schema": {"name": request.schema_name, "schema": schema, "strict": True},
            },
        }

    async def close(self) -> None:
        await self._client.close()
