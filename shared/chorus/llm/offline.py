"""A deterministic model with no network: for the demo, the tests and CI.

Without a script it answers `[<model>] <first line of instructions>: <input>`. When a JSON
schema is asked for it returns a value valid for that schema. Offered tools and no tool
output yet, it calls the first tool with arguments valid for its schema (the input in the
first string property); once outputs are in, it answers citing them:
`[<model>] <headline>: <input> (tool <name>: <output>)`.

Tests script it with `OfflineModel(script=...)`: a callable from the full request (items
included) to text, data, a `FunctionCall`, a list of them, or a whole `ModelReply`.

`stream` gives the same reply a word at a time (`chunk_delay` seconds apart, after `delay`),
so the live output of tasks can be seen and tested without a provider.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from chorus.errors import ConfigError
from chorus.llm.base import (
    FunctionCall,
    FunctionCallOutput,
    FunctionTool,
    ModelEvent,
    ModelReply,
    ModelRequest,
    TextDelta,
    reply_items,
)
from chorus.messages import Usage

Script = Callable[[ModelRequest], Any | Awaitable[Any]]
_WORDS = re.compile(r"\S+\s*|\s+")  # every character in exactly one piece, in order


def _count_tokens(text: str) -> int:
    return len(text.split())


def sample_for_schema(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> Any:
    """A small value that validates against `schema` (the subset msgspec and OpenAI emit)."""
    defs = defs if defs is not None else schema.get("$defs", {})
    if "$ref" in schema:
        return sample_for_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    for combinator in ("anyOf", "oneOf", "allOf"):
        if combinator in schema:
            return sample_for_schema(schema[combinator][0], defs)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties: dict[str, Any] = schema.get("properties", {})
        return {name: sample_for_schema(sub, defs) for name, sub in properties.items()}
    if kind == "array":
        return [sample_for_schema(schema.get("items", {}), defs)] * schema.get("minItems", 1)
    if kind == "string":
        return "x" * schema.get("minLength", 0) if schema.get("minLength") else "offline"
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return float(schema.get("minimum", 0))
    if kind == "boolean":
        return True
    return None


def sample_arguments(tool: FunctionTool, text: str) -> dict[str, Any]:
    """Arguments valid for `tool`'s schema, with `text` in the first string property."""
    arguments = sample_for_schema(tool.parameters)
    if not isinstance(arguments, dict):
        return {}
    properties: dict[str, Any] = tool.parameters.get("properties", {})
    for name, schema in properties.items():
        if schema.get("type") == "string" and "enum" not in schema and "const" not in schema:
            arguments[name] = text
            break
    return arguments


class OfflineModel:
    """Deterministic, instant (or `delay` seconds), scriptable; streamed a word at a time,
    `chunk_delay` seconds apart."""

    hosted_tools = False  # nothing to run a provider's web search with

    def __init__(
        self,
        name: str = "offline",
        *,
        script: Script | None = None,
        delay: float = 0.0,
        chunk_delay: float = 0.0,
    ):
        self.name = name
        self.script = script
        self.delay = delay
        self.chunk_delay = chunk_delay
        self.calls: list[ModelRequest] = []

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelEvent]:
        """The reply of `complete`, its text a word per delta, then the reply itself."""
        reply = await self.complete(request)
        for number, piece in enumerate(_WORDS.findall(reply.text)):
            if number:
                # Each word in a loop turn of its own, as a provider's stream arrives (and
                # `chunk_delay` of simulated generation time).
                await asyncio.sleep(self.chunk_delay)
            yield TextDelta(piece)
        yield reply

    async def complete(self, request: ModelRequest) -> ModelReply:
        self.calls.append(request)
        if request.hosted_tools:
            kinds = ", ".join(str(t.get("type")) for t in request.hosted_tools)
            raise ConfigError(f"the offline model cannot run hosted tools ({kinds})")
        if self.delay:
            await asyncio.sleep(self.delay)  # simulated model latency
        if self.script is not None:
            answer = self.script(request)
            if isinstance(answer, Awaitable):
                answer = await answer
        else:
            answer = self._default(request)
        if isinstance(answer, ModelReply):
            return answer
        calls: tuple[FunctionCall, ...] = ()
        if isinstance(answer, FunctionCall):
            calls, text, data = (answer,), "", None
        elif (
            isinstance(answer, list) and answer and all(isinstance(a, FunctionCall) for a in answer)
        ):
            calls, text, data = tuple(answer), "", None
        elif isinstance(answer, str):
            text, data = answer, None
            if request.json_schema is not None:
                data = json.loads(answer)
        else:
            text, data = json.dumps(answer), answer
        prompt = [request.instructions, request.input]
        prompt += [getattr(i, "text", "") or getattr(i, "output", "") for i in request.items]
        prompt_tokens = sum(_count_tokens(part) for part in prompt)
        completion_tokens = _count_tokens(text) + sum(_count_tokens(c.arguments) for c in calls)
        usage = Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)
        return ModelReply(
            text=text,
            data=data,
            usage=usage,
            model=request.model,
            tool_calls=calls,
            items=reply_items(text, calls),
        )

    @staticmethod
    def _default(request: ModelRequest) -> Any:
        outputs = [item for item in request.items if isinstance(item, FunctionCallOutput)]
        if request.tools and not outputs:
            tool = request.tools[0]
            arguments = json.dumps(sample_arguments(tool, request.input))
            return FunctionCall(call_id="call_1", name=tool.name, arguments=arguments)
        if request.json_schema is not None:
            return sample_for_schema(request.json_schema)
        headline = request.instructions.strip().splitlines()[0] if request.instructions else ""
        answer = f"[{request.model}] {headline}: {request.input}".strip()
        if outputs:
            names = {
                item.call_id: item.name for item in request.items if isinstance(item, FunctionCall)
            }
            cited = "; ".join(f"tool {names.get(o.call_id, '?')}: {o.output}" for o in outputs)
            answer += f" ({cited})"
        return answer

    async def close(self) -> None:
        return None
